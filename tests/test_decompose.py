"""`lowrank` with `mode: decompose` (issue #29): the numerics of the three methods, the rank allocations under a
parameter budget, and the artifact (factored layers that compressor.load builds, `compress densify` for tools that
need a dense checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import small_recipe
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compressor
from compressor.allocate.ranks import DENSE, knapsack_ranks, share_lost, uniform_ranks
from compressor.cli import main
from compressor.errors import RecipeError
from compressor.quant.lowrank import breakeven_rank, decompose, decomposition_spectrum, refit_up
from compressor.recipe import parse_recipe
from compressor.runtime.factored import FactoredLinear


def _layer(seed: int = 0, out: int = 48, inp: int = 40, tokens: int = 600):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g) * torch.linspace(0.05, 4.0, inp)  # uneven channels, as in LLMs
    return w, x, x.T @ x / tokens


def _output_error(w, f, x) -> float:
    return float(((x @ (w - f.delta()).T) ** 2).sum())


def test_whitened_truncation_has_the_least_output_error():
    """On calibration inputs with uneven channels: whitened < asvd < plain in output error at every rank, whitened
    equals the optimum (the Eckart-Young bound of X W^T), and plain equals the truncated SVD of W itself."""
    w, x, h = _layer()
    for rank in (4, 12, 24):
        f = {m: decompose(w, rank, m, h, x.abs().mean(0), damp=1e-9) for m in ("plain", "asvd", "whitened")}
        errors = {m: _output_error(w, f[m], x) for m in f}
        assert errors["whitened"] < errors["asvd"] < errors["plain"]
        sv = torch.linalg.svdvals((x @ w.T).double())
        np.testing.assert_allclose(errors["whitened"], float(sv[rank:].square().sum()), rtol=1e-3)
        u, s, vh = torch.linalg.svd(w)
        torch.testing.assert_close(f["plain"].delta(), (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-4, rtol=1e-4)
        assert f["whitened"].down.shape == (rank, 40) and f["whitened"].up.shape == (48, rank)


def test_refit_is_the_least_squares_up_factor():
    """B = W H A^T (A H A^T)^-1 minimises the output error for a fixed A (checked against lstsq on the inputs)."""
    w, x, h = _layer(1)
    a = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    b = refit_up(w, a, h * x.shape[0], damp=0.0)
    target, feats = (x @ w.T).double(), (x @ a.T).double()
    reference = torch.linalg.lstsq(feats, target).solution.T
    torch.testing.assert_close(b.double(), reference, atol=1e-3, rtol=1e-3)


def test_uniform_ranks_keep_the_same_share_everywhere():
    shapes = {"a": (64, 64), "b": (128, 32), "c": (96, 48)}
    dense = sum(o * i for o, i in shapes.values())
    ranks = uniform_ranks(shapes, int(0.6 * dense))
    cost = sum(r * sum(shapes[n]) for n, r in ranks.items())
    assert cost <= 0.6 * dense and cost > 0.5 * dense
    shares = [ranks[n] / breakeven_rank(*shapes[n]) for n in shapes]
    assert max(shares) - min(shares) < 0.1


def test_knapsack_ranks_spend_the_budget_where_the_spectrum_is_heavy():
    """A matrix of rank 4 needs only rank 4; a flat (random) one stays dense; the budget holds."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)
    flat = torch.randn(64, 64, generator=g)
    spectra = {n: decomposition_spectrum(w, "plain", breakeven_rank(64, 64)) for n, w in (("low", low), ("flat", flat))}
    spectra = {n: share_lost(sp, breakeven_rank(64, 64)) for n, sp in spectra.items()}
    shapes = {"low": (64, 64), "flat": (64, 64)}
    budget = 64 * 64 + 8 * 128
    ranks = knapsack_ranks(shapes, spectra, budget, step=4)
    assert ranks == {"low": 4, "flat": DENSE}
    with pytest.raises(ValueError):
        knapsack_ranks(shapes, spectra, 100, step=4)  # not even the smallest ranks fit


