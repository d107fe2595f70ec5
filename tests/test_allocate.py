"""Layer-wise bit allocation: solver exactness, budgets, sensitivity, mixed artifacts, recipe errors."""

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import small_recipe
from transformers import AutoModelForCausalLM

import compressor
from compressor.allocate import solver
from compressor.errors import RecipeError
from compressor.recipe import parse_recipe
from compressor.schema.allocate import parse_candidate

CANDIDATES = ["int2 g32", "int4 g32", "int8 channel"]
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _brute_force(costs, values, budget):
    best = (np.inf, None)
    for combo in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        c, v = solver.total(costs, values, np.array(combo))
        if c <= budget and v < best[0]:
            best = (v, combo)
    return best[0]


def _instance(rng, items=6, choices=3):
    costs = rng.integers(1, 40, size=(items, choices)) * 16
    values = rng.random((items, choices)) * 10
    lo, hi = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    return costs, values, int(rng.integers(lo, hi + 1))


@pytest.mark.parametrize("seed", range(25))
def test_exact_solvers_match_brute_force(seed):
    costs, values, budget = _instance(np.random.default_rng(seed))
    optimum = _brute_force(costs, values, budget)
    for choice in (solver.solve_exact(costs, values, budget), solver._milp(costs, values, budget)):
        spent, value = solver.total(costs, values, choice)
        assert spent <= budget
        assert value == pytest.approx(optimum, rel=1e-9, abs=1e-9)
    greedy = solver.total(costs, values, solver.solve_greedy(costs, values, budget))
    assert greedy[0] <= budget and greedy[1] >= optimum - 1e-9  # exact is never worse than greedy


def test_exact_solver_is_never_worse_than_greedy_on_larger_instances():
    rng = np.random.default_rng(1)
    for _ in range(10):
        costs, values, budget = _instance(rng, items=60, choices=4)
        exact = solver.total(costs, values, solver.solve_exact(costs, values, budget))
        greedy = solver.total(costs, values, solver.solve_greedy(costs, values, budget))
        assert exact[0] <= budget and exact[1] <= greedy[1] + 1e-9


def test_infeasible_budget_is_reported():
    with pytest.raises(solver.InfeasibleBudget):
        solver.solve_exact(np.array([[10, 20]]), np.array([[1.0, 0.0]]), 5)


def test_ordering_gives_top_items_the_largest_affordable_choice():
    costs = np.array([[4, 8]] * 4)
    choice = solver.solve_ordering(costs, np.array([2, 0, 1, 3]), budget=4 * 4 + 8)
    assert choice.tolist() == [1, 0, 1, 0]


def test_candidate_strings():
    s = parse_candidate("int3 g64 asym")
    assert (s.bits, s.group_size, s.symmetric, s.strategy) == (3, 64, False, "group")
    assert parse_candidate("int8-channel").strategy == "channel"
    assert parse_candidate("fp8 block").format == "fp8"
    assert parse_candidate("keep") is None
    with pytest.raises(ValueError):
        parse_candidate("int4 g")


def _recipe(calib_file, method="measured", budget=None, candidates=CANDIDATES, cache_dir=None, **extra):
    r = small_recipe(calib_file, {"bits": 4, "group_size": 32})
    alloc = {
        "type": "allocate_bits",
        "candidates": candidates,
        "budget": budget or {"bits_per_weight": 4.5},
        "method": method,
        "cache": cache_dir is not None,
        **extra,
    }
    if cache_dir is not None:
        alloc["cache_dir"] = str(cache_dir)
    if method == "lim":
        alloc["granularity"] = "block"
    r["passes"] = [alloc, *r["passes"]]
    return r


def _plan_bits(result):
    return sum(lp.storage_bits for lp in result.plan.layers.values())


