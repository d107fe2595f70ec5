"""Upload a finished artifact to the Hugging Face Hub as one commit.

The token comes from the environment (HF_TOKEN) or huggingface_hub's login file; it never reaches a message,
a log or a file. HF_ENDPOINT (read at call time) points the upload at another hub, such as a private mirror.
A hub commit is all or nothing, so a failed or interrupted upload leaves the repository as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from compressor.errors import HubError
from compressor.recipe import HubConfig

_RETRY = "the artifact at '{folder}' is complete; upload it again with `compress push {folder} {repo}`"


def artifact_files(folder: Path) -> list[str]:
    """The files of a complete artifact in `folder`, relative and sorted; raises HubError for anything less.

    Complete means: a config.json, every shard an index names, and every safetensors / ONNX file readable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"artifact not found: '{folder}'", fix="pass the directory that `compress` wrote")
    if ".partial-" in folder.name or ".old-" in folder.name:
        raise HubError(f"'{folder}' is an unfinished write", fix="rerun `compress`; push the directory it names")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if "config.json" not in files:
        raise HubError(
            f"'{folder}' is not a compressor artifact (no config.json)",
            fix="push a directory written by `compress` or `compress export-onnx`",
        )
    for index in (f for f in files if f.endswith(".safetensors.index.json")):
        shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
        missing = sorted(shards - set(files))
        if missing:
            raise HubError(f"'{folder}' lacks the shard {missing[0]} that {index} names", fix="rerun `compress`")
    for name in files:
        _check_readable(folder, name)
    return files


def _check_readable(folder: Path, name: str) -> None:
    path = folder / name
    try:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif name.endswith(".onnx"):
            import onnx

            onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is damaged
        raise HubError(
            f"'{path}' is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'})",
            fix="rerun `compress` to write the artifact again",
        ) from None


def hub_token() -> str:
    """The token huggingface_hub would use; HubError when there is none or the hub is switched off."""
    from huggingface_hub import get_token

    from compressor.models.loading import hub_offline

    if hub_offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded", fix="unset HF_HUB_OFFLINE")
    token = get_token()
    if not token:
        raise HubError(
            "no Hugging Face token found for the upload",
            fix="export HF_TOKEN=<a token with write access> (or run `hf auth login`)",
        )
    return token


def _api(token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def check_hub_target(target: HubConfig) -> str:
    """Before a long run: the token exists and the hub accepts it. Returns the account name."""
    token = hub_token()
    api = _api(token)
    with _hub_errors(target.repo_id, token, api.endpoint, retry=None):
        return api.whoami()["name"]


def push_artifact(folder: Path, target: HubConfig, commit_message: str | None = None) -> str:
    """Upload the artifact in `folder` to `target` as one commit; returns the commit's URL."""
    folder = Path(folder)
    files = artifact_files(folder)
    token = hub_token()
    api = _api(token)
    retry = _RETRY.format(folder=folder, repo=target.repo_id)
    message = target.commit_message or commit_message or f"Upload {folder.name} compressed with compressor"
    with _hub_errors(target.repo_id, token, api.endpoint, retry):
        try:
            # a bare 'name' lives under the token's account: the hub says where, and later calls use that id
            repo_id = api.create_repo(target.repo_id, private=target.private, exist_ok=True).repo_id
            if target.revision != "main":
                api.create_branch(repo_id, branch=target.revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=folder,
                repo_id=repo_id,
                revision=target.revision,
                commit_message=message,
                allow_patterns=files,
            )
        except KeyboardInterrupt:
            err = HubError("interrupted during the upload; the hub keeps no partial commit", fix=retry)
            err.exit_code = 130
            raise err from None
    return info.commit_url


@contextlib.contextmanager
def _hub_errors(repo_id: str, token: str, endpoint: str, retry: str | None) -> Iterator[None]:
    """Turn the hub client's failures into one HubError naming the cause and the fix, with the token masked."""
    from huggingface_hub.errors import HfHubHTTPError

    def fix(first: str) -> str:
        return f"{first}; {retry}" if retry else first

    def masked(text: str) -> str:
        return text.replace(token, "***")

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        said = masked((err.server_message or str(err)).strip().splitlines()[0])
        if status == 401:
            raise HubError(
                "the hub rejected the token (401 Unauthorized)", fix=fix("set HF_TOKEN to a valid token")
            ) from None
        if status == 403:
            raise HubError(
                f"the token may not write to '{repo_id}' (403 Forbidden: {said})",
                fix=fix("use a token with write access to that namespace, or a repository under your own"),
            ) from None
        if status is not None and status >= 500:
            raise HubError(f"the hub failed ({status}: {said})", fix=fix("try again later")) from None
        raise HubError(
            f"the hub refused the upload to '{repo_id}' ({status}: {said})",
            fix=fix("check the repository id and the revision"),
        ) from None
    except ValueError as err:
        if not str(err).startswith("Invalid metadata in README.md"):
            raise
        raise HubError(
            f"the hub rejected the model card's metadata ({masked(' '.join(str(err).split()[5:])) or 'no detail'})",
            fix=fix("correct the front matter of README.md in the artifact"),
        ) from None
    except _transport_errors() as err:
        raise HubError(
            f"cannot reach the hub at {endpoint} ({masked(str(err)) or type(err).__name__})",
            fix=fix("check the network (or HF_ENDPOINT)"),
        ) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures: httpx2's (huggingface_hub 2.x's client) and the OS's."""
    try:
        from httpx2 import TransportError
    except ImportError:  # a client without httpx2: its errors surface as OS errors or internal errors
        return (OSError,)
    return (TransportError, OSError)