def test_decompose_recipe_validation():
    base = {"passes": [{"type": "lowrank", "mode": "decompose"}]}
    with pytest.raises(RecipeError, match="needs a budget"):
        parse_recipe(base)
    bad = {"passes": [{"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.8, "size": "1MB"}}]}
    with pytest.raises(RecipeError, match="exactly one"):
        parse_recipe(bad)
    decompose = {"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.8}}
    parse_recipe({"passes": [decompose, {"type": "quantize", "method": "rtn"}]})  # factors quantized
    with pytest.raises(RecipeError, match="only a quantize pass"):
        parse_recipe({"passes": [decompose, {"type": "quantize", "awq": True}]})
    with pytest.raises(RecipeError, match="allocate_bits in a recipe with a lowrank decomposition"):
        parse_recipe({"passes": [{"type": "allocate_bits", "budget": {"bits_per_weight": 4.5}}, decompose]})


@pytest.mark.parametrize(
    "method, allocation",
    [
        ("whitened", "measured"),
        ("whitened", "spectrum"),
        ("plain", "uniform"),
        ("asvd", "spectrum"),
        ("plain", "welore"),
    ],
)
def test_decomposed_artifact_loads_and_densifies(method, allocation, tiny_model_dir, calib_file, tmp_path):
    """compress writes lowrank_A / lowrank_B tensors and the ranks in config.json; compressor.load builds them and
    gives the logits of the in-memory compressed model; `compress densify` writes a checkpoint transformers loads
    with the same logits; the parameter budget holds."""
    src = tiny_model_dir("llama")
    recipe = small_recipe(calib_file, evaluate=None)
    lowrank = {"type": "lowrank", "mode": "decompose", "method": method, "allocation": allocation}
    recipe["passes"] = [{**lowrank, "budget": {"params_kept": 0.7}, "rank_step": 4}]
    out = tmp_path / "out"
    compressor.compress(recipe, model=str(src), output=out, quiet=True)
    report = json.loads((out / "report.json").read_text())["lowrank_decomposition"]
    assert report["params_after"] <= report["budget_params"] <= 0.7 * report["params_before"]
    if allocation == "measured":  # predicted against measured KL on probe linears
        probes = report["check"]["probes"]
        assert len(probes) == 8 and all(p["measured_kl"] > 0 and p["predicted_kl"] > 0 for p in probes)
        assert "rank_correlation" in report["check"]
    config = json.loads((out / "config.json").read_text())
    ranks = config["compressor_lowrank"]["layers"]
    assert ranks and all(report["layers"][n]["rank"] == r for n, r in ranks.items())
    assert (out / "layers.png").is_file() and "low-rank decomposition" in (out / "summary.md").read_text()
    assert "compress densify" in (out / "README.md").read_text()  # the model card names the consumers
    name = next(iter(ranks))
    model = compressor.load(out)
    assert isinstance(model.get_submodule(name), FactoredLinear)
    assert model.get_submodule(name).lowrank_A.weight.shape[0] == ranks[name]

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # (compress itself checked that this load reproduces the in-memory compressed model)
        ours = model(input_ids=ids).logits

    dense_dir = tmp_path / "dense"
    done = CliRunner().invoke(main, ["densify", str(out), str(dense_dir)])
    assert done.exit_code == 0, done.output
    plain = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    assert "compressor_lowrank" not in json.loads((dense_dir / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("graph", ["fused", "traced"])
def test_decomposed_onnx_export_runs_in_onnxruntime(graph, head32_model_dir, calib_file, tmp_path):
    """A factored layer is two float MatMuls (B (A x) + b) in the fused and the traced graph; onnxruntime's logits
    and greedy tokens equal compressor.load's with the KV cache."""
    pytest.importorskip("onnxruntime")
    from test_onnx import check_decoder, op_counts

    recipe = small_recipe(calib_file, evaluate=None, export=["safetensors", "onnx"], onnx={"graph": graph})
    recipe["passes"] = [{"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.7}, "rank_step": 4}]
    out = tmp_path / "out"
    compressor.compress(recipe, model=str(head32_model_dir("llama")), output=out, quiet=True)
    factored = json.loads((out / "config.json").read_text())["compressor_lowrank"]["layers"]
    assert factored
    matmuls = op_counts(out / "onnx" / "model.onnx")["MatMul"]
    assert matmuls >= 2 * len(factored)
    check_decoder(out, greedy=8)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_factors_load_and_run_in_onnxruntime(method, head32_model_dir, calib_file, tmp_path):
    """decompose then quantize: each factor is its own quantized linear (GPTQ on the inputs it sees: A on the
    block's input, B on A's output), written in the compressed-tensors layout; compressor.load builds and runs it
    (compress checked it reproduces the in-memory model) and the fused ONNX graph (MatMulNBits per factor) matches."""
    pytest.importorskip("onnxruntime")
    from test_onnx import check_decoder

    recipe = small_recipe(
        calib_file, {"bits": 4, "group_size": 32}, method=method, evaluate=None, export=["safetensors", "onnx"]
    )
    recipe["onnx"] = {"accuracy_level": 0}
    decompose = {"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.7}, "rank_step": 32}
    recipe["passes"] = [decompose, *recipe["passes"]]
    out = tmp_path / "out"
    compressor.compress(recipe, model=str(head32_model_dir("llama")), output=out, quiet=True)
    config = json.loads((out / "config.json").read_text())
    factored = config["compressor_lowrank"]["layers"]
    name = next(iter(factored))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{name}.lowrank_A.weight_packed", f"{name}.lowrank_B.weight_scale"} <= keys
    model = compressor.load(out)
    assert type(model.get_submodule(f"{name}.lowrank_A")).__name__ == "QuantLinear"
    layers = json.loads((out / "onnx" / "onnx_export.json").read_text())["layers"]
    assert layers[f"{name}.lowrank_B"]["op"] == "MatMulNBits"
    check_decoder(out, greedy=8)


def test_truncation_kl_is_the_fisher_estimate_of_each_truncation():
    """The closed form over one SVD equals `predicted_kl` of the explicit rank-r error, for every method."""
    from compressor.allocate.fisher import predicted_kl
    from compressor.quant.lowrank import truncation_kl, whitening

    w, x, h = _layer(2, out=24, inp=16, tokens=400)
    grad = torch.randn(400, 24, generator=torch.Generator().manual_seed(5))
    g = grad.T @ grad / 400
    scale = h.diagonal().sqrt()
    for method in ("plain", "whitened", "asvd"):
        pred = truncation_kl(w, g, h, method, damp=1e-6, abs_mean=scale)
        s = {
            "plain": torch.eye(16),
            "whitened": whitening(h, 1e-6).float(),
            "asvd": torch.diag(scale.sqrt() / scale.sqrt().mean()),
        }[method]
        u, sv, vh = torch.linalg.svd((w @ s).double(), full_matrices=False)
        for r in (0, 5, 11, 16):
            d = w.double() - ((u[:, :r] * sv[:r]) @ vh[:r]) @ torch.linalg.inv(s.double())
            np.testing.assert_allclose(float(pred[r]), predicted_kl(g, h, d.float()), rtol=1e-4, atol=1e-6)


def test_decomposing_a_streamed_model_holds_one_block(tiny_model_dir, calib_file, tmp_path, monkeypatch, block_watch):
    """On a streamed model the factors of each decomposed block go to a spill file once the block has run (read
    back when a block is brought in): the pass, the export and the load-back check never hold two blocks or the
    whole model, and the artifact equals the one made from the model loaded whole."""
    from compressor.state import CompressionState

    recipe = small_recipe(calib_file, evaluate=None)
    recipe["passes"] = [{"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.7}, "rank_step": 4}]
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "streamed", quiet=True)
    assert block_watch.most == 1
    monkeypatch.undo()

    from compressor import api

    real = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: real(*a, **{**k, "stream": False}))
    whole_run = CompressionState.spill

    def spill(self, params):
        assert self.loaded.lazy is None  # loaded whole: nothing is spilled
        whole_run(self, params)

    monkeypatch.setattr(CompressionState, "spill", spill)
    compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=tmp_path / "whole", quiet=True)
    from safetensors.torch import load_file

    ours, theirs = (
        load_file(tmp_path / "streamed" / "model.safetensors"),
        load_file(tmp_path / "whole" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