@pytest.mark.parametrize("method", ["measured", "lim", "zd"])
def test_budget_is_respected_to_the_byte(method, tiny_model_dir, calib_file, tmp_path):
    budget_bytes = 130_000
    result = compressor.compress(
        _recipe(calib_file, method, {"size": f"{budget_bytes}B"}),
        model=str(tiny_model_dir("llama")),
        output=tmp_path / "out",
        quiet=True,
    )
    alloc = result.report["allocation"]
    assert _plan_bits(result) == alloc["used_bits"] <= budget_bytes * 8
    formats = {lp.format for lp in result.plan.layers.values()}
    assert len(formats) > 1, "a budget between the candidates must mix formats"
    # the uniform budget equals what one format everywhere would take
    uniform = compressor.compress(
        _recipe(calib_file, method, {"uniform": "int4 g32"}),
        model=str(tiny_model_dir("llama")),
        output=tmp_path / "u",
        quiet=True,
    )
    plain = compressor.compress(
        small_recipe(calib_file, {"bits": 4, "group_size": 32}),
        model=str(tiny_model_dir("llama")),
        output=tmp_path / "p",
        quiet=True,
    )
    assert uniform.report["allocation"]["budget_bits"] == _plan_bits(plain)
    assert _plan_bits(uniform) <= _plan_bits(plain)


def test_planted_fragile_layer_gets_the_most_bits(tiny_model_dir, calib_file, tmp_path):
    src = tiny_model_dir("llama")
    planted = tmp_path / "planted"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fragile = "model.layers.1.mlp.down_proj"
    with torch.no_grad():  # louder, and every 8th input column an outlier: 4-bit groups lose their small weights
        weight = model.get_submodule(fragile).weight
        weight.mul_(5.0)
        weight[:, ::8] *= 30.0
    model.save_pretrained(planted)
    for f in src.glob("tokenizer*"):
        (planted / f.name).write_bytes(f.read_bytes())
    result = compressor.compress(
        # all int4 (4.5 bits) plus room for about one down_proj at int8
        _recipe(calib_file, candidates=["int4 g32", "int8 channel"], budget={"bits_per_weight": 4.8}),
        model=str(planted),
        output=tmp_path / "out",
        quiet=True,
    )
    bits = {name: lp.bits for name, lp in result.plan.layers.items()}
    assert bits[fragile] == 8
    assert sum(b == 8 for b in bits.values()) <= 2, bits
    units = {u["name"]: u["sensitivity"]["int4 g32"] for u in result.report["allocation"]["units"]}
    assert units[fragile] == max(units.values())


def test_predicted_kl_tracks_measured_kl(tiny_model_dir, calib_file, tmp_path):
    """Lower predicted KL must come with lower real KL across budgets (same model, same data)."""
    kls = []
    for bpw in (2.6, 3.5, 5.0):
        result = compressor.compress(
            _recipe(calib_file, budget={"bits_per_weight": bpw}),
            model=str(tiny_model_dir("llama")),
            output=tmp_path / f"o{bpw}",
            quiet=True,
        )
        kls.append((result.report["allocation"]["predicted_kl"], result.metrics["kl_divergence"]))
    assert kls[0][0] > kls[1][0] > kls[2][0]
    assert kls[0][1] > kls[1][1] > kls[2][1]


def test_mixed_artifact_loads_in_transformers(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = compressor.compress(
        _recipe(
            calib_file, candidates=["int4 g32", "int8 channel", "fp8 channel", "keep"], budget={"bits_per_weight": 7}
        ),
        model=str(tiny_model_dir("llama")),
        output=out,
        quiet=True,
    )
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    used = {lp.format for lp in result.plan.layers.values()}
    assert len(used) >= 2
    assert len(qcfg["config_groups"]) == len(used)
    if any(f.startswith("fp8") for f in used):
        assert qcfg["format"] == "mixed-precision"
    kept = [u["name"] for u in result.report["allocation"]["units"] if u["format"] == "keep"]
    assert set(kept) <= set(qcfg["ignore"])
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    ids = torch.randint(0, reference.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_sensitivity_cache_makes_a_second_budget_instant(tiny_model_dir, calib_file, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    model = str(tiny_model_dir("llama"))
    compressor.compress(_recipe(calib_file, cache_dir=cache_dir), model=model, output=tmp_path / "a", quiet=True)
    assert len(list((cache_dir / "sensitivity").glob("*.json"))) == 1
    with caplog.at_level(logging.INFO, logger="compressor.passes.allocate"):
        second = compressor.compress(
            _recipe(calib_file, budget={"bits_per_weight": 3.0}, cache_dir=cache_dir),
            model=model,
            output=tmp_path / "b",
            quiet=True,
        )
    assert any("from cache" in r.message for r in caplog.records)
    assert second.report["allocation"]["used_bits_per_weight"] <= 3.0


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"candidates": ["int4 g"]}, "cannot read candidate"),
        ({"budget": {}}, "exactly one"),
        ({"budget": {"bits_per_weight": 4, "size": "1MB"}}, "exactly one"),
        ({"budget": {"bits_per_weight": 1.0}}, "below the cheapest"),
        ({"method": "lim", "granularity": "linear"}, "granularity: block"),
    ],
)
def test_bad_allocation_recipes(change, expected, tiny_model_dir, calib_file, tmp_path):
    r = _recipe(calib_file)
    r["passes"][0].update(change)
    with pytest.raises(RecipeError, match=expected):
        compressor.compress(r, model=str(tiny_model_dir("llama")), output=tmp_path / "o", quiet=True)


