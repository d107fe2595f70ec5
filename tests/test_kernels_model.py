"""compressor.load on tiny compressed models: QuantLinear through the C++ ops gives the logits of the dequantized
model (dequantize-then-matmul; that dequantization is checked bit-exactly against compressed-tensors in
test_artifact.py, and test_artifact's logit comparisons against transformers now run through these ops too), and
the pure-torch fallback is used, and announced once, when the extension is missing."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from conftest import small_recipe

import compressor
from compressor.runtime import QuantLinear, _ext
from compressor.runtime.ops import MODE_FLOAT

if os.environ.get("COMPRESSOR_NO_EXT") == "1":
    pytest.skip("extension disabled by COMPRESSOR_NO_EXT=1", allow_module_level=True)

WEIGHTS = {
    "w4-g32-sym": {"bits": 4, "group_size": 32},
    "w4-g64-asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "w8-channel": {"bits": 8, "strategy": "channel"},
    "w3-g32-sym": {"bits": 3, "group_size": 32},  # INT2/INT3 have kernels too: no layer dequantizes per call
    "w2-g64-asym": {"bits": 2, "group_size": 64, "symmetric": False},
    "fp8-block": {"format": "fp8", "bits": 8, "strategy": "block", "block_size": [32, 32]},
}


@pytest.fixture(scope="module", params=list(WEIGHTS))
def artifact(request, tiny_model_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    recipe = small_recipe(calib_file, WEIGHTS[request.param], method="rtn")
    recipe["evaluate"] = None
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quant_linears(model) -> list[QuantLinear]:
    return [m for m in model.modules() if type(m) is QuantLinear]


@pytest.mark.parametrize("isa", _ext.available_isas())
def test_loaded_model_matches_dequantized_model(artifact, isa):
    previous = _ext.set_isa(isa)
    try:
        reference = compressor.load(artifact)
        for m in _quant_linears(reference):
            m.use_kernels = False
        ours = compressor.load(artifact, activations="int8-decode")
        layers = _quant_linears(ours)
        assert layers
        prefill = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))  # M = 40: GEMM
        decode = prefill[:1, :1]  # M = 1: GEMV (int8 activations by default for int weights)
        torch.testing.assert_close(_logits(ours, prefill), _logits(reference, prefill), rtol=1e-4, atol=1e-4)
        assert all(m.packed_weight() is not None for m in layers)  # the kernels ran, not the fallback
        torch.testing.assert_close(_logits(ours, decode), _logits(reference, decode), rtol=5e-2, atol=5e-2)
        for m in layers:
            m.kernel_mode = MODE_FLOAT
        torch.testing.assert_close(_logits(ours, decode), _logits(reference, decode), rtol=1e-4, atol=1e-4)
    finally:
        _ext.set_isa(previous)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.kernels_for(torch.device("cuda"))),
    reason="needs a CUDA device and the extension built against a CUDA torch",
)
def test_loaded_model_on_cuda_matches_cpu(artifact):
    """model.to("cuda") repacks on the GPU and runs the CUDA ops: decode (GEMV, float32) as on CPU; prefill (WMMA on
    fp16-rounded operands) within what that rounding moves the logits (an emulation on CPU: at most 4.6e-4 of
    logits up to 1.2 for these four artifacts)."""
    reference = compressor.load(artifact)  # CPU kernels, float32 activations
    ours = compressor.load(artifact).to("cuda")
    prefill = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    decode = prefill[:1, :1]
    torch.testing.assert_close(_logits(ours, decode.cuda()).cpu(), _logits(reference, decode), rtol=1e-4, atol=1e-4)
    assert all(m.packed_weight() is not None and m.packed_weight().w.is_cuda for m in _quant_linears(ours))
    torch.testing.assert_close(_logits(ours, prefill.cuda()).cpu(), _logits(reference, prefill), rtol=1e-2, atol=3e-3)


def test_dtype_conversion_keeps_the_compressed_tensors(artifact):
    """model.to(torch.bfloat16) converts the float tensors it owns (norms, embeddings, biases) but must not cast
    the compressed ones: an FP8 weight turned bfloat16 could not be repacked, and rounded scales would change the
    quantized model. The bfloat16 model then runs through the kernels, close to the float32 logits."""
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    model = compressor.load(artifact)
    reference = _logits(model, ids)

    def compressed_dtypes():
        return {
            (name, key): t.dtype
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear)
            for key, t in m.named_buffers()
        }

    before = compressed_dtypes()
    model.to(torch.bfloat16)
    assert compressed_dtypes() == before
    assert all(m.packed_weight() is not None for m in _quant_linears(model))
    logits = _logits(model, ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=3e-2, atol=3e-2)


def test_loaded_model_compiles_in_one_graph(artifact):
    """compressor.load makes the kernel layout (and a move remakes it at once), and the ops have fake kernels, so
    torch.compile traces a loaded model in one graph; with the same kernels (aot_eager) the logits are the eager
    ones."""
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    model = compressor.load(artifact).float()  # .float(): a move, which remakes the kernel layout
    reference = _logits(model, ids)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    torch.testing.assert_close(_logits(torch.compile(model, backend="aot_eager"), ids), reference, rtol=0, atol=1e-6)


def test_fallback_without_extension_is_announced_once(artifact, monkeypatch, caplog):
    if "asym" not in artifact.parent.name:
        pytest.skip("one artifact is enough")
    reference = compressor.load(artifact)  # kernels (float32 accumulation) vs the fallback
    _ext.extension_available.cache_clear()
    try:
        with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="compressor.runtime"):
            mp.setitem(sys.modules, "compressor._C", None)  # import now fails like an unbuilt extension
            ours = compressor.load(artifact)
            ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
            got = _logits(ours, ids)
            _logits(ours, ids)
            assert all(m.packed_weight() is None for m in _quant_linears(ours))
    finally:
        _ext.extension_available.cache_clear()
    assert sum("pure-torch fallback" in r.getMessage() for r in caplog.records) == 1
    for m in _quant_linears(reference):
        m.kernel_mode = MODE_FLOAT
    torch.testing.assert_close(got, _logits(reference, ids), rtol=1e-4, atol=1e-4)
    assert all(m.packed_weight() is not None for m in _quant_linears(reference))


def test_load_rejects_unknown_activation_mode(artifact):
    if "sym" not in artifact.parent.name or "asym" in artifact.parent.name:
        pytest.skip("one artifact is enough")
    with pytest.raises(ValueError, match="int8-decode"):
        compressor.load(artifact, activations="int4")
    assert all(m.kernel_mode == MODE_FLOAT for m in _quant_linears(compressor.load(artifact)))


def test_siblings_share_one_kernel_call_with_identical_outputs(artifact, monkeypatch):
    """q|k|v and gate|up of a block (same input, same format) run as one kernel call after compressor.load: 4 calls
    per llama block instead of 7, with bit-identical logits (eager), and each layer still runs alone (torch.compile,
    or after a move)."""
    from compressor.runtime import qlinear, siblings

    mode = "float" if "fp8" in artifact.parent.name else "int8-decode"
    fused = compressor.load(artifact, activations=mode)
    plain = compressor.load(artifact, activations=mode, fuse_siblings=False)
    joined = [m for m in _quant_linears(fused) if m._siblings is not None]
    assert len(joined) == 5 * len(fused.model.layers)
    calls = []
    for module in (qlinear, siblings):
        monkeypatch.setattr(module, "packed_matmul", lambda *a, f=module.packed_matmul: calls.append(1) or f(*a))
    prefill = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    for ids in (prefill, prefill[:1, :1]):
        calls.clear()
        assert torch.equal(_logits(fused, ids), _logits(plain, ids))
        assert len(calls) == 4 * len(fused.model.layers) + 7 * len(plain.model.layers)
    with torch.no_grad():
        generated = [m.generate(prefill[:1, :5], max_new_tokens=6, do_sample=False) for m in (fused, plain)]
    assert torch.equal(*generated)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(input_ids=prefill)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    fused.float()  # a move: every layer remakes its own kernel weight and runs alone
    assert all(m._siblings is None for m in _quant_linears(fused))
    assert torch.equal(_logits(fused, prefill), _logits(plain, prefill))


def test_siblings_share_the_correction_down_product(artifact):
    """Low-rank corrections of joined siblings: one product by the stacked downs serves the group, each adds its
    own up; the logits are those of each layer corrected alone, also after a correction is replaced or dropped."""
    from compressor.models.adapters import adapter_for
    from compressor.runtime.load import join_siblings

    if "w4-g32" not in artifact.parent.name:
        pytest.skip("one artifact is enough")
    models = [compressor.load(artifact, fuse_siblings=False) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    for layers in zip(*(_quant_linears(m) for m in models)):
        down = torch.randn(4, layers[0].in_features, generator=gen) * 0.05
        up = torch.randn(layers[0].out_features, 4, generator=gen) * 0.05
        for m in layers:
            m.attach_correction(down, up)
    fused, plain = models
    assert join_siblings(fused, adapter_for(fused.config.model_type)) == 2 * len(fused.model.layers)
    ids = torch.randint(0, 300, (2, 20), generator=gen)
    for step in ("joined", "replaced", "dropped"):
        if step != "joined":
            for m in (fused, plain):
                k = m.model.layers[0].self_attn.k_proj
                if step == "replaced":
                    k.attach_correction(torch.ones(2, k.in_features) * 0.01, torch.ones(k.out_features, 2) * 0.01)
                else:
                    k.lora_down = k.lora_up = None
        torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)
