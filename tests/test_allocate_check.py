"""`allocate_bits.check`: the sensitivity model ranked against measured end-to-end KL, and the uniform fallback."""

import logging
from pathlib import Path

import pytest
import torch
from conftest import small_recipe
from transformers import AutoModelForCausalLM

import compressor
from compressor.allocate.check import choose_safe_allocation, compare_uniform, pick_probes, rank_correlation
from compressor.allocate.error_model import swap_in_data_free
from compressor.allocate.heldout import HeldOutKL, held_out_rows
from compressor.calibration.data import read_texts, sample_windows
from compressor.errors import RecipeError
from compressor.models.loading import load_model, max_positions
from compressor.passes.allocate import AllocateBitsRunner
from compressor.recipe import parse_recipe
from compressor.state import CompressionState

CANDIDATES = ["int2 g32", "int4 g32", "int8 channel"]
LINEARS = 21  # the tiny llama: 3 blocks x 7 linears


def _recipe(
    calib_file, method="measured", budget=None, candidates=CANDIDATES, cache_dir=None, quant_method="gptq", **extra
):
    r = small_recipe(calib_file, {"bits": 4, "group_size": 32}, method=quant_method)
    alloc = {
        "type": "allocate_bits",
        "candidates": candidates,
        "budget": budget or {"bits_per_weight": 4.5},
        "method": method,
        "cache": cache_dir is not None,
        **({"cache_dir": str(cache_dir)} if cache_dir is not None else {}),
        **extra,
    }
    r["passes"] = [alloc, *r["passes"]]
    return r


def _compress(recipe, model_dir, out):
    return compressor.compress(recipe, model=str(model_dir), output=out, quiet=True)


def test_probes_spread_over_kinds_and_depth():
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = [f"model.layers.{b}.x.{k}" for b in range(30) for k in kinds]
    picked = pick_probes(names, 16)
    assert len(set(picked)) == 16 and picked == sorted(picked)
    picked_kinds = [names[i].rsplit(".", 1)[-1] for i in picked]
    assert all(picked_kinds.count(k) >= 2 for k in kinds)
    blocks = [int(names[i].split(".")[2]) for i in picked]
    assert min(blocks) <= 2 and max(blocks) >= 27
    assert pick_probes(names, 16) == picked  # deterministic
    assert pick_probes(names[:5], 16) == list(range(5))


