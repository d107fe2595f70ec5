"""ONNX export verified on onnxruntime's CPU provider against `compressor.load` (tiny models of every family).

Tolerance: logits agree with the pure-torch path of `compressor.load` (dequantize + float32 matmul) to 1e-4 absolute
when MatMulNBits runs at accuracy_level 0 (float32 compute) and onnxruntime's DQ+MatMul fusion is told the same
(`session.qdq_matmulnbits_accuracy_level=0`); at accuracy_level 4 (int8 activations) to 5% of the largest logit.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import small_recipe
from onnx import numpy_helper
from safetensors.torch import load_file

import compressor
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.quant.packing import unpack_int32
from exporters.onnx.ops import _dq, _nbits_dequant
from exporters.onnx.runner import OnnxCausalLM
from exporters.onnx.weights import (
    LayerWeights,
    nbits_block_size,
    nbits_codes,
    nbits_tensors,
    nbits_zero_points,
    qdq_tensors,
)

pytestmark = pytest.mark.filterwarnings("ignore")
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
TOL = 1e-4


# ---- layouts (numerics only) -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 48, 96])  # 48: blocks of 16 repeat the scale; 96 = K: channel-wise
def test_matmulnbits_layout_is_lossless(bits, symmetric, group):
    torch.manual_seed(bits * 7 + group)
    n, k = 40, 96
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) + 0.1).to(torch.float16)
    zero = None if symmetric else torch.randint(lo, hi + 1, (n, k // group), dtype=torch.int8)
    lw = LayerWeights(codes, scale, zero, bits, group)
    block = nbits_block_size(lw)
    assert block == {32: 32, 48: 16, 96: 32}[group]
    b, scales, zp = nbits_tensors(lw, block)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (n, k // block, block * bits // 8)
    assert torch.equal(nbits_codes(b, bits, k), codes)
    assert torch.equal(scales, scale.float().repeat_interleave(group // block, 1))
    if zero is not None:
        assert torch.equal(nbits_zero_points(zp, bits, k // block), zero.repeat_interleave(group // block, 1))
    assert torch.equal(_nbits_dequant(b, scales, zp, k, bits), lw.dequantize())


def test_qdq_layouts_match_the_weights():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    lw = LayerWeights(codes, torch.rand(24, 2), torch.randint(-8, 8, (24, 2), dtype=torch.int8), 4, 32)
    t = qdq_tensors(lw)
    assert t.onnx_int4 and t.block_size == 32 and t.axis == 0 and torch.equal(t.weight, codes.t())
    assert torch.equal(_dq(t.weight, t.scale, t.zero, t.axis, t.block_size), lw.dequantize().t())
    fp8 = (torch.randn(40, 64) * 3).to(torch.float8_e4m3fn)
    for scale, block in [(torch.rand(1), None), (torch.rand(40, 1), None), (torch.rand(3, 2), (16, 32))]:
        lw = LayerWeights(fp8, scale, None, 8, None, block)
        t = qdq_tensors(lw)
        assert t.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(_dq(t.weight, t.scale, None, t.axis, t.block_size), lw.dequantize().t())


def test_int4_initializers_round_trip():
    from exporters.onnx.graph import retype_int4

    codes = np.random.default_rng(0).integers(-8, 8, (5, 7)).astype(np.int8)  # odd count: last byte half used
    init = numpy_helper.from_array(codes, "layer.qdq_int4_weight")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [init]))
    retype_int4(model)
    assert model.graph.initializer[0].data_type == onnx.TensorProto.INT4
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]).astype(np.int8), codes)


def test_formats_matmulnbits_cannot_take():
    assert nbits_block_size(LayerWeights(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 3), None, 3, 32)) is None
    assert nbits_block_size(LayerWeights(torch.zeros(4, 100, dtype=torch.int8), torch.ones(4, 1), None, 4, 100)) is None


def test_block_size_cap_splits_groups_losslessly():
    torch.manual_seed(3)
    codes = torch.randint(-8, 8, (8, 128), dtype=torch.int8)
    lw = LayerWeights(codes, torch.rand(8, 2) + 0.1, torch.randint(-8, 8, (8, 2), dtype=torch.int8), 4, 64)
    assert nbits_block_size(lw) == 64
    assert nbits_block_size(lw, max_block=128) == 64  # a cap above the group changes nothing
    for cap in (16, 32):
        block = nbits_block_size(lw, max_block=cap)
        assert block == cap
        b, scales, zp = nbits_tensors(lw, block)
        assert torch.equal(scales, lw.scale.float().repeat_interleave(64 // cap, 1))
        assert torch.equal(_nbits_dequant(b, scales, zp, 128, 4), lw.dequantize())


# ---- end to end on tiny models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, calib_file, tmp_path_factory):
    """Factory: artifacts(key, family, quantize_pass, onnx_options) -> compressed artifact with `onnx/` (cached)."""
    cache = {}

    def make(key: str, family: str, quantize: dict, onnx_options: dict | None = None):
        if key not in cache:
            recipe = small_recipe(
                calib_file,
                export=["safetensors", "onnx"],
                onnx={"accuracy_level": 0, **(onnx_options or {})},
                evaluate=None,
            )
            recipe["passes"] = [{"type": "quantize", **quantize}]
            out = tmp_path_factory.mktemp(key) / "out"
            compressor.compress(recipe, model=str(tiny_model_dir(family)), output=out, quiet=True)
            cache[key] = out
        return cache[key]

    return make


def torch_reference(path):
    """compressor.load on its pure-torch path (dequantize + float32 matmul), the reference for exact comparisons."""
    model = compressor.load(path)
    for m in model.modules():
        if hasattr(m, "use_kernels"):
            m.use_kernels = False
    return model


def check_decoder(artifact, onnx_dir=None, tol=TOL, greedy=32, session_config=EXACT):
    """Prefill + 3 decode steps (KV cache) logits vs torch, then greedy tokens identical."""
    model = torch_reference(artifact)
    lm = OnnxCausalLM(onnx_dir or artifact / "onnx", session_config=session_config)
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, past = lm.step(ids.numpy(), lm.empty_past(2), 0)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    scale = 1.0 if tol == TOL else np.abs(ref).max()
    np.testing.assert_allclose(logits, ref, atol=tol * scale, rtol=0)
    seq = ids
    for step in range(3):
        nxt = torch.full((2, 1), 11 + step)
        logits, past = lm.step(nxt.numpy(), past, seq.shape[1])
        seq = torch.cat([seq, nxt], 1)
        with torch.no_grad():
            ref = model(seq).logits[:, -1:].numpy()
        np.testing.assert_allclose(logits, ref, atol=tol * scale, rtol=0)
    if greedy:
        prompt = ids[:1]
        got = lm.generate(prompt.numpy(), greedy)
        with torch.no_grad():
            want = model.generate(prompt, max_new_tokens=greedy, min_new_tokens=greedy, do_sample=False)
        assert got.tolist() == want[:, prompt.shape[1] :].tolist()
    return lm


def onnx_initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def layer_report(artifact) -> dict:
    return json.loads((artifact / "onnx" / "onnx_export.json").read_text())["layers"]


def test_matmulnbits_w4_gptq_is_bit_identical_and_matches(artifacts):
    """llama W4 g32 GPTQ, lm_head and embeddings quantized: MatMulNBits + GatherBlockQuantized."""
    art = artifacts(
        "llama-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    onnx_file = art / "onnx" / "model.onnx"
    proto = onnx.load(str(onnx_file))
    assert proto.ir_version == 10
    assert {o.domain: o.version for o in proto.opset_import} == {"": 21, "com.microsoft": 1}
    counts = op_counts(onnx_file)
    layers = layer_report(art)
    assert counts["MatMulNBits"] == len(layers) - 1 == 22  # 3 x 7 block linears + lm_head
    assert counts["GatherBlockQuantized"] == 1
    st, inits = load_file(str(art / "model.safetensors")), onnx_initializers(onnx_file)
    scales_of = {
        n.input[0 if n.op_type == "GatherBlockQuantized" else 1]: n.input[2]
        for n in proto.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    for name, info in layers.items():  # (identical initializers, e.g. tied scales, are stored once)
        bits, k = 4, int(st[f"{name}.weight_shape"][1])
        codes = unpack_int32(st[f"{name}.weight_packed"], bits, k)
        if info["op"] == "MatMulNBits":
            b = torch.from_numpy(inits[f"model.{name}.nbits_weight"])
            scales = inits[scales_of[f"model.{name}.nbits_weight"]]
        else:
            assert info["op"] == "GatherBlockQuantized"
            data = torch.from_numpy(inits[f"model.{name}.gbq_data"])
            b = data.reshape(data.shape[0], -1, info["block_size"] * bits // 8)
            scales = inits[scales_of[f"model.{name}.gbq_data"]]
        assert torch.equal(nbits_codes(b, bits, k), codes), name  # bit-identical codes
        assert np.array_equal(scales, st[f"{name}.weight_scale"].float().numpy()), name  # fp16 scales, widened
    check_decoder(art)
    size = json.loads((art / "report.json").read_text())["size"]  # the report counts the ONNX files too
    assert size["onnx_bytes"] == sum(f.stat().st_size for f in (art / "onnx").glob("model.onnx*")) > 0
    assert f"ONNX {size['onnx_bytes'] / 1e6:.1f} MB" in (art / "summary.md").read_text()
    assert size["breakdown_bytes"]["quantized_weights"] > 0


def test_export_onnx_command_matches_recipe_export(artifacts, tmp_path):
    art = artifacts(
        "llama-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["export-onnx", str(art), str(out)])  # default accuracy_level 4
    assert result.exit_code == 0, result.output
    assert "onnx export" in result.output and "4/4" in result.output  # progress over the four stages
    a, b = onnx_initializers(out / "model.onnx"), onnx_initializers(art / "onnx" / "model.onnx")
    quant = [n for n in b if ".nbits_" in n or ".gbq_" in n]
    assert quant and all(np.array_equal(a[n], b[n]) for n in quant)
    levels = {
        at.i for n in onnx.load(str(out / "model.onnx")).graph.node for at in n.attribute if at.name == "accuracy_level"
    }
    assert levels == {4}
    check_decoder(art, onnx_dir=out, tol=0.05, greedy=0, session_config=None)
    assert (out / "tokenizer.json").is_file()
    again = CliRunner().invoke(main, ["export-onnx", str(art), str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert missing.exit_code == 2 and "config.json" in missing.output


def test_matmulnbits_int8_channel_gemma3_beyond_sliding_window(artifacts):
    """INT8 channel-wise scales become MatMulNBits blocks (lossless); greedy runs past gemma3's window of 16."""
    art = artifacts("gemma3-w8", "gemma3", {"method": "rtn", "weights": {"bits": 8, "strategy": "channel"}})
    layers = layer_report(art)
    assert {v["op"] for v in layers.values()} == {"MatMulNBits"}
    assert all(v["weight_type"] == "uint8" and "channel-wise" in v["note"] for v in layers.values())
    check_decoder(art, greedy=32)


