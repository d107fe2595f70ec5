"""The Python API: `compress()` runs a recipe end to end, `load()` (re-exported) runs an artifact."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .calibration.blockwise import BlockwiseLogits
from .calibration.data import HELDOUT_NAME, read_heldout, read_text_file, read_texts, sample_windows, shared_fraction
from .calibration.engine import final_hidden_block_by_block, head_logits, limit_malloc_fragmentation, peak_rss_mb
from .calibration.ranks import init_from_launcher
from .errors import ArtifactCheckError, ModelError, RecipeError
from .eval.bootstrap import report_intervals
from .eval.metrics import evaluate_windows, greedy_sample, text_windows
from .models.loading import base_model_hub_id, load_model, max_positions
from .pipeline import run_passes
from .plan import Plan
from .recipe import Recipe, portable_name, resolve_recipe
from .runtime.lora import LORA_DIR
from .state import CompressionState, lazy_residency
from .version import __version__

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What a run produced: the artifact path, the plan, the metrics and the full report."""

    path: Path
    plan: Plan
    metrics: dict
    report: dict
    hub_url: str | None = None


def _eval_windows(r: Recipe, loaded) -> tuple[torch.Tensor | None, dict]:
    """The evaluation windows and what the report says of their text: its name, and whether it overlaps the
    calibration text (a held-out figure flatters nothing; an overlapping one flatters calibrated methods)."""
    ev = r.evaluate
    if ev is None:
        return None, {}
    if ev.perplexity_text:
        path = Path(ev.perplexity_text).expanduser()
        text = read_text_file(path, "evaluation text", "evaluate.perplexity_text", RecipeError)
        name, what = path.name, f"the evaluation text {path.name}"
        fix = "use a longer text or a shorter evaluate.seq_len"
    else:
        text, name = read_heldout(), HELDOUT_NAME
        what, fix = f"the {HELDOUT_NAME}", "set evaluate.perplexity_text to a longer text, or lower evaluate.seq_len"
    windows = text_windows(loaded.tokenizer, text, ev.seq_len, ev.max_windows)
    if windows.shape[0] == 0:
        raise RecipeError(f"{what} has fewer than {ev.seq_len} tokens", where="evaluate", fix=fix)
    info: dict = {"source": name, "heldout": not ev.perplexity_text}
    if r.needs_calibration():
        shared = shared_fraction(text, read_texts(r.calibration))
        info["overlaps_calibration"] = shared > 0
        info["calibration_snippets_found"] = round(shared, 3)
    return windows, info


def _check_head(r: Recipe, model) -> None:
    """Refuse, before any work, a pass that measures token predictions on a model without an LM head (a headless
    encoder such as a BertModel checkpoint)."""
    if model.get_output_embeddings() is not None:
        return
    for i, p in enumerate(r.passes):
        if p.needs_lm_head:
            arch = type(model).__name__
            raise ModelError(
                f"the {p.type} pass measures the model's token predictions, and {arch} has no LM head (a headless "
                "encoder)",
                where=f"passes.{i}",
                fix="use a uniform recipe (w4-gptq, w8-rtn, fp8), a method that needs no head, or the checkpoint "
                "with its head (e.g. BertForMaskedLM)",
            )


def _validate_paths(r: Recipe) -> None:
    if r.evaluate and r.evaluate.perplexity_text and not Path(r.evaluate.perplexity_text).expanduser().is_file():
        raise RecipeError(
            f"evaluation text not found: {r.evaluate.perplexity_text}",
            where="evaluate.perplexity_text",
            fix="point it at an existing text file",
        )