def test_rank_correlation_and_its_undefined_cases():
    assert rank_correlation([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert rank_correlation([1.0], [2.0]) is None


def test_safe_allocation_takes_uniform_only_when_it_measures_lower():
    assert choose_safe_allocation(0.5, {"int3 g64": 0.9, "int4 g128": 0.4, "int4 g64": 0.3}) == "int4 g64"
    assert choose_safe_allocation(0.2, {"int3 g64": 0.9, "int4 g128": 0.4}) is None
    assert choose_safe_allocation(0.4, {"int4 g128": 0.4}) is None  # a tie keeps the mix
    assert choose_safe_allocation(0.4, {}) is None  # no uniform allocation fits the budget


def test_check_reports_rank_correlation_and_the_uniform_comparison(tiny_model_dir, calib_file, tmp_path, caplog):
    recipe = _recipe(calib_file, check={"probes": 6, "samples": 2, "min_rank_correlation": 1.0})
    with caplog.at_level(logging.WARNING, logger="compressor.passes.allocate"):
        result = _compress(recipe, tiny_model_dir("llama"), tmp_path / "out")
    alloc = result.report["allocation"]
    check, fallback = alloc["check"], alloc["fallback"]
    assert -1.0 <= check["rank_correlation"] <= 1.0
    assert len(check["probes"]) == 6 and check["samples"] == 2 and check["cached"] is False
    for pair in check["probes"]:
        assert pair["candidate"] == "int2 g32"  # the cheapest candidate
        assert pair["predicted_kl"] > 0 and pair["measured_kl"] > 0
    if check["rank_correlation"] < 1.0:  # a perfect ranking of 6 pairs would pass even this floor
        assert check["passed"] is False
        assert any("Spearman" in r.message and "method: search" in r.message for r in caplog.records)
    # 4.5 bits/weight: uniform int2 g32 and int4 g32 fit, int8 channel does not
    assert set(fallback["uniform"]) == {"int2 g32", "int4 g32"}
    assert fallback["used"] is (fallback["candidate"] is not None)
    assert fallback["mix_kl"] >= 0 and fallback["weights"] == "gptq" and fallback["samples"] == 2


def test_check_false_skips_the_checks(tiny_model_dir, calib_file, tmp_path):
    result = _compress(_recipe(calib_file, check=False), tiny_model_dir("llama"), tmp_path / "out")
    assert "check" not in result.report["allocation"] and "fallback" not in result.report["allocation"]


def test_check_settings_in_the_recipe(calib_file):
    def check_of(value):
        return parse_recipe(_recipe(calib_file, check=value)).passes[0].check

    assert check_of(None) is None and check_of(False) is None
    assert check_of(True).probes == 16 and check_of(True).min_rank_correlation == 0.5
    assert check_of({"probes": 0}).fallback is True  # no rank check, the uniform comparison still runs
    with pytest.raises(RecipeError, match="at least 2 probes"):
        check_of({"probes": 1})
    with pytest.raises(RecipeError, match="unknown key .passes.0.check.probe"):
        check_of({"probe": 4})


LOUD_CANDIDATES = ["int2 g32", "int3 g32", "int4 g32"]


@pytest.fixture
def loud_channel_model(tiny_model_dir, tmp_path):
    """Factory: the tiny llama with one hidden channel `strength`x louder for every token (as real decoders'
    "massive activations") and one output row of the first down_proj as loud."""

    def make(strength: float) -> Path:
        src = tiny_model_dir("llama")
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 3] *= strength
            model.model.layers[0].mlp.down_proj.weight[5, :] *= strength
        folder = tmp_path / f"loud{strength:g}"
        model.save_pretrained(folder)
        for f in src.glob("tokenizer*"):
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    return make


def _held_out(recipe: dict, model_dir: Path, samples: int):
    """The unquantized model, its adapter and the fallback's held-out windows, as the pass picks them."""
    r = parse_recipe(recipe)
    loaded = load_model(str(model_dir))
    ids = sample_windows(loaded.tokenizer, read_texts(r.calibration), r.calibration, max_positions(loaded.model.config))
    return r, loaded, held_out_rows(ids, r.passes[0].num_samples, samples)


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1)


def test_fallback_measures_the_mix_as_gptq_quantizes_it(loud_channel_model, calib_file, tmp_path):
    """With a 1000x channel, RTN weights make uniform INT3 look 3x better than the GPTQ-chosen mix; the quantize
    pass's GPTQ makes the mix 4x better. The fallback solves as the quantize pass does, so it keeps the mix."""
    model_dir = loud_channel_model(1000)
    recipe = _recipe(calib_file, budget={"uniform": "int3 g32"}, candidates=LOUD_CANDIDATES, check={"probes": 0})
    result = _compress(recipe, model_dir, tmp_path / "out")
    fallback = result.report["allocation"]["fallback"]
    assert fallback["weights"] == "gptq" and fallback["used"] is False
    assert fallback["mix_kl"] < fallback["uniform"]["int3 g32"]
    r, loaded, held = _held_out(recipe, model_dir, fallback["samples"])
    # fewer calibration rows than num_samples: the fallback solved on the quantize pass's own windows, so the
    # mix it measured is the artifact's
    base, quantized = _log_probs(loaded.model, held), _log_probs(compressor.load(str(result.path)), held)
    assert float((base.exp() * (base - quantized)).sum(-1).mean()) == pytest.approx(fallback["mix_kl"], rel=1e-3)
    # the same mix compared with min-max RTN weights (the quantize pass's method ignored) loses to uniform INT3
    # (RTN with MSE clipping, the default since #32, happens to rank these two right)
    labels = r.passes[0].candidates
    mix = {u["name"]: labels.index(u["format"]) for u in result.report["allocation"]["units"]}
    with HeldOutKL(loaded.model, loaded.adapter, list(mix), held) as measure:
        schemes, quant = r.passes[0].schemes(), r.passes[1].model_copy(update={"clip_search": False})
        swap_in = lambda c: swap_in_data_free(measure, c, schemes, quant)  # noqa: E731
        rtn = compare_uniform(measure, swap_in, mix, {"int3 g32": labels.index("int3 g32")}, "rtn")
    assert rtn["used"] is True and rtn["uniform"]["int3 g32"] < rtn["mix_kl"]