def test_qdq_int4_asymmetric_qwen2(artifacts):
    art = artifacts(
        "qwen2-qdq",
        "qwen2",
        {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False}},
        {"format": "qdq"},
    )
    proto = onnx.load(str(art / "onnx" / "model.onnx"))
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(layer_report(art)) and not op_counts(art / "onnx" / "model.onnx")["MatMulNBits"]
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for node in dq:
        assert types[node.input[0]] == onnx.TensorProto.INT4 and types[node.input[2]] == onnx.TensorProto.INT4
        assert {a.name: a.i for a in node.attribute}["block_size"] == 32
    st, inits = load_file(str(art / "model.safetensors")), onnx_initializers(art / "onnx" / "model.onnx")
    name = "model.layers.1.mlp.down_proj"
    codes = unpack_int32(st[f"{name}.weight_packed"], 4, 160)
    assert np.array_equal(inits[f"model.{name}.qdq_int4_weight"].astype(np.int8), codes.t().numpy())
    check_decoder(art)


def test_matmulnbits_w4_qwen3_traced(artifacts):
    """qwen3 (q/k RMSNorm inside attention, head_dim 24): the traced graph, logits through the KV cache and 32 greedy
    tokens equal compressor.load's."""
    art = artifacts("qwen3-w4", "qwen3", {"method": "rtn", "weights": {"bits": 4, "group_size": 32}})
    assert json.loads((art / "onnx" / "onnx_export.json").read_text())["graph"] == "traced"
    assert op_counts(art / "onnx" / "model.onnx")["MatMulNBits"] == len(layer_report(art))
    check_decoder(art)


