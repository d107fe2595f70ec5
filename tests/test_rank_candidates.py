"""`allocate_bits` with rank candidates (issue #29): one budget trades a matrix's rank against its bit-width.

A candidate such as 'int4 g32 rank 50%' factors the linear into B A (whitened truncation, as `lowrank` decompose)
holding half its parameters, both factors in INT4 g32; the allocation prices it by its predicted KL like any format.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import small_recipe

import compressor
from compressor.allocate import solver
from compressor.allocate.error_model import candidates_dequantized, factored_dequantized
from compressor.errors import RecipeError
from compressor.quant.lowrank import breakeven_rank, decompose
from compressor.recipe import parse_recipe
from compressor.runtime.factored import FactoredLinear
from compressor.schema import QuantizePass
from compressor.schema.allocate import RankChoice, parse_rank_candidate


def test_rank_candidate_strings():
    scheme, rank = parse_rank_candidate("int4 g64 rank 50%")
    assert (scheme.bits, scheme.group_size, rank) == (4, 64, RankChoice(share=0.5))
    assert parse_rank_candidate("keep rank 128") == (None, RankChoice(rank=128))
    assert parse_rank_candidate("int8 channel")[1] is None
    for bad in ("int4 g64 rank 0%", "int4 g64 rank 120%", "int4 g64 rank 0", "int4 g64 rank 2.5"):
        with pytest.raises(ValueError, match="rank"):
            parse_rank_candidate(bad)


def test_a_share_becomes_whole_groups_below_the_break_even_rank():
    half = RankChoice(share=0.5)
    assert half.for_shape(576, 576, 64) == 128  # 144 rounded down to whole groups of 64
    assert half.for_shape(1536, 576, 64) == 192  # 209.4 -> 192
    assert half.for_shape(40, 24, 64) == 7  # below one group and 8: kept as it is
    assert half.for_shape(64, 64, 32) == 16  # below one group: a multiple of 16
    assert RankChoice(share=0.99).for_shape(64, 64, 8) == 24  # 31.7 -> 24 < break-even 31
    assert RankChoice(rank=32).for_shape(64, 64) is None  # 32 (64 + 64) is not smaller than 64 x 64
    assert RankChoice(rank=breakeven_rank(64, 64)).for_shape(64, 64) == 31


def _allocate(candidates, budget=None, **extra):
    return {
        "type": "allocate_bits",
        "candidates": candidates,
        "budget": budget or {"bits_per_weight": 3.0},
        **extra,
    }


def test_rank_candidate_recipe_validation():
    quantize = {"type": "quantize", "method": "rtn"}
    parse_recipe({"passes": [_allocate(["int4 g32", "int4 g32 rank 50%"]), quantize]})
    refusals = {
        "at least one candidate without a rank": [_allocate(["int4 g32 rank 50%"]), quantize],
        "need method: measured": [_allocate(["int4 g32", "int4 g32 rank 50%"], method="zd"), quantize],
        "set granularity: linear": [_allocate(["int4 g32", "keep rank 8"], granularity="block"), quantize],
        "target vllm cannot load": [_allocate(["int4 g32", "int4 g32 rank 50%"], target="vllm"), quantize],
        "only a quantize pass \\(without awq\\)": [
            _allocate(["int4 g32", "int4 g32 rank 50%"]),
            {**quantize, "awq": True},
        ],
        "a lowrank pass in a recipe whose allocate_bits has rank candidates": [
            {"type": "lowrank", "rank": 4},
            _allocate(["int4 g32", "int4 g32 rank 50%"]),
            quantize,
        ],
    }
    for message, passes in refusals.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe({"passes": passes})
    with pytest.raises(RecipeError, match="give allocate_bits rank candidates"):
        decompose_pass = {"type": "lowrank", "mode": "decompose", "budget": {"params_kept": 0.8}}
        parse_recipe({"passes": [decompose_pass, _allocate(["int4 g32"]), quantize]})


@pytest.mark.parametrize("seed", range(12))
def test_solvers_never_take_a_choice_an_item_cannot_take(seed):
    """An infinite value marks a rank no rank fits; the exact solvers still find the brute-force optimum over the
    choices each item can take, greedy stays within budget, and none picks a forbidden choice."""
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 40, size=(6, 4)) * 16
    values = rng.random((6, 4)) * 10
    values[rng.random((6, 4)) < 0.3] = np.inf
    values[:, 0] = rng.random(6)  # one choice every item can take
    costs[np.isinf(values)] = 0  # (what the pass gives a rank that does not fit: it must not look cheap)
    lo = solver.cheapest_costs(costs, values).sum()
    budget = int(lo + rng.integers(0, 400))
    best = min(
        (solver.total(costs, values, np.array(c))[1], c)
        for c in itertools.product(range(4), repeat=6)
        if solver.total(costs, values, np.array(c))[0] <= budget
    )[0]
    for choice in (solver.solve_exact(costs, values, budget), solver._milp(costs, values, budget)):
        spent, value = solver.total(costs, values, choice)
        assert spent <= budget and value == pytest.approx(best, rel=1e-9)
    spent, value = solver.total(costs, values, solver.solve_greedy(costs, values, budget))
    assert spent <= budget and np.isfinite(value)


def test_a_rank_candidate_is_the_truncation_with_both_factors_quantized():
    """keep rank r: exactly the whitened truncation; int8 rank r: A quantized on H, B on A's output Gram matrix."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    x = torch.randn(500, 40, generator=g) * torch.linspace(0.1, 3.0, 40)
    h = x.T @ x / 500
    quant = QuantizePass(type="quantize", method="gptq", weights={"bits": 8, "strategy": "channel"})
    truncated = decompose(w, 12, "whitened", h, None, 0.01).delta()
    torch.testing.assert_close(factored_dequantized(w, h, 12, None, quant, "gptq", 0.01), truncated)
    f = decompose(w, 12, "whitened", h, None, 0.01)
    a = candidates_dequantized(f.down, h, [quant.weights], quant, "gptq")[0]
    b = candidates_dequantized(f.up, a @ h @ a.T, [quant.weights], quant, "gptq")[0]
    made = factored_dequantized(w, h, 12, quant.weights, quant, "gptq", 0.01)
    torch.testing.assert_close(made, b @ a)
    assert 0 < float((made - truncated).abs().max()) < 0.05 * float(truncated.abs().max())


