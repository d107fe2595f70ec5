"""Every bad input gives exit code 2, one clear line naming the cause and the fix, and no output."""

import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import small_recipe

import compressor
from compressor.cli import main


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr.strip(), result.stdout


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def assert_user_error(code, err, *needles):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_malformed_yaml(tmp_path):
    path = write_recipe(tmp_path, "passes: [\n  - type: quantize\n  bad: : :\n")
    assert_user_error(*run_cli("--recipe", path, "-o", str(tmp_path / "o"))[:2], "malformed YAML", "recipe.yaml:")


def test_unknown_pass(tmp_path):
    path = write_recipe(tmp_path, {"passes": [{"type": "prune_heads"}]})
    assert_user_error(*run_cli("--recipe", path)[:2], "passes.0", "prune_heads", "quantize")


def test_unknown_key(tmp_path):
    path = write_recipe(tmp_path, {"calibration": {"num_sample": 3}})
    assert_user_error(*run_cli("--recipe", path)[:2], "unknown key 'calibration.num_sample'")


def test_wrong_type(tmp_path):
    path = write_recipe(tmp_path, {"calibration": {"seq_len": "long"}})
    assert_user_error(*run_cli("--recipe", path)[:2], "calibration.seq_len", "'long'")


def test_bad_bits_lists_allowed_values(tmp_path):
    path = write_recipe(tmp_path, {"passes": [{"type": "quantize", "weights": {"bits": 5}}]})
    assert_user_error(*run_cli("--recipe", path)[:2], "passes.0.weights.bits", "2, 3, 4 or 8", "got 5")


def test_group_size_not_positive(tmp_path):
    path = write_recipe(tmp_path, {"passes": [{"type": "quantize", "weights": {"group_size": 0}}]})
    assert_user_error(*run_cli("--recipe", path)[:2], "group_size", "positive")


def test_missing_model_path(tmp_path, calib_file):
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "model path not found")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, calib_file):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=320)
    ).save_pretrained(folder)
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(folder), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "unsupported architecture 'gpt_neox'", "llama", "gemma3_text", "bert")


def test_missing_tokenizer(tmp_path, calib_file, tiny_model_dir):
    folder = tmp_path / "notok"
    shutil.copytree(tiny_model_dir("llama"), folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    for f in folder.glob("special_tokens_map.json"):
        f.unlink()
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(folder), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "tokenizer")


@pytest.mark.parametrize("text,needle", [("", "holds no text"), ("just a few words", "fewer than one sequence")])
def test_calibration_empty_or_short(tmp_path, calib_file, tiny_model_dir, text, needle):
    short = tmp_path / "short.txt"
    short.write_text(text)
    recipe = small_recipe(calib_file)
    recipe["calibration"]["source"] = str(short)
    path = write_recipe(tmp_path, recipe)
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_calibration_file_missing(tmp_path, calib_file, tiny_model_dir):
    recipe = small_recipe(calib_file)
    recipe["calibration"]["source"] = str(tmp_path / "missing.txt")
    path = write_recipe(tmp_path, recipe)
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "calibration file not found")


def test_seq_len_above_model_maximum(tmp_path, calib_file, tiny_model_dir):
    recipe = small_recipe(calib_file)
    recipe["calibration"]["seq_len"] = 4096  # tiny models have 256 positions
    path = write_recipe(tmp_path, recipe)
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "seq_len 4096 exceeds the model's maximum of 256")


def test_nan_in_weights(tmp_path, calib_file, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_dir("llama"), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    model.save_pretrained(folder)
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(folder), "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "model.layers.1.mlp.up_proj.weight", "NaN or Inf")


def test_output_exists_needs_overwrite(tmp_path, calib_file, tiny_model_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(out))
    assert_user_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, err, stdout = run_cli(
        "--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(out), "--overwrite", "-q"
    )
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_ctrl_c_during_export_leaves_nothing(tmp_path, calib_file, tiny_model_dir, monkeypatch):
    import exporters.report

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporters.report, "write_model_card", interrupted)
    out = tmp_path / "o"
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(out), "-q")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.yaml"]  # no output, no partial directory


def test_api_raises_the_same_error(tmp_path, calib_file):
    with pytest.raises(compressor.CompressorError, match="model path not found"):
        compressor.compress(small_recipe(calib_file), model=str(tmp_path / "nope"), output=tmp_path / "o")


def test_print_recipe_is_fully_defaulted_and_valid(tmp_path):
    code, err, out = run_cli("--recipe", "recipes/w4-gptq.yaml", "--print-recipe")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["passes"][0]["damp"] == 0.01 and data["calibration"]["seed"] == 0
    compressor.Recipe.model_validate(data)


def test_set_override(tmp_path):
    code, err, out = run_cli(
        "--recipe",
        "recipes/w4-gptq.yaml",
        "--print-recipe",
        "--set",
        "calibration.num_samples=7",
        "--set",
        "passes.0.weights.group_size=64",
    )
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["calibration"]["num_samples"] == 7 and data["passes"][0]["weights"]["group_size"] == 64


def test_cli_end_to_end(tmp_path, calib_file, tiny_model_dir):
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, out = run_cli("--recipe", path, "--model", str(tiny_model_dir("mistral")), "-o", str(tmp_path / "o"))
    assert code == 0, err
    assert "wrote" in out and "perplexity" in err


def test_hub_id_offline_gives_clear_error(tmp_path, calib_file, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", "no-such-org/no-such-model", "-o", str(tmp_path / "o"))
    assert_user_error(code, err, "no-such-org/no-such-model", "HF_HUB_OFFLINE")


def test_full_disk_during_export(tmp_path, calib_file, tiny_model_dir, monkeypatch):
    import errno

    import exporters.safetensors_export as st

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    out = tmp_path / "o"
    path = write_recipe(tmp_path, small_recipe(calib_file))
    code, err, _ = run_cli("--recipe", path, "--model", str(tiny_model_dir("llama")), "-o", str(out), "-q")
    assert_user_error(code, err, "disk is full", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