@pytest.mark.parametrize(
    "family,strategy", [("opt", {"strategy": "channel"}), ("gpt2", {"strategy": "block", "block_size": [32, 32]})]
)
def test_fp8_qdq(artifacts, family, strategy):
    """FP8 E4M3 weights as float8e4m3fn DequantizeLinear + MatMul (gpt2: Conv1D layers)."""
    art = artifacts(f"{family}-fp8", family, {"method": "rtn", "weights": {"format": "fp8", "bits": 8, **strategy}})
    proto = onnx.load(str(art / "onnx" / "model.onnx"))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(layer_report(art))
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT8E4M3FN for n in dq)
    st, inits = load_file(str(art / "model.safetensors")), onnx_initializers(art / "onnx" / "model.onnx")
    name = next(iter(layer_report(art)))
    assert np.array_equal(inits[f"model.{name}.qdq_q_weight"].T.view(np.uint8), st[f"{name}.weight"].view(torch.uint8))
    check_decoder(art)


def test_group_fallback_to_qdq_is_reported(artifacts):
    """INT3 has no MatMulNBits kernel: every layer falls back to DequantizeLinear (int4 container), noted per layer."""
    art = artifacts("mistral-int3", "mistral", {"method": "rtn", "weights": {"bits": 3, "group_size": 32}})
    layers = layer_report(art)
    assert all(v["op"] == "DequantizeLinear+MatMul" and v["weight_type"] == "int4" for v in layers.values())
    assert all("written as QDQ" in v["note"] for v in layers.values())
    check_decoder(art)


