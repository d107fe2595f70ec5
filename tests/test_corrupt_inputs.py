"""Corrupt and mismatched inputs end as one user error (exit 2) naming the broken input and the fix, and leave no
output behind: no output directory, no hidden `.NAME.partial-PID` either. Interrupted and killed exports clean up
(exit 130), or are cleaned up by the next run."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compressor
from compressor.cli import main

ROOT = Path(__file__).resolve().parents[1]


def recipe(calib: Path, method: str = "rtn", **extra) -> dict:
    """A fast recipe for the tiny models; no evaluation unless a test asks for it."""
    data = {
        "calibration": {"source": str(calib), "num_samples": 4, "seq_len": 32, "batch_size": 2, "dtype": "float32"},
        "passes": [{"type": "quantize", "method": method, "weights": {"bits": 4, "group_size": 32}}],
        "evaluate": None,
    }
    data.update(extra)
    return data


def run_cli(tmp_path: Path, data: dict, *args: str) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["--recipe", str(path), "-q", *args])
    return result.exit_code, result.stderr.strip()


def leftovers(out: Path) -> list[str]:
    """The output directory and whatever a run writing it may leave beside it (`.NAME.partial-PID`,
    `.NAME.old-PID`, `NAME.broken`)."""
    return sorted(
        p.name
        for p in out.parent.iterdir()
        if p.name in (out.name, f"{out.name}.broken") or p.name.startswith(f".{out.name}.")
    )


def assert_refused(tmp_path: Path, data: dict, model: Path | str, *needles: str, absent: str | None = None) -> str:
    """The API raises a CompressorError and the CLI exits 2 with one line, both naming every needle; nothing is
    left at the output. Returns the CLI's line."""
    out = tmp_path / "out"
    with pytest.raises(compressor.CompressorError) as caught:
        compressor.compress(data, model=str(model), output=out, quiet=True)
    for needle in needles:
        assert needle in str(caught.value), (needle, str(caught.value))
    code, err = run_cli(tmp_path, data, "--model", str(model), "-o", str(out))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    if absent is not None:
        assert absent not in err, err
    assert leftovers(out) == []
    return err


@pytest.fixture
def llama(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny llama to break."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama"))


def edit_weights(folder: Path, name: str, value: float) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name][3, 4] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---- weights -----------------------------------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path, llama, calib_file):
    weights = llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_refused(tmp_path, recipe(calib_file), llama, str(weights), "truncated or corrupt", "re-download")


def test_garbage_safetensors(tmp_path, llama, calib_file):
    weights = llama / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    assert_refused(tmp_path, recipe(calib_file), llama, str(weights), "truncated or corrupt", "re-download")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_broken_shard(damage, tmp_path, tiny_model_dir, calib_file):
    """A sharded checkpoint: the message names the shard, not only the folder."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir("llama"), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="300KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-1000])
    needle = "is missing" if damage == "missing" else "truncated or corrupt"
    assert_refused(tmp_path, recipe(calib_file), folder, str(shard), needle, "re-download")


def test_config_width_disagrees_with_weights(tmp_path, llama, calib_file):
    edit_config(llama, hidden_size=128)
    assert_refused(
        tmp_path,
        recipe(calib_file),
        llama,
        "config.json",
        "does not match the weights",
        "'model.embed_tokens.weight' is [",
        "use the config.json saved with these weights",
    )


def test_config_depth_disagrees_with_weights(tmp_path, llama, calib_file):
    """One more layer than the weights hold: transformers would fill it with random values."""
    edit_config(llama, num_hidden_layers=4)
    assert_refused(tmp_path, recipe(calib_file), llama, "lack 9 tensors", "model.layers.3.", "config.json")


@pytest.mark.parametrize(
    "name, value",
    [("model.layers.1.mlp.up_proj.weight", float("nan")), ("model.layers.2.self_attn.k_proj.weight", float("inf"))],
)
def test_non_finite_weight_is_named(name, value, tmp_path, llama, calib_file):
    edit_weights(llama, name, value)
    assert_refused(tmp_path, recipe(calib_file), llama, f"weight '{name}' contains NaN or Inf")


# ---- GGUF --------------------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
}
_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    """The tiny llama in `folder` as an F32 GGUF file (llama.cpp's tensor names, its BPE tokenizer)."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = tokenizer["model"]["vocab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if name in _GGUF_NAMES:
            target = _GGUF_NAMES[name]
        else:
            _, _, index, *rest = name.split(".")
            target = f"blk.{index}.{_GGUF_BLOCK['.'.join(rest[:-1])]}"
        writer.add_tensor(f"{target}.weight", tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    return write_tiny_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")


def test_tiny_gguf_is_valid(tiny_gguf):
    """The file the GGUF cases break loads whole (so what they test is the damage, not the writer)."""
    from compressor.models.loading import load_model

    loaded = load_model(str(tiny_gguf), quiet=True, stream=True)
    assert loaded.model.config.num_hidden_layers == 3


@pytest.mark.parametrize("damage", ["truncated", "header-only", "garbage", "empty"])
def test_broken_gguf(damage, tmp_path, tiny_gguf, calib_file):
    data = tiny_gguf.read_bytes()
    broken = tmp_path / f"{damage}.gguf"
    cut = {"truncated": data[: len(data) // 2], "header-only": data[:600], "empty": b""}
    broken.write_bytes(cut.get(damage, np.random.default_rng(0).bytes(20000)))
    assert_refused(tmp_path, recipe(calib_file), broken, f"GGUF file {broken}", "truncated or corrupt", "re-download")
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))  # no half-converted copy in the cache


# ---- tokenizer ---------------------------------------------------------------------------------------------------


def test_missing_tokenizer(tmp_path, llama, calib_file):
    for f in [*llama.glob("tokenizer*"), *llama.glob("special_tokens_map.json")]:
        f.unlink()
    assert_refused(tmp_path, recipe(calib_file), llama, f"no tokenizer in {llama}", "tokenizer.save_pretrained")


def test_unreadable_tokenizer(tmp_path, llama, calib_file):
    tokenizer = llama / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:3000])
    assert_refused(tmp_path, recipe(calib_file), llama, f"no usable tokenizer in {llama}", "JSONDecodeError")


