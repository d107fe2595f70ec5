"""Structural passes on tiny models: scores, removal, fusion, surgery consistency, artifacts that reload."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import small_recipe
from tiny_models import CORPUS, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import compressor
from compressor.errors import CompressorError, RecipeError
from compressor.eval.metrics import evaluate_windows
from compressor.models.adapters import adapter_for
from compressor.models.loading import load_model
from compressor.schema.structure import FuseBlocksPass, RemoveBlocksPass, ScorePass
from compressor.structure.fuse import held_rows, normal_equations, solve_ridge
from compressor.structure.ops import apply_removal, choose_removal, fuse_blocks, score_model
from compressor.structure.surgery import remove_blocks

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "gpt2", "bert"]
DECODERS = [f for f in FAMILIES if f != "bert"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine idle OpenMP workers cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tokenizer, rows: int = 8, seq: int = 32) -> torch.Tensor:
    ids = torch.tensor(tokenizer(CORPUS, add_special_tokens=False)["input_ids"][: rows * seq])
    return ids.reshape(rows, seq)


def _structure_artifact(recipe: dict, model_dir, out) -> dict:
    """Run the recipe's passes and the safetensors exporter (as compress() does); returns state.report.

    compress() itself cannot finish a recipe without a quantize pass yet: exporters/report.py's summary
    formats `quantized_bits_per_weight`, which is None when nothing was quantized (reported to the lead).
    """
    from compressor.calibration.data import read_texts, sample_windows
    from compressor.pipeline import run_passes
    from compressor.recipe import parse_recipe
    from compressor.state import CompressionState
    from exporters import EXPORTERS
    from exporters.source import ArtifactSource

    r = parse_recipe(recipe)
    loaded = load_model(str(model_dir))
    state = CompressionState(loaded, r, quiet=True)
    state.calibration_ids = sample_windows(loaded.tokenizer, read_texts(r.calibration), r.calibration, 256)
    run_passes(state)
    out.mkdir()
    EXPORTERS["safetensors"](ArtifactSource.of(state), out)
    return state.report


def _kl(model, base, ids) -> float:
    return evaluate_windows(model, ids, base, batch_size=4, quiet=True)["kl_divergence"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 6-block tiny llama whose block 3 is an exact identity (o_proj and down_proj zeroed)."""
    from tiny_models import make_tokenizer

    folder = tmp_path_factory.mktemp("planted")
    tok = make_tokenizer(folder)
    config = tiny_config("llama", len(tok))
    config.num_hidden_layers = 6
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return folder


# ---- scores ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_finite_and_shaped(family, tiny_model_dir):
    lm = load_model(str(tiny_model_dir(family)))
    table = score_model(lm.model, lm.adapter, _ids(lm.tokenizer), ScorePass(type="score", max_distance=3), True)
    depth = table.depth
    assert depth == 3
    for metric, values in table.blocks.items():
        assert len(values) == depth
        if metric == "loss" and family == "bert":  # no next-token loss for an encoder
            assert all(math.isnan(v) for v in values)
        else:
            assert all(math.isfinite(v) for v in values), (metric, values)
    assert set(table.blocks) == {"bi", "lim", "angular", "zd", "loss", "kl"}
    assert {n: len(d) for n, d in table.angular.items()} == {1: 3, 2: 2, 3: 1}
    for i in range(depth):  # LIM and BI are the same cosine statistic
        assert table.blocks["lim"][i] == pytest.approx(table.blocks["bi"][i] - 1)
        assert table.blocks["kl"][i] >= 0 and 0 <= table.blocks["zd"][i] <= 1
    if family == "bert":
        assert table.sublayers == {}
    else:
        for kind in ("attention", "mlp"):
            assert all(len(v) == depth and all(math.isfinite(x) for x in v) for v in table.sublayers[kind].values())
    json.dumps(table.to_json())