def test_bert_encoder(artifacts):
    art = artifacts("bert-w4", "bert", {"method": "rtn", "weights": {"bits": 4, "group_size": 32}})
    import onnxruntime as ort

    session = ort.InferenceSession(str(art / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64), "token_type_ids": np.zeros((2, 9))}
    feed["token_type_ids"] = feed["token_type_ids"].astype(np.int64)
    (hidden,) = session.run(None, feed)
    with torch.no_grad():
        ref = torch_reference(art).base_model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, ref, atol=TOL, rtol=0)


def test_external_data_above_threshold(artifacts, tmp_path, monkeypatch):
    """Weights above the threshold (1.8 GB; lowered here) go to model.onnx.data; the checker and onnxruntime read it."""
    import exporters.onnx.graph as graph

    art = artifacts("gemma3-w8", "gemma3", {"method": "rtn", "weights": {"bits": 8, "strategy": "channel"}})
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "ext"
    out.mkdir()
    files = graph.finalize(onnx.load(str(art / "onnx" / "model.onnx")), out / "model.onnx")
    assert files == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    (out / "config.json").write_text((art / "onnx" / "config.json").read_text())
    check_decoder(art, onnx_dir=out, greedy=0)


# ---- fused decoder graph (llama / mistral / qwen2 with head_dim a multiple of 16) ----------------------------


