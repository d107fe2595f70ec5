"""ONNX export of compressed models: quantized linears as MatMulNBits / blocked QDQ / FP8 QDQ, decoders with KV cache.

Two entry points read the same weights: `export_onnx(state, folder)` (recipe `export: [..., onnx]`, from the plan)
and `export_artifact(src, out)` (`compress export-onnx`, from an artifact loaded with `compressor.load`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration.engine import Residency
from compressor.errors import ModelError, RecipeError
from compressor.models.adapters import adapter_for
from compressor.schema.onnx import OnnxExportConfig

from ..source import ArtifactSource
from .fused import build_fused_decoder, fused_unsupported
from .graph import IR_VERSION, export_decoder, export_encoder, finalize, retype_int4
from .initializers import InitializerStore
from .modules import LayerChoice, Replacements, swapped
from .weights import LayerWeights, from_buffers, from_plan

log = logging.getLogger(__name__)

EXPORT_STAGES = ("prepare layers", "build graph", "write files")


class Stages:
    """Progress over an export's coarse stages (each takes seconds to tens of seconds on a 135M model): a tqdm bar
    whose postfix names the stage running now."""

    def __init__(self, names: tuple[str, ...], quiet: bool = False):
        self.bar = tqdm(total=len(names), desc="onnx export", unit="stage", disable=quiet)
        self.started = False

    def start(self, name: str) -> None:
        """Mark the previous stage done and name the one that begins."""
        if self.started:
            self.bar.update(1)
        self.started = True
        self.name = name
        self.bar.set_postfix_str(name)

    def detail(self, text: str) -> None:
        """Say how far the running stage is (e.g. 'layer 12/210')."""
        self.bar.set_postfix_str(f"{self.name}: {text}")

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()


SUBDIR = "onnx"  # inside a compress artifact
MODEL_FILE = "model.onnx"
LAYERS_FILE = "onnx_export.json"


def export_onnx(source: ArtifactSource, folder: Path) -> list[str]:
    """Write `onnx/` (model.onnx, config, tokenizer, layer report) into `folder`; returns the files written."""
    layers = {name: from_plan(qw) for name, qw in source.plan.weights.items()}
    corrections = {name: (c.down, c.up) for name, c in source.plan.compensations.items()}
    out = folder / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    streamed = source.residency is not None and _graph_kind(source.model, source.onnx) == "fused"
    # the fused graph is built block by block: a streamed model is never loaded whole
    model = source.model if streamed else source.full_model()
    stages = Stages(EXPORT_STAGES, quiet=source.quiet)
    try:
        files = export_model(
            model,
            layers,
            out,
            source.onnx,
            decoder=source.adapter.decoder,
            corrections=corrections,
            stages=stages,
            residency=source.residency() if streamed else None,
        )
    finally:
        stages.close()
    source.tokenizer.save_pretrained(out)
    return [f"{SUBDIR}/{f}" for f in files]


def export_artifact(
    src: str | Path, out: Path, config: OnnxExportConfig, overwrite: bool = False, quiet: bool = False
) -> list[str]:
    """Export a compressor artifact directory to ONNX in `out` (written atomically); returns the files."""
    from compressor.runtime.load import load

    from ..atomic import check_output

    src, out = Path(src), Path(out)
    check_output(out, overwrite)
    stages = Stages(("load the artifact", *EXPORT_STAGES), quiet)
    try:
        stages.start("load the artifact")
        model = load(src, keep_16bit=False)  # plain float linears: the graph has no op for Linear16
        files = _export_loaded(model, src, out, config, overwrite, stages)
    finally:
        stages.close()
    return files


def _export_loaded(
    model: nn.Module, src: Path, out: Path, config: OnnxExportConfig, overwrite: bool, stages: Stages
) -> list[str]:
    from ..atomic import atomic_directory

    layers = {
        name: from_buffers(m) for name, m in model.named_modules() if hasattr(m, "scheme") and hasattr(m, "in_features")
    }
    corrections = {
        name: (m.lora_down, m.lora_up) for name, m in model.named_modules() if getattr(m, "lora_down", None) is not None
    }
    decoder = adapter_for(model.config.model_type).decoder
    with atomic_directory(out, overwrite) as tmp:
        files = export_model(model, layers, tmp, config, decoder=decoder, corrections=corrections, stages=stages)
        for extra in sorted(src.iterdir()):
            if extra.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and extra.is_file():
                shutil.copy(extra, tmp / extra.name)
                files.append(extra.name)
    return files


def export_model(
    model: nn.Module,
    layers: dict[str, LayerWeights],
    out: Path,
    cfg: OnnxExportConfig,
    decoder: bool,
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    stages: Stages | None = None,
    residency: Residency | None = None,
) -> list[str]:
    """Swap quantized layers for ONNX-op modules, trace (or build the fused graph), finalize; writes model, config
    and layer report.

    `corrections` maps layers to the (down [r, K], up [N, r]) factors of their low-rank compensation; `stages`
    shows progress over EXPORT_STAGES. The fused graph is built block by block with its weights written out as they
    are made; `residency` (fused graph only) brings a streamed model's blocks in one at a time.
    """
    stages = stages or Stages(EXPORT_STAGES, quiet=True)
    stages.start("prepare layers")
    if residency is None and next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    modules = dict(model.named_modules())
    replacements = Replacements(
        modules, model.get_input_embeddings(), layers, cfg, corrections or {}, progress=stages.detail
    )
    check_level_patterns(cfg, replacements.linear_names())
    graph = _graph_kind(model, cfg) if decoder else "traced"
    stages.start("build graph")
    store = None
    if graph == "fused":
        store = InitializerStore(out, MODEL_FILE + ".data")
        try:
            proto, placement = build_fused_decoder(model, replacements, cfg.opset, store, residency)
        except BaseException:
            store.close()
            raise
    else:
        every = replacements.all()
        with swapped(model, every):
            if decoder:
                proto = export_decoder(model, cfg.opset)
            else:
                base = getattr(model, "base_model", model)
                proto = export_encoder(base, cfg.opset)
        placement = _traced_placement(proto, every)
    choices = replacements.choices
    for c in choices:
        c.tensor, c.rows = (placement.get(c.name) or {}).get("tensor"), (placement.get(c.name) or {}).get("rows")
    stages.start("write files")
    retype_int4(proto)
    files = finalize(proto, out / MODEL_FILE, store)
    model.config.save_pretrained(out)
    files.append("config.json")
    if decoder and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
        files.append("generation_config.json")
    (out / LAYERS_FILE).write_text(json.dumps(_layer_report(cfg, graph, choices), indent=2) + "\n")
    files.append(LAYERS_FILE)
    _warn_fallbacks(choices)
    return files


def check_level_patterns(cfg: OnnxExportConfig, linears: list[str]) -> None:
    """A per-layer accuracy_level pattern that matches no (quantized) linear layer is a typo, not a no-op: the API
    checks the model's linears before the passes run, the exporter the quantized ones."""
    for pattern in cfg.accuracy_level_by_layer:
        if not any(re.search(pattern, name) for name in linears):
            example = ", ".join(linears[:2] + linears[-1:]) if linears else "none"
            raise RecipeError(
                f"pattern '{pattern}' matches no quantized linear layer of the model",
                where="onnx.accuracy_level_by_layer",
                fix=f"use a regular expression searched in layer names such as {example}",
            )