def _plan_bits(result):
    return sum(lp.storage_bits for lp in result.plan.layers.values())


def test_ranks_and_bits_share_one_budget(tiny_model_dir, calib_file, tmp_path):
    """Under a budget below uniform INT4 the allocation factors some matrices: their factors are quantized linears
    of the candidate's format, the budget holds to the bit (factors' storage = the allocation's cost),
    compressor.load builds them (compress checked its logits against the in-memory model), and the report
    records the ranks and each unit's sensitivity (a rank no matrix can take: null)."""
    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32}, method="rtn", evaluate=None)
    candidates = ["int2 g32", "int4 g32", "int8 channel", "int4 g32 rank 50%", "int8 channel rank 25%"]
    allocate = _allocate(candidates, {"bits_per_weight": 2.6}, cache=False, check={"probes": 4, "samples": 2})
    recipe["passes"] = [allocate, *recipe["passes"]]
    out = tmp_path / "out"
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    alloc = result.report["allocation"]
    chosen = {u["name"]: u["format"] for u in alloc["units"]}
    factored = {n: f for n, f in chosen.items() if "rank" in f}
    assert factored, f"a budget this tight must factor some matrices: {chosen}"
    assert _plan_bits(result) == alloc["used_bits"] <= alloc["budget_bits"]
    ranks = json.loads((out / "config.json").read_text())["compressor_lowrank"]["layers"]
    assert set(ranks) == set(factored)
    decomposition = result.report["lowrank_decomposition"]
    assert decomposition["allocation"] == "allocate_bits" and decomposition["params_kept"] < 1
    name = next(iter(factored))
    a = result.plan.layers[f"{name}.lowrank_A"]
    assert f"{name}.lowrank_B" in result.plan.layers and name not in result.plan.layers
    assert a.fmt.bits == (4 if factored[name].startswith("int4") else 8) and a.shape[0] == ranks[name]
    model = compressor.load(out)
    assert isinstance(model.get_submodule(name), FactoredLinear)
    assert type(model.get_submodule(f"{name}.lowrank_A")).__name__ == "QuantLinear"
    assert all(p["measured_kl"] > 0 for p in alloc["check"]["probes"])
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_rank_candidates_export_matmulnbits_per_factor(head32_model_dir, calib_file, tmp_path):
    """A factored mix exported to ONNX: two MatMulNBits per factored linear; onnxruntime's logits and greedy tokens
    equal compressor.load's with the KV cache."""
    pytest.importorskip("onnxruntime")
    from test_onnx import check_decoder

    recipe = small_recipe(calib_file, {"bits": 4, "group_size": 32}, evaluate=None, export=["safetensors", "onnx"])
    recipe["onnx"] = {"accuracy_level": 0}
    allocate = _allocate(["int4 g32", "int8 channel", "int4 g32 rank 50%"], {"bits_per_weight": 3.5}, check=False)
    recipe["passes"] = [{**allocate, "cache": False}, *recipe["passes"]]
    out = tmp_path / "out"
    compressor.compress(recipe, model=str(head32_model_dir("llama")), output=out, quiet=True)
    ranks = json.loads((out / "config.json").read_text())["compressor_lowrank"]["layers"]
    assert ranks
    layers = json.loads((out / "onnx" / "onnx_export.json").read_text())["layers"]
    name = next(iter(ranks))
    assert layers[f"{name}.lowrank_A"]["op"] == layers[f"{name}.lowrank_B"]["op"] == "MatMulNBits"
    check_decoder(out, greedy=8)