@pytest.fixture(scope="module")
def fused_artifacts(head32_model_dir, calib_file, tmp_path_factory):
    cache = {}

    def make(key: str, family: str, quantize: dict, onnx_options: dict | None = None):
        if key not in cache:
            recipe = small_recipe(
                calib_file, export=["safetensors", "onnx"], onnx={"accuracy_level": 0, **(onnx_options or {})}
            )
            recipe["evaluate"] = None
            recipe["passes"] = [{"type": "quantize", **quantize}]
            out = tmp_path_factory.mktemp(key) / "out"
            compressor.compress(recipe, model=str(head32_model_dir(family)), output=out, quiet=True)
            cache[key] = out
        return cache[key]

    return make


def test_fused_graph_is_bit_identical_and_matches_traced(fused_artifacts, tmp_path):
    """llama W4 g32 GPTQ, lm_head and embeddings quantized: q|k|v and gate|up are one MatMulNBits each, attention is
    GroupQueryAttention; each layer's rows of the fused tensors equal the artifact's codes and scales, and the logits
    equal both the traced graph's and compressor.load's."""
    art = fused_artifacts(
        "llama32-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    onnx_file = art / "onnx" / "model.onnx"
    report = json.loads((art / "onnx" / "onnx_export.json").read_text())
    assert report["graph"] == "fused"
    counts = op_counts(onnx_file)
    assert counts["MatMulNBits"] == 3 * 4 + 1 and counts["GroupQueryAttention"] == 3
    assert counts["GatherBlockQuantized"] == 1 and counts["SkipSimplifiedLayerNormalization"] == 6
    assert not counts["Softmax"] and not counts["Concat"]  # no traced attention or cache concatenation left
    layers = report["layers"]
    assert layers["model.layers.0.self_attn.k_proj"]["tensor"] == "model.model.layers.0.self_attn.qkv_proj.nbits_weight"
    assert layers["model.layers.0.self_attn.k_proj"]["rows"] == [128, 192]
    proto = onnx.load(str(onnx_file))
    st, inits = load_file(str(art / "model.safetensors")), onnx_initializers(onnx_file)
    scales_of = {
        n.input[0 if n.op_type == "GatherBlockQuantized" else 1]: n.input[2]
        for n in proto.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert len(layers) == 3 * 7 + 2
    for name, info in layers.items():
        lo, hi = info["rows"]
        k = int(st[f"{name}.weight_shape"][1])
        codes = unpack_int32(st[f"{name}.weight_packed"], 4, k)
        b = torch.from_numpy(inits[info["tensor"]])[lo:hi]
        if info["op"] == "GatherBlockQuantized":
            b = b.reshape(b.shape[0], -1, info["block_size"] * 4 // 8)
        assert torch.equal(nbits_codes(b, 4, k), codes), name
        scales = inits[scales_of[info["tensor"]]][lo:hi]
        assert np.array_equal(scales, st[f"{name}.weight_scale"].float().numpy()), name
    check_decoder(art)

    traced = tmp_path / "traced"
    result = CliRunner().invoke(
        main, ["export-onnx", str(art), str(traced), "--graph", "traced", "--accuracy-level", "0"]
    )
    assert result.exit_code == 0, result.output
    assert not op_counts(traced / "model.onnx")["GroupQueryAttention"]
    fused_lm, traced_lm = OnnxCausalLM(art / "onnx", session_config=EXACT), OnnxCausalLM(traced, session_config=EXACT)
    ids = np.random.default_rng(0).integers(5, 300, (2, 9))
    (a, pa), (b, pb) = fused_lm.step(ids, fused_lm.empty_past(2), 0), traced_lm.step(ids, traced_lm.empty_past(2), 0)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, atol=TOL, rtol=0)  # presents: same cache contract, rotary applied to keys


def test_block_size_cap_keeps_the_weights_and_logits(fused_artifacts, tmp_path):
    """`--block-size-max 16` on a g32 artifact: MatMulNBits blocks of 16 whose codes are the artifact's and whose
    scales repeat each group's twice; logits equal compressor.load's at accuracy_level 0."""
    art = fused_artifacts(
        "llama32-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    out = tmp_path / "b16"
    args = ["export-onnx", str(art), str(out), "--accuracy-level", "0", "--block-size-max", "16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "onnx_export.json").read_text())
    assert report["block_size_max"] == 16
    proto = onnx.load(str(out / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {16}
    st, inits = load_file(str(art / "model.safetensors")), onnx_initializers(out / "model.onnx")
    scales_of = {n.input[1]: n.input[2] for n in nbits}
    for name, info in report["layers"].items():
        if info["op"] != "MatMulNBits":
            continue
        assert info["block_size"] == 16 and "blocks of 16" in info["note"], name
        lo, hi = info["rows"]
        k = int(st[f"{name}.weight_shape"][1])
        b = torch.from_numpy(inits[info["tensor"]])[lo:hi]
        assert torch.equal(nbits_codes(b, 4, k), unpack_int32(st[f"{name}.weight_packed"], 4, k)), name
        want = st[f"{name}.weight_scale"].float().repeat_interleave(2, 1).numpy()
        assert np.array_equal(inits[scales_of[info["tensor"]]][lo:hi], want), name
    check_decoder(art, onnx_dir=out, greedy=8)


def test_fused_graph_asymmetric_with_biases_qwen2(fused_artifacts):
    """qwen2: q/k/v biases concatenated with the weights, asymmetric zero points packed per fused row."""
    art = fused_artifacts(
        "qwen2-32-asym", "qwen2", {"method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": False}}
    )
    assert json.loads((art / "onnx" / "onnx_export.json").read_text())["graph"] == "fused"
    proto = onnx.load(str(art / "onnx" / "model.onnx"))
    qkv = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1].endswith("qkv_proj.nbits_weight")]
    assert len(qkv) == 3 and all(len(n.input) == 6 and n.input[3] and n.input[5] for n in qkv)  # zero points, bias
    check_decoder(art)


def test_fused_graph_mixed_formats_stay_separate_mistral(fused_artifacts):
    """k_proj left float and the rest QDQ int4: nothing can share a MatMulNBits, every layer is written alone."""
    art = fused_artifacts(
        "mistral32-qdq",
        "mistral",
        {"method": "rtn", "weights": {"bits": 4, "group_size": 32}, "ignore": ["k_proj"]},
        {"format": "qdq"},
    )
    counts = op_counts(art / "onnx" / "model.onnx")
    assert counts["GroupQueryAttention"] == 3 and not counts["MatMulNBits"]
    assert counts["DequantizeLinear"] == 3 * 6 and counts["MatMul"] == 3 * 6 + 3 + 1  # + float k_proj, lm_head
    check_decoder(art)


def test_fused_graph_refused_with_a_reason(artifacts, tmp_path):
    """head_dim 24 has no GroupQueryAttention kernel on CPU: `auto` traces, `fused` is a user error."""
    art = artifacts(
        "llama-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    assert json.loads((art / "onnx" / "onnx_export.json").read_text())["graph"] == "traced"
    result = CliRunner().invoke(main, ["export-onnx", str(art), str(tmp_path / "f"), "--graph", "fused"])
    assert result.exit_code == 2 and "head_dim 24" in result.output
    assert not (tmp_path / "f").exists()


def _levels(path) -> dict[str, int]:
    """accuracy_level of each MatMulNBits node, by its weight initializer."""
    proto = onnx.load(str(path), load_external_data=False)
    return {
        n.input[1]: next(a.i for a in n.attribute if a.name == "accuracy_level")
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_accuracy_level_by_layer(fused_artifacts, tmp_path):
    """`--layer-accuracy-level`: lm_head and q|k|v at level 0 (float32 compute), the rest at 4; a pattern for every
    layer at 0 gives the float logits exactly; the report lists each layer's level."""
    art = fused_artifacts(
        "llama32-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    mixed = tmp_path / "mixed"
    args = ["export-onnx", str(art), str(mixed), "--layer-accuracy-level", "lm_head=0"]
    args += ["--layer-accuracy-level", r"self_attn\.[qkv]_proj=0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    levels = _levels(mixed / "model.onnx")
    assert levels and all(
        level == (0 if name.endswith(("lm_head.nbits_weight", "qkv_proj.nbits_weight")) else 4)
        for name, level in levels.items()
    ), levels
    report = json.loads((mixed / "onnx_export.json").read_text())
    assert report["accuracy_level_by_layer"] == {"lm_head": 0, r"self_attn\.[qkv]_proj": 0}
    assert report["layers"]["lm_head"]["accuracy_level"] == 0
    assert report["layers"]["model.layers.0.mlp.down_proj"]["accuracy_level"] == 4
    check_decoder(art, onnx_dir=mixed, tol=0.05, greedy=0, session_config=None)

    every = tmp_path / "every"
    result = CliRunner().invoke(main, ["export-onnx", str(art), str(every), "--layer-accuracy-level", ".=0"])
    assert result.exit_code == 0, result.output
    assert set(_levels(every / "model.onnx").values()) == {0}
    check_decoder(art, onnx_dir=every, greedy=8)


def test_accuracy_level_by_layer_errors(fused_artifacts, head32_model_dir, calib_file, tmp_path):
    """A pattern that matches no quantized layer, a bad regular expression or a bad level: exit 2, one message,
    no output; in a recipe the pattern is checked against the model before any pass runs."""
    art = fused_artifacts(
        "llama32-w4",
        "llama",
        {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "lm_head": True, "embeddings": True},
    )
    for item, message in [
        ("lm_haed=0", "pattern 'lm_haed' matches no quantized linear layer"),
        ("[=0", "'[' is not a regular expression"),
        ("lm_head=5", "expected PATTERN=LEVEL with LEVEL 0-4"),
    ]:
        out = tmp_path / "x"
        result = CliRunner().invoke(main, ["export-onnx", str(art), str(out), "--layer-accuracy-level", item])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
    recipe = small_recipe(
        calib_file, export=["safetensors", "onnx"], onnx={"accuracy_level_by_layer": {"o_prj": 0}}, evaluate=None
    )
    with pytest.raises(RecipeError, match="o_prj"):
        compressor.compress(recipe, model=str(head32_model_dir("llama")), output=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_export_needs_no_onnxruntime(tiny_model_dir, calib_file, tmp_path):
    """onnxruntime is an extra (`onnx` CPU, `gpu` CUDA): exporting works without it, running names the extras."""
    import subprocess
    import sys
    import textwrap

    recipe = small_recipe(calib_file, export=["safetensors", "onnx"], evaluate=None)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["onnxruntime"] = None  # import onnxruntime raises ImportError, as when it is not installed
        import compressor
        from compressor.errors import CompressorError
        from exporters.onnx.runner import OnnxCausalLM
        compressor.compress({recipe!r}, model={str(tiny_model_dir("llama"))!r}, output={str(tmp_path / "out")!r},
                            quiet=True)
        try:
            OnnxCausalLM({str(tmp_path / "out" / "onnx")!r})
        except CompressorError as err:
            print("MESSAGE", err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "onnx" / "model.onnx").is_file()
    assert "compressor[onnx]" in done.stdout and "compressor[gpu]" in done.stdout


def test_runner_prefers_cuda_where_onnxruntime_gpu_sees_one():
    from exporters.onnx.runner import default_providers

    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    cuda = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(cuda) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