def test_tokenizer_of_another_model(tmp_path, llama, calib_file):
    """More tokens than embedding rows: an id past the rows would crash the embedding mid-calibration."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    rows = len(tokenizer)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])
    tokenizer.save_pretrained(llama)
    assert_refused(
        tmp_path,
        recipe(calib_file, method="gptq"),
        llama,
        f"has {rows + 40} tokens but the model's embedding has {rows} rows",
        "use the tokenizer saved with this model",
    )


# ---- texts -------------------------------------------------------------------------------------------------------

BINARY = bytes(range(256)) * 16


@pytest.mark.parametrize(
    "role, content, needle",
    [
        ("cal", b"", "the calibration source holds no text"),
        ("cal", BINARY, "calibration file text.bin is not text (byte 128 is not UTF-8)"),
        ("eval", b"", "the evaluation text text.bin has fewer than 32 tokens"),
        ("eval", BINARY, "evaluation text text.bin is not text (byte 128 is not UTF-8)"),
    ],
    ids=["cal-empty", "cal-binary", "eval-empty", "eval-binary"],
)
def test_unusable_text_names_its_input(role, content, needle, tmp_path, tiny_model_dir, calib_file):
    bad = tmp_path / "text.bin"
    bad.write_bytes(content)
    if role == "cal":
        data, other = recipe(bad, method="gptq"), "evaluation"
    else:
        ev = {"perplexity_text": str(bad), "seq_len": 32, "max_windows": 2, "kl": False, "generate_tokens": 0}
        data, other = recipe(calib_file, method="gptq", evaluate=ev), "calibration"
    assert_refused(tmp_path, data, tiny_model_dir("llama"), needle, absent=other)


# ---- overrides ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, needles",
    [
        ("quantize.weights.group_size", ["unknown key 'quantize'", "did you mean passes.0.weights.group_size?"]),
        ("passes.0.weights.group_sz", ["unknown key 'passes.0.weights.group_sz'", "passes.0.weights.group_size?"]),
        ("calibraton.seq_len", ["unknown key 'calibraton'", "did you mean calibration.seq_len?"]),
        ("passes.2.method", ["'passes' has 1 entry, so 'passes.2' names none"]),
        ("calibration.seq_len.max", ["'calibration.seq_len' is a value (32)"]),
    ],
)
def test_unknown_override_key_is_named(key, needles, tmp_path, calib_file):
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, recipe(calib_file), "--set", f"{key}=64", "-o", str(out))
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    with pytest.raises(compressor.CompressorError, match=needles[0].replace("(", r"\(").replace(")", r"\)")):
        compressor.compress(recipe(calib_file), output=out, **{key.replace(".", "__"): 64})
    assert leftovers(out) == []


# ---- export: full disk, Ctrl-C, kill -9 --------------------------------------------------------------------------


def test_full_disk_during_export(tmp_path, tiny_model_dir, calib_file, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError carrying the OS error, not as an OSError."""
    from safetensors import SafetensorError

    import exporters.safetensors_export as st

    def full(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(compressor.CompressorError, match="no space left") as caught:
        compressor.compress(recipe(calib_file), model=str(tiny_model_dir("llama")), output=out, quiet=True)
    assert str(out) in str(caught.value) and caught.value.exit_code == 2
    assert leftovers(out) == []

    def full_os(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_os)
    code, err = run_cli(tmp_path, recipe(calib_file), "--model", str(tiny_model_dir("llama")), "-o", str(out))
    assert code == 2 and "no space left" in err and str(out) in err, err
    assert leftovers(out) == []


def _cli_command(data: dict, tmp_path: Path, model: Path, out: Path) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["--recipe", str(path), "--model", str(model), "-o", str(out), "-q"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_full_disk_for_real(tmp_path, tiny_model_dir, calib_file):
    """A 64 KiB tmpfs, mounted in a user namespace of its own: the real writers hit ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    where = shlex.quote(str(mount))
    probe = shutil.which("unshare") and subprocess.run(
        [*namespace, f"mount -t tmpfs tmpfs {where}"], capture_output=True
    )
    if not probe or probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (no user namespaces)")
    out = mount / "out"
    args = _cli_command(recipe(calib_file), tmp_path, tiny_model_dir("llama"), out)
    cli = shlex.join([sys.executable, "-m", "compressor.cli", *args])
    script = f"mount -t tmpfs -o size=64k tmpfs {where} && {{ {cli}; echo rc=$?; ls -A {where}; }}"
    done = subprocess.run([*namespace, script], capture_output=True, text=True, env=_env(), cwd=ROOT)
    lines = done.stdout.split()
    assert lines[:1] == ["rc=2"], (done.stdout, done.stderr)
    assert lines[1:] == []  # nothing left on the full disk: no output, no partial directory
    err = done.stderr.strip()
    assert err.startswith("error: no space left") and str(out) in err and len(err.splitlines()) == 1, err


# A child that runs the real CLI; its safetensors writer, once it has written a shard, says so in a marker file and
# then waits: the test signals it there, in the middle of the export.
SLOW_WRITER = """
import os, sys, time
from pathlib import Path
import exporters.safetensors_export as st
real = st.save_file
def save_then_wait(*args, **kwargs):
    real(*args, **kwargs)
    Path(os.environ["MARKER"]).write_text("writing")
    time.sleep(120)
st.save_file = save_then_wait
from compressor.cli import main
main(sys.argv[1:])
"""


def _stopped_mid_export(tmp_path: Path, model: Path, calib: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    out, marker = tmp_path / "out", tmp_path / "marker"
    args = [sys.executable, "-c", SLOW_WRITER, *_cli_command(recipe(calib), tmp_path, model, out)]
    child = subprocess.Popen(args, env={**_env(), "MARKER": str(marker)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a guard against a hung child, not a timing assertion
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate(timeout=60)
    partial = tmp_path / f".out.partial-{child.pid}"
    assert partial.is_dir() and (partial / "model.safetensors").is_file()
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(args, child.returncode, "", err), partial


def test_ctrl_c_mid_export_leaves_nothing(tmp_path, tiny_model_dir, calib_file):
    done, _ = _stopped_mid_export(tmp_path, tiny_model_dir("llama"), calib_file, signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert leftovers(tmp_path / "out") == []


def test_kill_mid_export_is_cleaned_up_by_the_next_run(tmp_path, tiny_model_dir, calib_file):
    model = tiny_model_dir("llama")
    done, partial = _stopped_mid_export(tmp_path, model, calib_file, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert leftovers(out) == [partial.name]  # a killed process cannot clean up: its partial directory stays
    code, err = run_cli(tmp_path, recipe(calib_file), "--model", str(model), "-o", str(out))
    assert code == 0, err
    assert f"removed '{partial}', left by an earlier run that was killed while writing" in err
    assert leftovers(out) == ["out"] and (out / "model.safetensors").is_file()