def test_fallback_replaces_a_mix_that_loses_to_uniform(loud_channel_model, calib_file, tmp_path, caplog):
    """At 300x with RTN quantization (error model rtn: the data-free comparison) uniform INT3 beats the mix."""
    model_dir = loud_channel_model(300)
    recipe = _recipe(calib_file, budget={"uniform": "int3 g32"}, candidates=LOUD_CANDIDATES, quant_method="rtn")
    with caplog.at_level(logging.WARNING, logger="compressor.passes.allocate"):
        result = _compress(recipe, model_dir, tmp_path / "out")
    fallback = result.report["allocation"]["fallback"]
    assert fallback["weights"] == "rtn"
    assert fallback["used"] is True and fallback["candidate"] == "int3 g32"
    assert fallback["uniform"]["int3 g32"] < fallback["mix_kl"]
    assert {u["format"] for u in result.report["allocation"]["units"]} == {"int3 g32"}
    assert {(lp.bits, lp.group_size) for lp in result.plan.layers.values()} == {(3, 32)}
    assert any("using it instead of the mix" in r.message and "int3 g32" in r.message for r in caplog.records)
    # fallback: false measures and reports the same comparison and keeps the mix
    recipe["passes"][0]["check"] = {"fallback": False}
    kept = _compress(recipe, model_dir, tmp_path / "kept")
    assert kept.report["allocation"]["fallback"]["mix_kl"] == pytest.approx(fallback["mix_kl"])
    assert kept.report["allocation"]["fallback"]["used"] is False
    assert "kept the mix" in kept.report["allocation"]["fallback"]["reason"]
    assert len({u["format"] for u in kept.report["allocation"]["units"]}) > 1


def test_cache_serves_the_check_with_the_sensitivities(tiny_model_dir, calib_file, tmp_path, caplog):
    cache_dir, model = tmp_path / "cache", tiny_model_dir("llama")
    first = _compress(_recipe(calib_file, cache_dir=cache_dir, check={"probes": 4}), model, tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="compressor.passes.allocate"):
        second = _compress(_recipe(calib_file, cache_dir=cache_dir, check={"probes": 4}), model, tmp_path / "b")
    assert any("from cache" in r.message for r in caplog.records)
    before, after = first.report["allocation"]["check"], second.report["allocation"]["check"]
    assert after["cached"] is True and after["probes"] == before["probes"]
    assert after["rank_correlation"] == before["rank_correlation"]
    assert "fallback" in second.report["allocation"]  # measured afresh: it needs no probe weights
    # a check with other settings cannot be served from that entry: measured again (and stored)
    third = _compress(_recipe(calib_file, cache_dir=cache_dir, check={"probes": 5}), model, tmp_path / "c")
    assert third.report["allocation"]["check"]["cached"] is False
    assert len(third.report["allocation"]["check"]["probes"]) == 5
    assert len(list((cache_dir / "sensitivity").glob("*.json"))) == 1


@pytest.mark.parametrize("method", ["measured", "search"])
def test_allocation_leaves_the_model_weights_alone(method, tiny_model_dir, calib_file):
    """The checks and the search swap weights in and out; the quantize pass must still get the checkpoint's."""
    extra = {"search_seconds": 1, "search_samples": 2} if method == "search" else {}
    recipe = parse_recipe(_recipe(calib_file, method, {"bits_per_weight": 3.5}, check={"probes": 4}, **extra))
    loaded = load_model(str(tiny_model_dir("llama")))
    state = CompressionState(loaded, recipe, quiet=True)
    state.calibration_ids = sample_windows(
        loaded.tokenizer, read_texts(recipe.calibration), recipe.calibration, max_positions(loaded.model.config)
    )
    model = state.full_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    AllocateBitsRunner(recipe.passes[0]).run(state)
    assert len(state.report["allocation"]["check"]["probes"]) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