def test_planted_identity_block_is_found_and_beats_random(planted):
    lm = load_model(str(planted))
    ids = _ids(lm.tokenizer, rows=8)
    table = score_model(lm.model, lm.adapter, ids, ScorePass(type="score"), True)
    assert table.blocks["kl"][3] == pytest.approx(0, abs=1e-6)
    assert table.blocks["bi"][3] == pytest.approx(0, abs=1e-6)
    assert table.sublayers["attention"]["kl"][3] == pytest.approx(0, abs=1e-6)
    cfg = RemoveBlocksPass(type="remove_blocks", count=1, method="score:kl")
    units, _ = choose_removal(lm.model, lm.adapter, ids, cfg, True)
    assert units == [(3, "block")]
    greedy_cfg = cfg.model_copy(update={"method": "greedy", "objective": "kl"})
    greedy, _ = choose_removal(lm.model, lm.adapter, ids, greedy_cfg, True)
    assert greedy == [(3, "block")]

    base = lm.model
    measured = copy.deepcopy(base)
    remove_blocks(measured, lm.adapter, [3])
    kl_measured = _kl(measured, base, ids)
    for other in torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()[:3]:
        if other == 3:
            continue
        random_removal = copy.deepcopy(base)
        remove_blocks(random_removal, lm.adapter, [other])
        assert kl_measured < _kl(random_removal, base, ids)
    assert kl_measured == pytest.approx(0, abs=1e-6)