def _size_report(state: CompressionState, folder: Path, base_params: int) -> dict:
    from exporters.safetensors_export import size_breakdown

    model, plan = state.model, state.plan
    total = sum(p.numel() for p in model.parameters())
    q_params = sum(lp.shape[0] * lp.shape[1] for lp in plan.layers.values())
    q_bits = sum(lp.total_bits for lp in plan.layers.values())
    lora_bits = sum(lp.compensation_bits for lp in plan.layers.values())
    dense_dtype = plan.dtype
    size = {
        "total_params": int(total),
        "base_params": int(base_params),
        "quantized_layers": len(plan.layers),
        "quantized_params": int(q_params),
        "quantized_bits_per_weight": (q_bits / q_params) if q_params else None,  # incl. the LoRA compensation
        "artifact_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        + sum(f.stat().st_size for f in (folder / LORA_DIR).glob("*.safetensors")),
    }
    if lora_bits:
        size["compensation_bits_per_weight"] = lora_bits / q_params
    onnx_files = [f for f in (folder / "onnx").glob("model.onnx*") if f.is_file()]
    if onnx_files:  # graph + external weights
        size["onnx_bytes"] = sum(f.stat().st_size for f in onnx_files)
    if (folder / "model.gguf").is_file():
        size["gguf_bytes"] = (folder / "model.gguf").stat().st_size
    if size["artifact_bytes"]:
        size["breakdown_bytes"] = size_breakdown(folder, plan.size_roles())
        size["dense_dtype"] = str(dense_dtype).removeprefix("torch.")
        size["base_bytes"] = int(base_params) * dense_dtype.itemsize  # the uncompressed model at the same dtype
    return size


def _samples(r: Recipe, loaded) -> bool:
    """Whether the run takes greedy samples: an evaluated decoder whose artifact compressor.load can run."""
    ev = r.evaluate
    return ev is not None and ev.generate_tokens > 0 and loaded.adapter.decoder and "safetensors" in r.export


def _artifact_sample(model, tokenizer, ev) -> dict:
    """A greedy sample from the artifact just written, run the way users run it (compressor.load, int8 decode)."""
    from .runtime.load import set_activations

    set_activations(model, "int8-decode")
    return greedy_sample(model, tokenizer, ev.prompt, ev.generate_tokens)


LOAD_BACK_TOLERANCE = 1e-4  # |logit difference| <= tol + tol * |logit|: what the artifact tests hold loads to


def _loaded_back(folder: Path, state: CompressionState):
    """The artifact just written, loaded with compressor.load, once its logits on a short probe are those of the
    compressed model in memory; None when the run wrote no safetensors artifact. An artifact that does not load back
    or differs raises ArtifactCheckError (our defect: exit 1, the artifact kept as NAME.broken)."""
    from .runtime.load import load as load_artifact

    if "safetensors" not in state.recipe.export:
        return None
    try:
        # float activations and float32 dense linears: the logits of the dequantized model, computed as the model in
        # memory computes them (16-bit linears kept 16-bit sum in another order, which adds up over the many dense
        # linears of a decomposed model)
        model = load_artifact(folder, keep_16bit=False)
    except Exception as err:
        raise ArtifactCheckError(f"the artifact just written does not load back ({type(err).__name__}: {err})") from err
    ids = state.loaded.tokenizer(
        state.recipe.evaluate.prompt if state.recipe.evaluate else "The history of the city", return_tensors="pt"
    )["input_ids"][:, :32]
    expected, got = _compressed_outputs(state, ids), _outputs(model, ids)
    diff = (got - expected).abs()
    if not bool((diff <= LOAD_BACK_TOLERANCE * (1 + expected.abs())).all()):
        raise ArtifactCheckError(
            f"the artifact just written does not reproduce the compressed model: max |logit difference| "
            f"{diff.max().item():.3g} on a {ids.shape[1]}-token probe (tolerance {LOAD_BACK_TOLERANCE} + "
            f"{LOAD_BACK_TOLERANCE} |logit|)"
        )
    return model


def _compressed_outputs(state: CompressionState, ids: torch.Tensor) -> torch.Tensor:
    """`_outputs` of the compressed model as the artifact stores it. A streamed decoder whose blocks are not all
    resident runs block by block (each block dequantized from the plan, rounded, run and let go), so the check does
    not bring the whole float model into memory."""
    lazy = state.loaded.lazy
    if lazy is None or lazy.is_resident() or not state.adapter.decoder:
        return _outputs(state.artifact_model(), ids)
    residency, blocks = state.artifact_residency(), state.adapter.blocks(state.model)
    residency.load_outside()
    final = final_hidden_block_by_block(state.model, blocks, [ids], residency)[0]
    return head_logits(state.model, blocks, ids, final).float()