def _graph_kind(model: nn.Module, cfg: OnnxExportConfig) -> str:
    """`fused` or `traced` for a decoder: `auto` takes the fused graph where the family supports it."""
    if cfg.graph == "traced":
        return "traced"
    reason = fused_unsupported(model)
    if reason is None:
        return "fused"
    if cfg.graph == "fused":
        raise ModelError(f"onnx.graph 'fused' does not support this model: {reason}", fix="use graph: traced or auto")
    log.info("onnx: traced graph (%s)", reason)
    return "traced"


def _traced_placement(proto, replacements: dict[str, nn.Module]) -> dict[str, dict]:
    """Each quantized layer's weight initializer in a traced graph (its rows are the whole tensor)."""
    present = {t.name for t in proto.graph.initializer}
    placement = {}
    for name, mod in replacements.items():
        buffers = ("nbits_weight", "gbq_data", getattr(mod, "weight_name", ""))
        for buf in buffers:
            if buf and f"model.{name}.{buf}" in present and hasattr(mod, buf):
                placement[name] = {"tensor": f"model.{name}.{buf}", "rows": [0, int(getattr(mod, buf).shape[0])]}
                break
    return placement


def _layer_report(cfg: OnnxExportConfig, graph: str, choices: list[LayerChoice]) -> dict:
    return {
        "format": cfg.format,
        "accuracy_level": cfg.accuracy_level,
        "accuracy_level_by_layer": cfg.accuracy_level_by_layer,
        "block_size_max": cfg.block_size_max,
        "opset": cfg.opset,
        "ir_version": IR_VERSION,
        "graph": graph,
        "layers": {
            c.name: {
                "op": c.op,
                "weight_type": c.weight_type,
                "block_size": c.block_size,
                "accuracy_level": c.accuracy_level,
                "note": c.note,
                "tensor": c.tensor,
                "rows": c.rows,
                **({"correction_rank": c.correction_rank} if c.correction_rank else {}),
            }
            for c in choices
        },
    }


def _warn_fallbacks(choices: list[LayerChoice]) -> None:
    fallbacks = [c for c in choices if c.note and "QDQ" in c.note]
    if fallbacks:
        log.warning(
            "onnx: %d layer(s) could not be MatMulNBits and were written as DequantizeLinear+MatMul (e.g. %s: %s); "
            "see %s",
            len(fallbacks),
            fallbacks[0].name,
            fallbacks[0].note,
            LAYERS_FILE,
        )
