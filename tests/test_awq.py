"""Activation-aware scaling: the search, exact folding per family, and the end-to-end gain on outlier channels."""

import pytest
import torch
from conftest import small_recipe
from transformers import AutoModelForCausalLM

import compressor
from compressor.models.adapters import adapter_for
from compressor.models.folding import fold_divisor, scale_input_columns
from compressor.quant.awq import awq_search
from compressor.quant.formats import IntFormat
from compressor.quant.linalg import output_error
from compressor.quant.rtn import dequantize, rtn_quantize


def _rtn(fmt):
    def quantize(w):
        codes, scale, zero = rtn_quantize(w, fmt, "float32")
        return dequantize(codes, scale, zero, fmt.effective_group(w.shape[1]))

    return quantize


def test_search_protects_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=gen)
    x[:, :4] *= 30.0  # a few channels carry large activations
    h = x.t() @ x / x.shape[0]
    w = torch.randn(48, 64, generator=gen)
    fmt = IntFormat(3, 32, True)
    found = awq_search([w], [_rtn(fmt)], h, x.abs().mean(0), grid=20)
    assert found.alpha > 0
    assert found.error < 0.8 * found.error_unscaled
    plain = output_error(_rtn(fmt)(w) - w, h)
    assert found.error_unscaled == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "opt", "gpt2"])
def test_folding_keeps_the_float_model_exact(family, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folded = 0
    for block in adapter.blocks(model):
        for group in adapter.linear_groups:
            source = adapter.scale_source(block, group)
            if source is None:
                continue
            first = block.get_submodule(group[0])
            width = first.weight.shape[0] if type(first).__name__ == "Conv1D" else first.weight.shape[1]
            s = torch.rand(width, generator=torch.Generator().manual_seed(folded)) * 3 + 0.25
            fold_divisor(source[1], s, adapter.norm_offset(source[1]))
            for name in group:
                scale_input_columns(block.get_submodule(name), s)
            folded += 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert folded >= len(adapter.blocks(model)) * 2
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _with_outlier_channels(src, dst):
    """Same function, but the attention input has loud channels (norm weight x20, q/k/v columns / 20)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:6] *= 20.0
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, :6] /= 20.0
    model.save_pretrained(dst)
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_awq_lowers_kl_on_outlier_channels_and_loads_in_transformers(method, tiny_model_dir, calib_file, tmp_path):
    model_dir = _with_outlier_channels(tiny_model_dir("llama"), tmp_path / "loud")
    weights = {"bits": 3, "group_size": 32}
    kl = {}
    for awq in (False, True):
        recipe = small_recipe(calib_file, weights, method=method)
        recipe["passes"][0]["awq"] = awq
        recipe["evaluate"]["max_windows"] = 4
        out = tmp_path / f"out-{awq}"
        result = compressor.compress(recipe, model=str(model_dir), output=out, quiet=True)
        kl[awq] = result.metrics["kl_divergence"]
    assert result.report["awq"] and any(g["alpha"] > 0 for g in result.report["awq"])
    assert kl[True] < kl[False]
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