def test_allocation_needs_a_following_quantize_pass(tiny_model_dir, calib_file, tmp_path):
    r = _recipe(calib_file)
    r["passes"] = r["passes"][:1]
    with pytest.raises(RecipeError, match="none follows"):
        compressor.compress(r, model=str(tiny_model_dir("llama")), output=tmp_path / "o", quiet=True)


def test_search_never_ends_worse_than_its_start(tiny_model_dir, calib_file, tmp_path):
    result = compressor.compress(
        _recipe(calib_file, "search", {"bits_per_weight": 3.5}, search_seconds=3, search_samples=2),
        model=str(tiny_model_dir("llama")),
        output=tmp_path / "out",
        quiet=True,
    )
    alloc, search = result.report["allocation"], result.report["allocation_search"]
    assert alloc["used_bits"] <= alloc["budget_bits"]
    assert search["steps"] >= 1 and 0 <= search["held_out_kl"] <= search["start_kl"]


@pytest.mark.parametrize(
    "target, candidate, runs",
    [
        ("compressor", "int3 g64", True),
        ("compressor", "int2 g40 asym", True),
        ("compressor", "fp8 block", True),
        ("vllm", "int4 g128", True),
        ("vllm", "int4 g64 asym", True),
        ("vllm", "int8 channel", True),
        ("vllm", "fp8 channel", True),
        ("vllm", "int3 g64", False),  # no 3-bit weight kernel in vLLM
        ("vllm", "int4 g256", False),  # Marlin takes groups of 32, 64, 128 or channel
        ("vllm", "int8 g128 asym", False),
        ("vllm", "fp8 block", False),
        ("onnxruntime", "int2 g32", True),
        ("onnxruntime", "int4 g16 asym", True),
        ("onnxruntime", "int8 channel", True),
        ("onnxruntime", "int4 g48", False),  # MatMulNBits blocks are powers of two >= 16
        ("onnxruntime", "int3 g64", False),
        ("onnxruntime", "fp8 channel", False),
        ("llama.cpp", "int4 g32", True),  # Q4_0
        ("llama.cpp", "int4 g32 asym", True),  # Q4_1
        ("llama.cpp", "int8 g32", True),  # Q8_0
        ("llama.cpp", "int4 g64", False),
        ("llama.cpp", "int8 channel", False),
    ],
)
def test_each_target_takes_only_what_its_kernels_run(target, candidate, runs):
    data = yaml.safe_load((RECIPES_DIR / "w4-layerwise.yaml").read_text())
    data["passes"][0].update(candidates=[candidate, "keep"], target=target)
    if runs:
        assert parse_recipe(data).passes[0].runtime.name == target
    else:
        with pytest.raises(RecipeError, match=rf"passes\.0\.candidates: candidate '{candidate}' .* target {target}"):
            parse_recipe(data)


def test_auto_target_is_what_the_exports_imply():
    data = yaml.safe_load((RECIPES_DIR / "w4-layerwise.yaml").read_text())
    recipe = parse_recipe(data)
    assert recipe.passes[0].target == "auto" and recipe.passes[0].runtime.name == "compressor"
    assert "target: auto" in recipe.to_yaml()  # the dumped recipe keeps `auto`: it follows a changed export list
    data["export"] = ["safetensors", "onnx"]
    with pytest.raises(RecipeError, match="int3 g64.*no fast kernel on target onnxruntime, which takes int2/int4/int8"):
        parse_recipe(data)
    data["passes"][0]["target"] = "compressor"  # explicit: the ONNX file is a by-product
    assert parse_recipe(data).passes[0].runtime.name == "compressor"
