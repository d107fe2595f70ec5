"""End to end on tiny models: the artifact loads in transformers (compressed-tensors) and in compressor.load."""

import hashlib
import json
import math

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from conftest import small_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import compressor
from compressor.quant.rtn import dequantize

# Logits of transformers' decompressed model and compressor.load agree to float32 rounding.
TOL = dict(rtol=1e-4, atol=1e-4)


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


TRANSFORMERS_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "bert"]


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_gptq_artifact_loads_in_transformers(family, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = compressor.compress(
        small_recipe(calib_file, {"bits": 4, "group_size": 32}),
        model=str(tiny_model_dir(family)),
        output=out,
        quiet=True,
    )
    assert result.plan.layers and all(lp.method == "gptq" for lp in result.plan.layers.values())
    cls = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    reference = cls.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    vocab = reference.config.vocab_size
    torch.testing.assert_close(_logits(ours, vocab), _logits(reference, vocab), **TOL)
    # the in-memory quantized model the pipeline evaluated is the artifact
    assert result.metrics["kl_divergence"] >= 0 and 0 <= result.metrics["top1_agreement"] <= 1
    for name in (
        "recipe.yaml",
        "report.json",
        "summary.md",
        "README.md",
        "layers.png",
        "size.png",
        "quality.png",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    _check_size_and_quality_report(result, out)
    # the artifact itself was run for a greedy sample (compressor.load, int8 decode), beside the base model
    if family == "bert":
        assert "sample" not in result.metrics
    else:
        sample, base = result.metrics["sample"], result.metrics["base_sample"]
        assert "error" not in sample, sample
        assert sample["new_tokens"] == base["new_tokens"] == 32 and sample["decode_tokens_per_s"] > 0
        assert "## Greedy sample" in (out / "summary.md").read_text()
        assert "## Greedy sample" in (out / "README.md").read_text()
        assert json.loads((out / "report.json").read_text())["metrics"]["sample"]["text"] == sample["text"]


def _check_size_and_quality_report(result, out) -> None:
    """The size breakdown adds up to the written tensors; per-window figures average to the run's figures."""
    tensors = load_file(str(out / "model.safetensors"))
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    size = result.report["size"]
    parts = size["breakdown_bytes"]
    assert sum(parts.values()) == sum(nbytes.values())
    assert parts["quantized_weights"] == sum(v for k, v in nbytes.items() if k.endswith(".weight_packed"))
    assert parts["quantization_params"] == sum(
        v for k, v in nbytes.items() if k.rsplit(".", 1)[1] in ("weight_scale", "weight_zero_point", "weight_shape")
    )
    assert parts["embeddings"] > 0 and parts["other"] > 0  # every family has embeddings and norms
    assert size["base_bytes"] == size["base_params"] * 4 > size["artifact_bytes"]  # float32 tiny models
    windows = result.metrics["windows"]
    kl = windows["kl_divergence"]
    assert len(kl) == result.metrics["eval_windows"]
    assert sum(kl) / len(kl) == pytest.approx(result.metrics["kl_divergence"], rel=1e-4, abs=1e-9)
    if "perplexity" in result.metrics:  # equal windows: the overall perplexity is the windows' geometric mean
        log_ppl = [math.log(p) for p in windows["perplexity"]]
        assert math.exp(sum(log_ppl) / len(log_ppl)) == pytest.approx(result.metrics["perplexity"], rel=1e-4)
    card = (out / "README.md").read_text()
    for image in ("size.png", "quality.png", "layers.png"):
        assert f"]({image})" in card and f"]({image})" in (out / "summary.md").read_text()
        assert (out / image).read_bytes().startswith(b"\x89PNG")
    assert "x smaller than the uncompressed model at float32" in card


@pytest.mark.parametrize(
    "weights",
    [
        {"bits": 4, "group_size": 32},
        {"bits": 4, "group_size": 32, "symmetric": False},
        {"bits": 8, "strategy": "channel"},
        {"bits": 3, "group_size": 32},
    ],
)
def test_compressed_tensors_decompresses_our_weights_bit_exactly(weights, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = compressor.compress(
        small_recipe(calib_file, weights), model=str(tiny_model_dir("llama")), output=out, quiet=True
    )
    tensors = load_file(str(out / "model.safetensors"))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme_args = next(iter(qcfg["config_groups"].values()))["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=scheme_args)
    for name, qw in result.plan.weights.items():
        local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        # a float32 model holds its scales in float32 (transformers casts them on load), so decompress that way
        local["weight_scale"] = local["weight_scale"].to(torch.float32)
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"].to(torch.float32)
        ours = dequantize(qw.codes, qw.scale, qw.zero, qw.fmt.effective_group(qw.codes.shape[1]))
        assert torch.equal(theirs, ours), name


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_fp8_artifact_loads_in_transformers(strategy, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    weights = {"format": "fp8", "bits": 8, "strategy": strategy, "block_size": [32, 32]}
    compressor.compress(
        small_recipe(calib_file, weights, method="rtn"),
        model=str(tiny_model_dir("qwen2")),
        output=out,
        quiet=True,
    )
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    torch.testing.assert_close(_logits(ours, 300), _logits(reference, 300), **TOL)


def test_gpt2_conv1d_compresses_and_loads_with_compressor(tiny_model_dir, calib_file, tmp_path):
    """GPT-2 keeps Conv1D weights [in, out]; our artifact stores [out, in] like every Linear."""
    out = tmp_path / "out"
    src = tiny_model_dir("gpt2")
    result = compressor.compress(small_recipe(calib_file), model=str(src), output=out, quiet=True)
    assert result.plan.layers["transformer.h.0.attn.c_attn"].shape == (288, 96)
    ours = compressor.load(out)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    a, b = _logits(ours, 300), _logits(base, 300)
    assert (a - b).abs().max() < 0.5 * b.abs().max()  # quantized, yet close to the original model


def test_group_size_fallback_is_recorded(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = compressor.compress(
        small_recipe(calib_file, {"bits": 4, "group_size": 128}),
        model=str(tiny_model_dir("llama")),
        output=out,
        quiet=True,
    )
    q = result.plan.layers["model.layers.0.self_attn.q_proj"]  # in_features 96: 128 does not divide it
    assert (q.requested_group_size, q.group_size) == (128, 32) and "does not divide" in q.note
    d = result.plan.layers["model.layers.0.mlp.down_proj"]  # in_features 160 -> 32
    assert d.group_size == 32
    report = json.loads((out / "report.json").read_text())
    assert {"layer": q.name, "requested": 128, "used": 32} in report["group_fallbacks"]
    AutoModelForCausalLM.from_pretrained(out)  # transformers accepts the fallback sizes


def test_ragged_groups_run_in_our_runtime(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 64})
    recipe["passes"][0]["group_policy"] = "ragged"
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    assert result.plan.layers["model.layers.0.self_attn.q_proj"].group_size == 64  # 96 = 64 + 32
    model = compressor.load(out)
    w = model.model.layers[0].self_attn.q_proj.dequantized_weight()
    qw = result.plan.weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(w, dequantize(qw.codes, qw.scale, qw.zero, 64))
    assert model.model.layers[0].self_attn.q_proj.weight_scale.shape == (96, 2)


def test_lm_head_quantization_unties(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    recipe = small_recipe(calib_file, {"bits": 8, "strategy": "channel"}, method="rtn")
    recipe["passes"][0]["lm_head"] = True
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    assert "lm_head" in result.plan.layers
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(compressor.load(out), 300), _logits(reference, 300), **TOL)


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".json", ".yaml") and p.name != "report.json"
    }


def test_same_recipe_and_seed_give_identical_artifact(tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32, "symmetric": False})
    src = str(tiny_model_dir("qwen3"))
    compressor.compress(recipe, model=src, output=tmp_path / "a", quiet=True)
    compressor.compress(recipe, model=src, output=tmp_path / "b", quiet=True)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert "model.safetensors" in a and a == b


def test_sharded_output(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    recipe = small_recipe(calib_file, max_shard_size="40KB")
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    torch.testing.assert_close(
        _logits(compressor.load(out), 300), _logits(AutoModelForCausalLM.from_pretrained(out), 300), **TOL
    )


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # tied embeddings; gemma3 scales its embeddings
def test_embeddings_quantization(family, tiny_model_dir, calib_file, tmp_path):
    """Quantized input embeddings run in compressor.load (transformers 5.23 cannot load quantized embeddings:
    its weight initializer touches the removed `weight`; see README)."""
    out = tmp_path / "out"
    recipe = small_recipe(calib_file, {"bits": 8, "strategy": "channel"}, method="rtn")
    recipe["passes"][0]["embeddings"] = True
    src = tiny_model_dir(family)
    result = compressor.compress(recipe, model=str(src), output=out, quiet=True)
    assert "model.embed_tokens" in result.plan.layers and "lm_head" not in result.plan.layers
    ours = compressor.load(out)
    embed = ours.model.embed_tokens
    assert type(embed).__name__ == "QuantEmbedding"
    assert torch.equal(embed.dequantized_weight(), result.plan.weights["model.embed_tokens"].dequantize())
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.testing.assert_close(ours.lm_head.weight, base.lm_head.weight)  # untied: lm_head kept in float
    a, b = _logits(ours, 300), _logits(base, 300)
    assert (a - b).abs().max() < 0.2 * b.abs().max()  # int8 embeddings: close to the original model
    # a bfloat16 model gets bfloat16 rows, loaded so or converted (float32 rows failed in the next matmul)
    for bf16 in (compressor.load(out, dtype=torch.bfloat16), compressor.load(out).to(torch.bfloat16)):
        assert bf16.model.embed_tokens(torch.tensor([[1, 2]])).dtype == torch.bfloat16
        c = _logits(bf16, 300).float()
        assert (c - a).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("choice", ["auto", "bfloat16", "float32"])
def test_artifact_dtype(choice, tiny_model_dir, calib_file, tmp_path):
    """`dtype` sets the unquantized tensors' dtype (auto: the source's declared one, float16 here); transformers and
    compressor.load load the artifact, and the run's figures are those of the artifact as stored: its load-back
    check holds the tight tolerance, and a fresh load reproduces the evaluated model's logits."""
    src = tmp_path / "src"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float16)
    model.save_pretrained(src)
    for f in tiny_model_dir("llama").glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    result = compressor.compress(small_recipe(calib_file, dtype=choice), model=str(src), output=out, quiet=True)
    expected = {"auto": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[choice]
    tensors = load_file(out / "model.safetensors")
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[key].dtype == expected, key
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["dtype"] == str(expected).removeprefix("torch.")
    ours = compressor.load(out)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(ours, 300), _logits(reference, 300), **TOL)
    assert result.metrics["kl_divergence"] >= 0


def test_gguf_source_defaults_to_bfloat16():
    """A GGUF source declares no dtype (its float copy is float32 only because it was dequantized): auto is
    bfloat16; an explicit choice wins."""
    from types import SimpleNamespace

    from compressor.state import artifact_dtype

    gguf = SimpleNamespace(source=SimpleNamespace(gguf_file="m.gguf"), export_dtype=torch.float32)
    folder = SimpleNamespace(source=SimpleNamespace(gguf_file=None), export_dtype=torch.float16)
    assert artifact_dtype("auto", gguf) == torch.bfloat16
    assert artifact_dtype("auto", folder) == torch.float16
    assert artifact_dtype("float32", gguf) == torch.float32


def test_report_names_its_evaluation_text_and_intervals(tiny_model_dir, calib_file, tmp_path):
    """Without `evaluate.perplexity_text` a run evaluates on the held-out split (never drawn for calibration) and
    says so; a text that is also the calibration source is flagged. Both carry 95% bootstrap intervals."""
    heldout = small_recipe(calib_file)
    heldout["evaluate"] = {"seq_len": 32, "max_windows": 6, "generate_tokens": 0}
    r = compressor.compress(heldout, model=str(tiny_model_dir("llama")), output=tmp_path / "a", quiet=True)
    text = r.metrics["evaluation_text"]
    assert text["heldout"] and text["overlaps_calibration"] is False and "held-out" in text["source"]
    ci = r.metrics["intervals"]
    change = r.metrics["perplexity"] / r.metrics["base_perplexity"] - 1
    assert ci["perplexity_change"][0] <= change <= ci["perplexity_change"][1]
    assert ci["kl_divergence"][0] <= r.metrics["kl_divergence"] <= ci["kl_divergence"][1]
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "held out: no overlap with the calibration text" in summary and "95% intervals" in summary
    assert "held out" in (tmp_path / "a" / "README.md").read_text()

    r = compressor.compress(
        small_recipe(calib_file), model=str(tiny_model_dir("llama")), output=tmp_path / "b", quiet=True
    )
    text = r.metrics["evaluation_text"]
    assert not text["heldout"] and text["overlaps_calibration"] and text["source"] == calib_file.name
    assert "OVERLAPS the calibration text" in (tmp_path / "b" / "summary.md").read_text()


def test_heldout_split_shares_no_text_with_calibration():
    from compressor.calibration.data import builtin_dir, read_heldout, shared_fraction

    calibration = [p.read_text() for p in sorted(builtin_dir().glob("*.txt"))]
    assert shared_fraction(read_heldout(), calibration, probes=512) == 0
    assert shared_fraction(calibration[3], calibration) == 1