@torch.inference_mode()
def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits (or, for a headless encoder, last hidden states) of `ids`."""
    out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def compress(
    recipe: str | Path | dict | Recipe,
    model: str | None = None,
    output: str | Path | None = None,
    *,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    **overrides: Any,
) -> CompressionResult:
    """Run a recipe: load, calibrate, run passes, evaluate, write the artifact atomically, then upload it if the
    recipe names a hub target (`hub:` or `push_to_hub=`).

    User errors raise `CompressorError` (the CLI prints the same message and exits with code 2). The hub token is
    checked before the run; a failed upload leaves the local artifact complete and says how to retry it.
    `trust_remote_code=True` lets the model repository's Python code run (a recipe cannot turn that on by itself).

    Under torch's launcher (`torchrun --nproc-per-node N -m compressor ...`, `compress --nproc N`) every process
    runs the passes on its share of the calibration windows with statistics reduced across processes and evaluates
    its share of the evaluation windows; rank 0 alone takes the greedy samples, writes the artifact and uploads it
    (the others return a result without report).
    """
    from exporters.hub import push_artifact

    run = _Run(time.perf_counter())
    limit_malloc_fragmentation()
    ranks = init_from_launcher()
    quiet = quiet or not ranks.main  # one set of progress bars: rank 0's
    r, out = checked_recipe(recipe, model, output, push_to_hub, overwrite, trust_remote_code, overrides)
    torch.manual_seed(r.calibration.seed)
    state, base_params, windows = _load(r, quiet, run)
    state.ranks = ranks
    metrics = _compress_and_evaluate(state, windows, quiet, run)
    run.processes = ranks.facts(peak_rss_mb())
    if not ranks.main:
        return CompressionResult(out, state.plan, metrics, {}, None)
    report = _report(state, metrics, run)
    _write_artifact(state, out, overwrite, report, base_params, run)
    _announce(report, metrics)
    hub_url = None
    if r.hub is not None:
        name = Path(r.model).name if r.model else out.name
        message = f"Upload {name} compressed with compressor {__version__}"
        hub_url = push_artifact(out, r.hub, commit_message=message, quiet=quiet)
    return CompressionResult(out, state.plan, metrics, report, hub_url)


def _announce(report: dict, metrics: dict) -> None:
    """The run's summary lines, and a warning when the evaluation text overlaps the calibration text (said once the
    run has succeeded: a failure's message stays one line)."""
    from exporters.report import summary_lines

    for line in summary_lines(report):
        log.info(line)
    text = metrics.get("evaluation_text") or {}
    if text.get("overlaps_calibration"):
        log.warning(
            "the evaluation text %s overlaps the calibration text (%.0f%% of probed snippets found in it): its "
            "figures flatter calibrated methods; set evaluate.perplexity_text to a text not used for calibration",
            text["source"],
            text["calibration_snippets_found"] * 100,
        )


@dataclass
class _Run:
    """When the run started, how long each of its steps took (report.json `timings`), what it evaluated on."""

    start: float
    timings: dict[str, float] = field(default_factory=dict)
    pass_timings: list[dict] = field(default_factory=list)
    processes: dict | None = None  # a distributed run's processes: peak RSS and bytes sent by each
    eval_text: dict = field(default_factory=dict)  # metrics.evaluation_text: the text's name, calibration overlap

    def timed(self, step: str, since: float) -> None:
        self.timings[step] = time.perf_counter() - since


def with_remote_code_consent(r: Recipe, caller_allows: bool) -> Recipe:
    """The recipe with `trust_remote_code` as the caller decided: a recipe (a file from anywhere) may ask for the
    model repository's Python code to run, but only the caller (`--trust-remote-code`, `trust_remote_code=True`)
    can allow it; a recipe that asks without that consent is refused."""
    if r.trust_remote_code and not caller_allows:
        raise RecipeError(
            "the recipe sets trust_remote_code: true, which runs Python code from the model's repository; "
            "a recipe cannot allow that by itself",
            where="trust_remote_code",
            fix="if you trust that repository, pass --trust-remote-code (CLI) or trust_remote_code=True "
            "(compressor.compress); otherwise remove the key",
        )
    return r.model_copy(update={"trust_remote_code": True}) if caller_allows else r