# ---- removal: artifacts, cache, reload --------------------------------------------------------------------
def _greedy_texts(model, ids: torch.Tensor, cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("family", DECODERS)
def test_remove_block_artifact_reloads_and_generates(family, tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file)
    recipe["passes"] = [{"type": "remove_blocks", "count": 1, "method": "greedy", "measure_samples": 4}]
    out = tmp_path / "out"
    record = _structure_artifact(recipe, tiny_model_dir(family), out)["structure"][0]
    assert record["depth_before"] == 3 and record["depth_after"] == 2 and len(record["removed_blocks"]) == 1

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 2
    reference = load_model(str(tiny_model_dir(family))).model
    remove_blocks(reference, adapter_for(reference.config.model_type), record["removed_blocks"])
    for cfg in (loaded.config, reference.config):
        types = getattr(cfg, "layer_types", None)
        assert types is None or len(types) == 2
    if family == "gemma3":  # per-layer attention types follow their blocks
        original = ["sliding_attention", "sliding_attention", "full_attention"]
        assert loaded.config.layer_types == [original[i] for i in record["kept_blocks"]]
    indices = [m.layer_idx for m in loaded.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
    assert indices == [0, 1]
    if reference.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids = torch.randint(0, loaded.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    cached, uncached = _greedy_texts(loaded, ids, True), _greedy_texts(loaded, ids, False)
    assert cached.shape == (2, 16)
    torch.testing.assert_close(cached, uncached)


def test_bert_block_removal_reloads(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir("bert")))
    cfg = RemoveBlocksPass(type="remove_blocks", count=1, method="score:kl")
    units, _ = choose_removal(lm.model, lm.adapter, _ids(lm.tokenizer), cfg, True)
    apply_removal(lm.model, lm.adapter, units)
    lm.model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 2
    ids = _ids(lm.tokenizer, rows=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm.model(ids).logits)


@pytest.mark.parametrize("method", ["contiguous", "score:bi", "score:zd", "score:loss"])
def test_other_methods_choose_valid_blocks(method, tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")))
    cfg = RemoveBlocksPass(type="remove_blocks", count=2, method=method)
    units, _ = choose_removal(lm.model, lm.adapter, _ids(lm.tokenizer), cfg, True)
    blocks = [i for i, _ in units]
    assert len(set(blocks)) == 2 and all(0 <= i < 3 for i in blocks)
    if method == "contiguous":
        assert blocks[1] == blocks[0] + 1


@pytest.mark.parametrize("which", ["attention", "mlp"])
def test_branch_drop_is_exact_skip_and_loads(which, planted, tmp_path):
    lm = load_model(str(planted))
    ids = _ids(lm.tokenizer)
    flag = {f"{which}_only": True}
    cfg = RemoveBlocksPass(type="remove_blocks", count=1, method="greedy", objective="kl", **flag)
    units, _ = choose_removal(lm.model, lm.adapter, ids, cfg, True)
    assert units == [(3, which)]  # the planted identity block's branch changes nothing
    base = copy.deepcopy(lm.model)
    done = apply_removal(lm.model, lm.adapter, units)
    assert done["depth_after"] == 6 and len(done["zeroed"]) == 1
    lm.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


# ---- fusion ---------------------------------------------------------------------------------------------
def test_ridge_solutions_and_heldout_error_match_least_squares():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 100, 12, generator=g, dtype=torch.float64)  # 4 windows of 100 tokens
    w_true = torch.randn(5, 12, generator=g, dtype=torch.float64)
    t = a @ w_true.t() + 0.01 * torch.randn(4, 100, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(4, 100, 1, generator=g, dtype=torch.float64) + 0.5
    held = held_rows([a])[0]
    assert held.tolist() == [False, False, False, True]
    fit, val = normal_equations([a], [t], [weights], [held], 12, 5)
    w0 = torch.zeros(5, 12, dtype=torch.float64)
    tiny, inf = solve_ridge(fit, w0, (1e-12, math.inf))
    s = weights[:3].sqrt()
    reference = torch.linalg.lstsq((a[:3] * s).reshape(-1, 12), (t[:3] * s).reshape(-1, 5)).solution.t()
    torch.testing.assert_close(tiny, reference)
    torch.testing.assert_close(inf, w0)  # r = inf keeps the starting weight
    # the closed-form held-out error is the weighted squared error on the held-out window
    direct = ((a[3] @ reference.t() - t[3]).pow(2) * weights[3]).sum().item()
    assert val.error(reference) == pytest.approx(direct, rel=1e-4)  # products are float32, sums float64
    # a strong ridge stays near the starting weight
    (strong,) = solve_ridge(fit, w_true, (1e9,))
    torch.testing.assert_close(strong, w_true, rtol=1e-6, atol=1e-6)
    assert held_rows([a[:1]])[0].tolist() == [False] and held_rows([a[:2]])[0].tolist() == [False, True]


def test_least_squares_correction_lowers_kl(planted):
    ids = None
    kls = {}
    for correct in (False, True):
        lm = load_model(str(planted))
        ids = _ids(lm.tokenizer) if ids is None else ids
        base = copy.deepcopy(lm.model)
        cfg = FuseBlocksPass(type="fuse_blocks", start=1, correct=correct, measure_samples=8)
        done = fuse_blocks(lm.model, lm.adapter, ids, cfg, True)
        assert done["merged_windows"] == [[1, 2]] and done["depth_after"] == 5
        kls[correct] = _kl(lm.model, base, ids)
    assert kls[True] < kls[False]


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """A 6-block tiny llama whose blocks 2 and 3 are the same small block (output projections x 0.3).

    Running both is close to applying their residual update twice; dropping either (what block-influence
    removal does: they have the lowest BI) loses one update, and so does LaCo's merge, which for a pair is
    exactly the second block. A corrected fusion can scale the update up and keep both."""
    from tiny_models import make_tokenizer

    folder = tmp_path_factory.mktemp("planted-pair")
    tok = make_tokenizer(folder)
    config = tiny_config("llama", len(tok))
    config.num_hidden_layers = 6
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        first, second = model.model.layers[2], model.model.layers[3]
        first.self_attn.o_proj.weight.mul_(0.3)
        first.mlp.down_proj.weight.mul_(0.3)
        second.load_state_dict(first.state_dict())
    model.save_pretrained(folder)
    return folder


def test_corrected_fusion_beats_block_influence_removal(planted_pair, tmp_path):
    lm = load_model(str(planted_pair))
    ids = _ids(lm.tokenizer)
    base = copy.deepcopy(lm.model)
    removed = copy.deepcopy(base)
    cfg = RemoveBlocksPass(type="remove_blocks", count=1, method="score:bi")
    units, _ = choose_removal(removed, lm.adapter, ids, cfg, True)
    assert units[0][0] in (2, 3)
    apply_removal(removed, lm.adapter, units)
    kl_bi = _kl(removed, base, ids)

    kls = {}
    for correct in (False, True):  # the defaults otherwise: select angular, ridge auto
        fused = copy.deepcopy(base)
        done = fuse_blocks(fused, lm.adapter, ids, FuseBlocksPass(type="fuse_blocks", count=1, correct=correct), True)
        assert done["merged_windows"] == [[2, 3]] and done["depth_after"] == 5
        kls[correct] = _kl(fused, base, ids)
    assert [f["start"] for f in done["fits"]] == [2] and done["fits"][0]["from"] in ("laco", "keep0", "keep1")
    assert kls[False] == pytest.approx(kl_bi, rel=1e-3)  # LaCo on a pair = dropping the first block
    assert kls[True] < 0.05 * kl_bi
    fused.save_pretrained(tmp_path)  # still a plain 5-block llama
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_greedy_texts(loaded, ids[:2, :8], True), _greedy_texts(loaded, ids[:2, :8], False))


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
def test_fuse_artifact_reloads_and_generates(family, tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file)
    recipe["passes"] = [{"type": "fuse_blocks", "count": 1, "select": "check", "threshold": 0.1}]
    out = tmp_path / "out"
    record = _structure_artifact(recipe, tiny_model_dir(family), out)["structure"][0]
    assert record["depth_after"] == 2 and record["corrected"] == (family != "gemma3")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 2
    ids = torch.randint(0, loaded.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_greedy_texts(loaded, ids, True), _greedy_texts(loaded, ids, False))


# ---- composition and the report ------------------------------------------------------------------------
def test_prune_then_quantize_artifact(tiny_model_dir, calib_file, tmp_path):
    recipe = small_recipe(calib_file)
    recipe["passes"] = [
        {"type": "score", "measure_samples": 2},
        {"type": "remove_blocks", "fraction": 0.34, "method": "score:bi"},
        recipe["passes"][0],
    ]
    out = tmp_path / "out"
    result = compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    assert (out / "scores.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "report.json").read_text())
    assert report["scores"]["depth"] == 3 and len(report["scores"]["blocks"]["bi"]) == 3
    assert report["structure"][0]["depth_after"] == 2
    assert all(name.startswith(("model.layers.0.", "model.layers.1.")) for name in result.plan.layers)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = compressor.load(out)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-4)


# ---- bad parameters -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, message",
    [
        (RemoveBlocksPass(type="remove_blocks", count=3, method="score:bi"), "remove at most 2"),
        (RemoveBlocksPass(type="remove_blocks", blocks=[0, 1, 2]), "would leave none"),
        (RemoveBlocksPass(type="remove_blocks", blocks=[5]), "do not exist"),
        (FuseBlocksPass(type="fuse_blocks", start=2), "runs past the last block"),
        (FuseBlocksPass(type="fuse_blocks", count=3), "do not fit"),
        (FuseBlocksPass(type="fuse_blocks", count=3, group_size=3), "multiple of 2"),
    ],
)
def test_bad_parameters_give_clear_errors(cfg, message, tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")))
    ids = _ids(lm.tokenizer)
    with pytest.raises(RecipeError, match=message):
        if isinstance(cfg, RemoveBlocksPass):
            choose_removal(lm.model, lm.adapter, ids, cfg, True)
        else:
            fuse_blocks(lm.model, lm.adapter, ids, cfg, True)


def test_bert_refuses_branch_drop(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("bert")))
    cfg = RemoveBlocksPass(type="remove_blocks", count=1, method="score:bi", attention_only=True)
    with pytest.raises(RecipeError, match="post-norm"):
        choose_removal(lm.model, lm.adapter, _ids(lm.tokenizer), cfg, True)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "remove_blocks", "count": 1, "method": "score:foo"}, "method must be"),
        ({"type": "remove_blocks"}, "exactly one of count, fraction"),
        ({"type": "remove_blocks", "count": 1, "fraction": 0.2}, "exactly one of count, fraction"),
        ({"type": "remove_blocks", "count": 1, "attention_only": True, "mlp_only": True}, "exclude each other"),
        ({"type": "fuse_blocks", "count": 1, "group_size": 1}, "group_size"),
    ],
)
def test_recipe_validation(spec, message, calib_file):
    recipe = small_recipe(calib_file)
    recipe["passes"] = [spec]
    with pytest.raises(CompressorError, match=message):
        compressor.api.resolve_recipe(recipe)


# ---- compress score -------------------------------------------------------------------------------------
def test_score_command_prints_table_and_writes_nothing(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from compressor.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["score", "--model", str(tiny_model_dir("qwen2")), "-q", "--measure-samples", "2"]
    args += ["--set", f"calibration.source={calib_file}", "--set", "calibration.num_samples=4"]
    args += ["--set", "calibration.seq_len=32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:7] == ["block", "bi", "lim", "angular", "zd", "loss", "kl"]
    assert [line.split()[0] for line in lines[1:4]] == ["0", "1", "2"]
    assert list(tmp_path.iterdir()) == []
    as_json = CliRunner().invoke(main, [*args, "--json", "--no-measure"])
    assert as_json.exit_code == 0 and "loss" not in json.loads(as_json.output)["blocks"]
    bad = CliRunner().invoke(main, [*args, "--measure-samples", "0"])
    assert bad.exit_code == 2 and "measure_samples" in bad.output
