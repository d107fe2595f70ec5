"""Low-rank compensation of quantization error: whitened-SVD numerics, the `lowrank` pass, and its LoRA adapter
read back by transformers (PEFT integration) and compressor.load."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import small_recipe
from safetensors.torch import load_file
from test_onnx import TOL, check_decoder, op_counts, torch_reference
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

import compressor
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.eval.metrics import evaluate_windows, text_windows
from compressor.quant import lowrank
from compressor.quant.lowrank import whitened_lowrank
from compressor.runtime.load import read_tensors
from compressor.runtime.lora import LORA_DIR, read_lora
from compressor.runtime.qlinear import QuantLinear


def _problem(out_f=48, in_f=40, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) * torch.logspace(0, -2, in_f)  # correlated, uneven inputs
    x = torch.randn(tokens, in_f, generator=g) @ mix
    e = torch.randn(out_f, in_f, generator=g) * 0.1
    return e, x


def _output_error(e: torch.Tensor, x: torch.Tensor) -> float:
    return float((x.double() @ e.double().T).square().sum())


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_whitened_svd_is_the_best_rank_r_correction_on_the_inputs(rank):
    e, x = _problem()
    h = x.T @ x
    f = whitened_lowrank(e, h, rank, damp=1e-9)
    assert f.down.shape == (rank, 40) and f.up.shape == (48, rank)
    got = _output_error(e - f.delta(), x)
    # the remaining error is the sum of the dropped whitened singular values, as the factors report
    assert got == pytest.approx(f.error_after, rel=1e-3)
    assert _output_error(e, x) == pytest.approx(f.error_before, rel=1e-3)
    # better than the plain (unwhitened) truncated SVD of the error, and than any random rank-r correction
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert got < _output_error(e - plain.float(), x)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        c = torch.randn(48, rank, generator=g) @ torch.randn(rank, 40, generator=g) * 0.01
        assert got <= _output_error(e - c, x)


def test_full_rank_recovers_the_error_and_rank_is_capped():
    e, x = _problem(out_f=12, in_f=20)
    f = whitened_lowrank(e, x.T @ x, rank=64)
    assert f.rank == 12
    torch.testing.assert_close(f.delta(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_randomized_svd_of_wide_layers_is_close_to_exact(spectrum, monkeypatch):
    """Above EXACT_SVD_MAX the leading singular triplets come from a seeded randomized range finder: the energy
    it captures is close to the exact optimum, and it is deterministic (same artifact for the same recipe)."""
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX", 64)
    g = torch.Generator().manual_seed(0)
    m = torch.randn(600, 400, generator=g)
    if spectrum == "decaying":
        m = m * torch.logspace(0, -3, 400)
    u, s, vh = lowrank.top_singular(m, 16)
    best = torch.linalg.svdvals(m.double())[:16].square().sum()
    residual = m.double() - (u * s).double() @ vh.double()
    captured = float(m.double().square().sum() - residual.square().sum())  # energy the rank-16 product removes
    assert captured <= float(best) * (1 + 1e-6)
    assert captured >= float(best) * (0.97 if spectrum == "flat" else 0.999)
    u2, s2, vh2 = lowrank.top_singular(m, 16)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)


def test_rank_deficient_inputs_still_factor():
    """Fewer calibration tokens than input features: H is singular; dampening keeps the Cholesky defined."""
    e, x = _problem(tokens=10)
    f = whitened_lowrank(e, x.T @ x, rank=4)
    assert torch.isfinite(f.delta()).all() and f.error_after < f.error_before


def _lowrank_recipe(calib_file, rank=8, weights=None, **quant):
    recipe = small_recipe(calib_file, weights or {"bits": 4, "group_size": 32})
    recipe["passes"][0].update(quant)
    recipe["passes"].insert(0, {"type": "lowrank", "rank": rank})
    recipe["evaluate"]["kl"] = True
    return recipe


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _drop_corrections(model) -> None:
    for m in model.modules():
        if getattr(m, "lora_down", None) is not None:
            m.lora_down = m.lora_up = None


def _dense_reference(out, family_dir) -> torch.nn.Module:
    """A plain float model holding dequantized weights + B @ A, built from the artifact's files (no runtime)."""
    plain = compressor.load(out)  # only for its dequantized weights: rebuilt below as nn.Linear
    ref = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
    state = ref.state_dict()
    lora = read_lora(out)
    for name, module in plain.named_modules():
        if type(module) is QuantLinear:
            w = module.dequantized_weight().float()
            if name in lora:
                down, up = lora[name]
                w = w + up @ down
            state[f"{name}.weight"] = w
    for key, t in read_tensors(out).items():
        compressed = key.endswith(".weight_scale") or t.dtype == torch.float8_e4m3fn
        if key in state and t.is_floating_point() and not compressed:
            state[key] = t.float()
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_compensated_artifact_loads_in_transformers_with_its_adapter(family, tiny_model_dir, calib_file, tmp_path):
    src = tiny_model_dir(family)
    plain = compressor.compress(small_recipe(calib_file), model=str(src), output=tmp_path / "plain", quiet=True)
    out = tmp_path / "out"
    result = compressor.compress(_lowrank_recipe(calib_file), model=str(src), output=out, quiet=True)

    # every quantized block linear got a rank-8 correction that removes part of its output error
    fits = result.report["lowrank"]
    assert {f["layer"] for f in fits} == set(result.plan.layers)
    assert all(f["rank"] == 8 and 0 < f["error_removed"] < 1 for f in fits)
    assert all(lp.compensation_rank == 8 for lp in result.plan.layers.values())
    # the codes are GPTQ's on the same statistics: compensation changes nothing in the compressed weights
    assert (
        load_file(str(out / "model.safetensors")).keys() == load_file(str(tmp_path / "plain/model.safetensors")).keys()
    )
    # ... and the adapter brings the artifact closer to the base model (same codes with and without it; comparing
    # against the plain run instead would mix in GPTQ's different path through corrected upstream outputs)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    windows = text_windows(AutoTokenizer.from_pretrained(src), calib_file.read_text(), 32, 8)
    corrected = compressor.load(out)
    kl_with = evaluate_windows(corrected, windows, base, 4, quiet=True)["kl_divergence"]
    _drop_corrections(corrected)
    assert kl_with < 0.9 * evaluate_windows(corrected, windows, base, 4, quiet=True)["kl_divergence"]

    config = json.loads((out / LORA_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(result.plan.layers)

    ours = compressor.load(out)
    vocab = ours.config.vocab_size
    # compressor.load = dequantized weights + B @ A, rebuilt independently from the files
    torch.testing.assert_close(_logits(ours, vocab), _logits(_dense_reference(out, src), vocab), rtol=1e-4, atol=1e-4)

    # transformers: compressed-tensors (dequantized on load) + the PEFT adapter
    hf = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    without = _logits(hf, vocab)
    hf.load_adapter(str(out / LORA_DIR))
    with_adapter = _logits(hf, vocab)
    torch.testing.assert_close(with_adapter, _logits(ours, vocab), rtol=1e-3, atol=2e-3)
    assert (with_adapter - without).abs().max() > 10 * 2e-3  # the adapter is not a no-op

    # size: the adapter's bytes are their own part and count in bits per weight
    size = result.report["size"]
    lora_bytes = sum(
        t.numel() * t.element_size() for t in load_file(str(out / LORA_DIR / "adapter_model.safetensors")).values()
    )
    assert size["breakdown_bytes"]["lowrank_compensation"] == lora_bytes
    extra = size["compensation_bits_per_weight"]
    assert extra == pytest.approx(lora_bytes * 8 / size["quantized_params"])
    assert size["quantized_bits_per_weight"] == pytest.approx(plain.report["size"]["quantized_bits_per_weight"] + extra)
    summary = (out / "summary.md").read_text()
    assert "low-rank compensation: rank 8" in summary and "lora/" in summary
    assert 'model.load_adapter(f"{path}/lora")' in (out / "README.md").read_text()


def test_compensation_follows_activation_scaling_and_rtn(tiny_model_dir, calib_file, tmp_path):
    """AWQ rescales already-quantized source layers (v_proj, up_proj): their corrections must follow."""
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    recipe = _lowrank_recipe(calib_file, rank=4, method="rtn", awq=True)
    result = compressor.compress(recipe, model=str(src), output=out, quiet=True)
    assert any(g["alpha"] > 0 for g in result.report["awq"])
    ours = compressor.load(out)
    vocab = ours.config.vocab_size
    torch.testing.assert_close(_logits(ours, vocab), _logits(_dense_reference(out, src), vocab), rtol=1e-4, atol=1e-4)


def test_fp8_and_targets(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    recipe = _lowrank_recipe(
        calib_file, rank=4, weights={"format": "fp8", "bits": 8, "strategy": "channel"}, method="rtn"
    )
    recipe["passes"][0]["targets"] = [r"mlp\.down_proj$"]
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    corrected = {f["layer"] for f in result.report["lowrank"]}
    assert corrected and all(n.endswith("mlp.down_proj") for n in corrected)
    assert set(read_lora(out)) == corrected
    src = tiny_model_dir("llama")
    ours = compressor.load(out)
    vocab = ours.config.vocab_size
    torch.testing.assert_close(_logits(ours, vocab), _logits(_dense_reference(out, src), vocab), rtol=1e-4, atol=1e-4)


def test_same_recipe_gives_identical_adapter(tiny_model_dir, calib_file, tmp_path):
    src = str(tiny_model_dir("qwen3"))
    recipe = _lowrank_recipe(calib_file, rank=4)
    for name in ("a", "b"):
        compressor.compress(recipe, model=src, output=tmp_path / name, quiet=True)
    digest = [
        hashlib.sha256((tmp_path / n / LORA_DIR / "adapter_model.safetensors").read_bytes()).hexdigest() for n in "ab"
    ]
    assert digest[0] == digest[1]


def test_lowrank_without_a_following_quantize_is_a_recipe_error(tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file)
    recipe["passes"] = [{"type": "lowrank", "rank": 4}]
    with pytest.raises(RecipeError, match="add a `- type: quantize` pass after lowrank"):
        compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_bad_targets_regex_names_the_field(calib_file):
    recipe = small_recipe(calib_file)
    recipe["passes"].insert(0, {"type": "lowrank", "targets": ["("]})
    with pytest.raises(RecipeError, match="passes.0.targets"):
        compressor.api.resolve_recipe(recipe, None, None, None)


def test_streamed_weights_come_back_with_their_correction(tiny_model_dir, calib_file):
    """Quantized weights are released during the sweep; the model evaluated afterwards must hold W_q + B A."""
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.models.loading import load_model, max_positions
    from compressor.pipeline import run_passes
    from compressor.recipe import parse_recipe
    from compressor.state import CompressionState

    recipe = parse_recipe(_lowrank_recipe(calib_file, rank=4))
    loaded = load_model(str(tiny_model_dir("llama")), stream=True)
    assert loaded.lazy is not None
    state = CompressionState(loaded, recipe, quiet=True)
    state.calibration_ids = sample_windows(
        loaded.tokenizer, read_texts(recipe.calibration), recipe.calibration, max_positions(loaded.model.config)
    )
    run_passes(state)
    model = state.full_model()
    assert state.plan.compensations.keys() == state.plan.layers.keys()
    for name in state.plan.layers:
        w = model.get_submodule(name).weight
        torch.testing.assert_close(w, state.plan.effective_weight(name), rtol=0, atol=0)
        assert not torch.equal(w, state.plan.weights[name].dequantize())


def test_allocate_ranks_prefers_the_largest_share_per_stored_number():
    from compressor.quant.lowrank import ErrorSpectrum, allocate_ranks

    spectra = {
        # a: error concentrated in few directions; b: flat; c: cheap per rank (narrow layer)
        "a": ErrorSpectrum(torch.tensor([8.0, 1.0, 0.5, 0.5], dtype=torch.float64), 10.0, 100),
        "b": ErrorSpectrum(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64), 10.0, 100),
        "c": ErrorSpectrum(torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64), 10.0, 50),
    }
    assert allocate_ranks(spectra, 0) == {"a": 0, "b": 0, "c": 0}
    assert allocate_ranks(spectra, 100) == {"a": 1, "b": 0, "c": 0}  # 0.8 / 100 beats 0.2 / 50
    assert allocate_ranks(spectra, 300) == {"a": 1, "b": 0, "c": 4}  # then c's 0.2 / 50 units
    ranks = allocate_ranks(spectra, 10_000)
    assert ranks == {"a": 4, "b": 4, "c": 4}  # everything fits: every unit taken
    # never over the budget, and a budget between unit sizes is filled by smaller units
    for budget in range(0, 1300, 37):
        r = allocate_ranks(spectra, budget)
        assert sum(r[n] * spectra[n].cost for n in r) <= budget


def test_budget_allocates_ranks_and_meets_it(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    recipe = _lowrank_recipe(calib_file)
    recipe["passes"][0].update(budget_bits_per_weight=2.0, max_rank=16)
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    alloc = result.report["lowrank_allocation"]
    ranks = alloc["ranks"]
    assert set(ranks) == set(result.plan.layers) and max(ranks.values()) <= 16
    assert len(set(ranks.values())) > 1  # not uniform
    assert 0.9 * 2.0 <= alloc["used_bits_per_weight"] <= 2.0
    # the quantize pass fitted exactly those ranks, and the artifact counts them
    fitted = {f["layer"]: f["rank"] for f in result.report["lowrank"]}
    assert fitted == {n: r for n, r in ranks.items() if r}
    assert result.report["size"]["compensation_bits_per_weight"] == pytest.approx(alloc["used_bits_per_weight"])
    config = json.loads((out / LORA_DIR / "adapter_config.json").read_text())
    assert all(config["rank_pattern"].get(n, config["r"]) == r for n, r in fitted.items())
    src = tiny_model_dir("llama")
    ours = compressor.load(out)
    vocab = ours.config.vocab_size
    torch.testing.assert_close(_logits(ours, vocab), _logits(_dense_reference(out, src), vocab), rtol=1e-4, atol=1e-4)
    assert "allocated under 2 bits/weight" in (out / "summary.md").read_text()
    # PEFT builds each layer at its own rank (rank_pattern) and gives the logits compressor.load gives
    hf = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    hf.load_adapter(str(out / LORA_DIR))
    torch.testing.assert_close(_logits(hf, vocab), _logits(ours, vocab), rtol=1e-3, atol=2e-3)


@pytest.mark.filterwarnings("ignore")
def test_lowrank_compensation_in_fused_and_traced_graphs(head32_model_dir, calib_file, tmp_path):
    """A `lowrank` correction becomes float MatMuls beside MatMulNBits: one into the fused members' stacked ranks,
    split, each member's up factor, concatenated and added. Both graphs match compressor.load (which applies the
    LoRA adapter) at accuracy_level 0, prefill and decode."""
    recipe = small_recipe(calib_file, export=["safetensors", "onnx"], onnx={"accuracy_level": 0})
    recipe["evaluate"] = None
    recipe["passes"] = [
        {"type": "lowrank", "rank": 4},
        {"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32}},
    ]
    out = tmp_path / "out"
    compressor.compress(recipe, model=str(head32_model_dir("llama")), output=out, quiet=True)
    report = json.loads((out / "onnx" / "onnx_export.json").read_text())
    assert report["graph"] == "fused"
    assert len(report["layers"]) == 3 * 7 and all(v["correction_rank"] == 4 for v in report["layers"].values())
    counts = op_counts(out / "onnx" / "model.onnx")
    # per block: q|k|v one down MatMul + 3 up, o 2, gate|up 1 + 2, down 2; plus the float lm_head
    assert counts["MatMulNBits"] == 3 * 4 and counts["MatMul"] == 3 * 11 + 1
    check_decoder(out)

    # the correction is not negligible at this tolerance: without it the logits move well past it
    model = torch_reference(out)
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        corrected = model(ids).logits
        for m in model.modules():
            if getattr(m, "lora_down", None) is not None:
                m.lora_down = m.lora_up = None
        assert (model(ids).logits - corrected).abs().max() > 100 * TOL

    traced = tmp_path / "traced"
    result = CliRunner().invoke(
        main, ["export-onnx", str(out), str(traced), "--graph", "traced", "--accuracy-level", "0"]
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((traced / "onnx_export.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]["correction_rank"]
        == 4
    )
    check_decoder(out, traced)