def checked_recipe(
    recipe, model, output, push_to_hub, overwrite: bool, trust_remote_code: bool, overrides: dict
) -> tuple[Recipe, Path]:
    """The resolved recipe and its output folder, after every check that can fail before any work starts."""
    from exporters.atomic import check_output
    from exporters.hub import check_hub_target

    r = with_remote_code_consent(resolve_recipe(recipe, model, output, push_to_hub, **overrides), trust_remote_code)
    if not r.output:
        raise RecipeError("no output directory given", where="output", fix="pass --output DIR (or output= in the API)")
    out = Path(r.output).expanduser()
    check_output(out, overwrite)
    _validate_paths(r)
    if r.hub is not None:  # fail now, not after hours of compression
        check_hub_target(r.hub)
    return r, out


def _load(r: Recipe, quiet: bool, run: _Run) -> tuple[CompressionState, int, torch.Tensor | None]:
    """The model (streamed), its state, its parameter count before any pass, and the evaluation windows."""
    t = time.perf_counter()
    loaded = load_model(r.model, r.trust_remote_code, quiet=quiet, stream=True)
    run.timed("load", t)
    base_params = sum(p.numel() for p in loaded.model.parameters())  # before any pass removes or fuses blocks
    if "onnx" in r.export and r.onnx.accuracy_level_by_layer:  # fail before the passes, not after them
        from transformers.pytorch_utils import Conv1D  # gpt2's linears

        from exporters.onnx import check_level_patterns

        linears = [n for n, m in loaded.model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        check_level_patterns(r.onnx, linears)
    if "gguf" in r.export:  # an architecture llama.cpp has no name for fails before the passes
        from exporters.gguf.metadata import arch_for

        arch_for(loaded.model.config.get_text_config())
    _check_head(r, loaded.model)
    state = CompressionState(loaded, r, quiet=quiet)
    if r.evaluate is not None:
        _evaluate_block_by_block(state)  # an impossible `block_by_block: true` fails before the passes
    windows, run.eval_text = _eval_windows(r, loaded)
    if windows is not None and r.evaluate.kl:
        loaded.keep_base_copy()  # only when the model cannot be re-read from its checkpoint
    return state, base_params, windows


def _compress_and_evaluate(state: CompressionState, windows: torch.Tensor | None, quiet: bool, run: _Run) -> dict:
    """Calibration windows, the passes, then perplexity / KL against the base (and the base's greedy sample); a
    headless encoder's embedding cosine to the base instead."""
    r, loaded = state.recipe, state.loaded
    if r.needs_calibration():
        t = time.perf_counter()
        state.calibration_ids = sample_windows(
            loaded.tokenizer, read_texts(r.calibration), r.calibration, max_positions(loaded.model.config)
        )
        run.timed("calibration_data", t)
    t = time.perf_counter()
    run.pass_timings = run_passes(state)
    run.timed("passes", t)
    metrics: dict = {}
    if windows is None:
        return metrics
    t = time.perf_counter()
    blockwise = _evaluate_block_by_block(state)
    if state.ranks.distributed:  # the automatic choice reads each process's free memory: one choice for all
        blockwise = any(state.ranks.gather([blockwise]))
    model, base = _evaluated_models(state, blockwise)
    ranks = state.ranks
    metrics = evaluate_windows(
        model,
        windows,
        base,
        r.evaluate.batch_size,
        causal=loaded.adapter.decoder,
        quiet=quiet,
        share=(lambda batches: ranks.shard(batches, allow_empty=True)) if ranks.distributed else None,
        gather=ranks.gather if ranks.distributed else None,
    )
    metrics["evaluation_text"] = run.eval_text
    if base is not None:
        metrics["intervals"] = report_intervals(metrics.get("windows", {}), seed=r.calibration.seed)
    if blockwise:
        metrics["evaluated_block_by_block"] = True
    if base is not None and not blockwise and _samples(r, loaded) and ranks.main:
        metrics["base_sample"] = greedy_sample(base, loaded.tokenizer, r.evaluate.prompt, r.evaluate.generate_tokens)
    run.timed("evaluate", t)
    return metrics


def _evaluate_block_by_block(state: CompressionState) -> bool:
    """Whether evaluation runs the models block by block: `evaluate.block_by_block`, or (null) when the float32
    compressed model and its base would take more than half of the memory available now. Only a streamed decoder
    can (an explicit `true` for any other model is an error)."""
    choice, loaded = state.recipe.evaluate.block_by_block, state.loaded
    possible = loaded.lazy is not None and loaded.adapter.decoder
    if choice and not possible:
        raise RecipeError(
            "block-by-block evaluation needs a decoder streamed from a safetensors checkpoint",
            where="evaluate.block_by_block",
            fix="remove it (the model is evaluated whole), or point --model at a safetensors checkpoint folder",
        )
    if choice is not None or not possible:
        return bool(choice)
    import psutil

    float32_bytes = 4 * sum(p.numel() for p in state.model.parameters())
    return 2 * float32_bytes > psutil.virtual_memory().available / 2


def _evaluated_models(state: CompressionState, blockwise: bool):
    """The compressed model as the artifact stores it and the base (None without KL), whole or as block-by-block
    logits sources (`calibration.blockwise`)."""
    loaded, kl = state.loaded, state.recipe.evaluate.kl
    if not blockwise:
        return state.artifact_model(), (loaded.base_model() if kl else None)
    blocks = state.adapter.blocks(state.model)
    model = BlockwiseLogits(state.model, blocks, state.artifact_residency())
    base_lazy = loaded.base_streamed() if kl else None
    if kl and base_lazy is None:
        raise ModelError("the base model cannot be streamed from its checkpoint for block-by-block evaluation")
    if base_lazy is None:
        return model, None
    base_blocks = state.adapter.blocks(base_lazy.model)
    return model, BlockwiseLogits(base_lazy.model, base_blocks, lazy_residency(base_lazy, state.adapter))


def _report(state: CompressionState, metrics: dict, run: _Run) -> dict:
    """report.json's content known before the artifact is written (size, files and timings follow)."""
    from exporters.report import REPORT_VERSION

    r, loaded = state.recipe, state.loaded
    return {
        "report_version": REPORT_VERSION,
        "compressor_version": __version__,
        "model": {
            "source": portable_name(r.model),
            "base_model": base_model_hub_id(r.model),
            "family": loaded.adapter.family,
            "model_type": loaded.model.config.model_type,
        },
        "passes": run.pass_timings,
        "plan": state.plan.to_json(),
        "group_fallbacks": [
            {"layer": lp.name, "requested": lp.requested_group_size, "used": lp.group_size}
            for lp in state.plan.layers.values()
            if lp.note
        ],
        "metrics": metrics,
        **state.report,
    }


def _write_artifact(state: CompressionState, out: Path, overwrite: bool, report: dict, base_params: int, run: _Run):
    """Every export, the recipe copy, the report and the model card, in a temporary folder renamed into place."""
    from exporters import EXPORTERS
    from exporters.atomic import atomic_directory
    from exporters.report import write_model_card, write_report
    from exporters.source import ArtifactSource

    r, loaded, metrics = state.recipe, state.loaded, report["metrics"]
    t = time.perf_counter()
    with atomic_directory(out, overwrite) as tmp:
        files, source = [], ArtifactSource.of(state)
        for name in r.export:
            files += EXPORTERS[name](source, tmp)
        for rel, data in state.extra_files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            files.append(rel)
        recipe_yaml = r.portable().to_yaml()  # nothing machine-local in the artifact
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        report["files"] = files
        report["size"] = _size_report(state, tmp, base_params)
        check_start = time.perf_counter()
        loaded_back = _loaded_back(tmp, state)
        run.timed("load_back_check", check_start)
        if _samples(r, loaded) and loaded_back is not None:
            sample_start = time.perf_counter()
            metrics["sample"] = _artifact_sample(loaded_back, loaded.tokenizer, r.evaluate)
            run.timed("sample", sample_start)
        run.timings["export"] = (
            time.perf_counter() - t - run.timings.get("sample", 0.0) - run.timings["load_back_check"]
        )
        run.timed("total", run.start)
        report["timings"] = {k: round(v, 2) for k, v in run.timings.items()}
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if run.processes:
            report["processes"] = run.processes
        write_report(report, tmp)
        write_model_card(report, recipe_yaml, tmp)
