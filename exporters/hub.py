"""Upload a finished artifact to the Hugging Face Hub as one commit.

The token comes from the environment (HF_TOKEN) or huggingface_hub's login file; it never reaches a message,
a log or a file. HF_ENDPOINT (read at call time) points the upload at another hub, such as a private mirror.
The commit is all or nothing: a failed or interrupted upload adds no partial commit (a repository or branch it
had to create first stays). Weight files (safetensors, shard indexes, ONNX and its data) already in the repository
that the artifact lacks (say a single-file checkpoint replaced by shards) are deleted in the same commit; other
files stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError  # a damaged ONNX graph
from safetensors import SafetensorError

from compressor.errors import HubError, UploadInterrupted
from compressor.recipe import HubConfig
from compressor.runtime.lora import LORA_DIR

T = TypeVar("T")

# files of an earlier artifact that a push deletes when this artifact lacks them (stale weights would load);
# anything else in the repository (a LICENSE, evaluation files) stays
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".onnx", ".onnx.data")
STALE_FILES = (f"{LORA_DIR}/adapter_config.json",)  # an adapter config without its weights would fail to load


def artifact_files(folder: Path) -> list[str]:
    """The files of a complete artifact in `folder`, relative and sorted; raises HubError for anything less.

    Complete means: a config.json, every shard an index names, every safetensors / ONNX file readable, and every
    external-data file an ONNX graph names.
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
    for name in files:
        missing = sorted(_files_named_by(folder, name) - set(files))
        if missing:
            raise HubError(f"'{folder}' lacks {missing[0]}, which {name} names", fix="rerun `compress`")
    return files


def _files_named_by(folder: Path, name: str) -> set[str]:
    """Parse one artifact file; the other files it names (shards, ONNX external data), relative to `folder`.

    HubError when the file does not parse.
    """
    path = folder / name
    named: list[str] = []
    try:
        if name.endswith(".safetensors.index.json"):
            named = list(json.loads(path.read_text())["weight_map"].values())
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif name.endswith(".onnx"):
            import onnx
            from onnx.external_data_helper import uses_external_data

            graph = onnx.load(str(path), load_external_data=False).graph
            named = [
                entry.value
                for tensor in graph.initializer
                if uses_external_data(tensor)
                for entry in tensor.external_data
                if entry.key == "location"
            ]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, DecodeError) as err:  # the file does not parse
        detail = str(err).splitlines()[0] if str(err) else "unreadable"
        raise HubError(
            f"'{path}' is damaged ({type(err).__name__}: {detail})", fix="rerun `compress` to write the artifact again"
        ) from None
    return {(path.parent / other).relative_to(folder).as_posix() for other in named}


def hub_token() -> str:
    """The token huggingface_hub would use; HubError when there is none or the hub is switched off."""
    from huggingface_hub import get_token

    from compressor.models.loading import hub_offline

    if hub_offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be uploaded", fix="unset HF_HUB_OFFLINE")
    try:
        token = get_token()
    except Exception as err:  # noqa: BLE001 - an OIDC exchange or a login refresh that failed
        raise HubError(
            f"cannot obtain a Hugging Face token ({type(err).__name__})", fix="export HF_TOKEN=<a write token>"
        ) from None
    if not token:
        raise HubError(
            "no Hugging Face token found for the upload",
            fix="export HF_TOKEN=<a token with write access> (or run `hf auth login`)",
        )
    return token


def _api(token: str):
    from huggingface_hub import HfApi

    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    return HfApi(endpoint=endpoint, token=token)


def _full_repo_id(api, target: HubConfig) -> str:
    """`target.repo_id` with its namespace ('name' lives under the token's account).

    Refuses, before anything is written, a read-only token and an organization the account may not write to.
    """
    me = api.whoami()
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubError(
            "the Hugging Face token is read-only", fix="create a token with write access and set HF_TOKEN to it"
        )
    user = me["name"]
    namespace = target.repo_id.split("/")[0] if "/" in target.repo_id else user
    if namespace != user and "orgs" in me:  # fine-grained scopes are left to the hub to judge at upload
        role = next((org.get("roleInOrg") for org in me["orgs"] if org.get("name") == namespace), None)
        if role is None:
            raise HubError(
                f"the token's account '{user}' is not a member of '{namespace}'",
                fix="push under your own name or an organization you belong to",
            )
        if role == "read":
            raise HubError(
                f"'{user}' has the read role in '{namespace}', which cannot write",
                fix=f"ask an admin of {namespace} for the contributor or write role, or push under your own name",
            )
    return f"{namespace}/{target.repo_id.split('/')[-1]}"


def check_hub_target(target: HubConfig) -> str:
    """Before a long run: a token exists, the hub accepts it, and it may write. Returns the full repository id."""
    token = hub_token()
    api = _api(token)
    return _call(lambda: _full_repo_id(api, target), target.repo_id, token, api.endpoint, retry=None)


def retry_command(folder: Path, target: HubConfig) -> str:
    """The `compress push` command line that uploads `folder` to `target` again."""
    words = ["compress", "push", str(folder), target.repo_id]
    if target.revision != "main":
        words += ["--revision", target.revision]
    if not target.private:
        words.append("--public")
    if target.commit_message:
        words += ["-m", target.commit_message]
    return shlex.join(words)


def push_artifact(folder: Path, target: HubConfig, commit_message: str | None = None, *, quiet: bool = False) -> str:
    """Upload the artifact in `folder` to `target` as one commit; returns the commit's URL.

    Ctrl-C raises UploadInterrupted (a KeyboardInterrupt, so it is never mistaken for a user error).
    """
    folder = Path(folder)
    retry = f"the artifact at '{folder}' is complete; upload it again with `{retry_command(folder, target)}`"
    try:
        files = artifact_files(folder)
        token = hub_token()
        api = _api(token)
        message = target.commit_message or commit_message or f"Upload {folder.name} compressed with compressor"

        def upload() -> str:
            from huggingface_hub import CommitOperationAdd, CommitOperationDelete

            repo_id = _full_repo_id(api, target)
            api.create_repo(repo_id, private=target.private, exist_ok=True)
            if target.revision != "main":
                api.create_branch(repo_id, branch=target.revision, exist_ok=True)
            remote = api.list_repo_files(repo_id, revision=target.revision)
            stale = [
                path for path in remote if path not in files and (path.endswith(WEIGHT_SUFFIXES) or path in STALE_FILES)
            ]
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
            # create_commit, not upload_folder: the latter's pipelined Xet path may split a commit in parts
            info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=target.revision)
            return info.commit_url

        with _progress_bars(not quiet):
            return _call(upload, target.repo_id, token, api.endpoint, retry)
    except KeyboardInterrupt:
        interrupted = UploadInterrupted(
            "during the upload; the hub has all of the commit or none of it, never a part", fix=retry
        )
    raise interrupted


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not shown:
        disable_progress_bars()
    try:
        yield
    finally:
        if not shown and not was_disabled:
            enable_progress_bars()


def _call(action: Callable[[], T], repo_id: str, token: str, endpoint: str, retry: str | None) -> T:
    """Run a hub client action; its failure becomes one HubError with the token masked and no exception chain
    (an HTTP error's request still carries the Authorization header)."""
    try:
        return action()
    except (HubError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - mapped when it is the hub's or the network's; else re-raised (a bug)
        failure = _as_hub_error(err, repo_id, token, endpoint, retry)
        if failure is None:
            raise
    raise failure


def _as_hub_error(err: BaseException, repo_id: str, token: str, endpoint: str, retry: str | None) -> HubError | None:
    """The user-facing HubError for a failure of the hub (HTTP status), its storage or the network; None for
    anything else, which is a defect to report, not a hub failure."""
    from huggingface_hub.errors import HfHubHTTPError

    def fix(first: str) -> str:
        return f"{first}; {retry}" if retry else first

    def masked(text: str) -> str:
        return " ".join(text.replace(token, "***").split())[:300]

    chain = _chain(err)
    http = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
    if http is not None:
        status = http.response.status_code if http.response is not None else None
        said = masked((http.server_message or str(http)).strip().splitlines()[0])
        if status == 401:
            return HubError(
                "the hub rejected the token (401 Unauthorized)",
                fix=fix("set HF_TOKEN to a valid token (or run `hf auth login`)"),
            )
        if status == 403:
            return HubError(
                f"the token may not write to '{repo_id}' (403 Forbidden: {said})",
                fix=fix("use a token with write access to that namespace, or a repository under your own"),
            )
        if status == 429:
            return HubError("the hub is rate-limiting this account (429)", fix=fix("wait a few minutes"))
        if status is not None and status >= 500:
            return HubError(f"the hub failed ({status}: {said})", fix=fix("try again later"))
        return HubError(
            f"the hub refused the upload to '{repo_id}' ({status}: {said})",
            fix=fix("check the repository id and the revision"),
        )
    text = masked(str(err)) or "no detail"
    if any(type(e).__module__.startswith("hf_xet") or "xet" in str(e).lower() for e in chain):
        return HubError(
            f"the upload to the hub's Xet storage failed ({type(err).__name__}: {text})",
            fix=fix("try again; HF_HUB_DISABLE_XET=1 uploads over plain LFS instead"),
        )
    transport = next((e for e in chain if isinstance(e, _transport_errors())), None)
    if transport is not None:
        return HubError(
            f"cannot reach the hub at {endpoint} ({masked(str(transport)) or type(transport).__name__})",
            fix=fix("check the network (or HF_ENDPOINT)"),
        )
    if isinstance(err, ValueError) and text.startswith("Invalid metadata in README.md"):
        return HubError(
            f"the hub rejected the model card's metadata ({text})",
            fix=fix("correct the front matter of README.md in the artifact"),
        )
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes / contexts, outermost first (the client wraps HTTP errors in RuntimeError)."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures: httpx2's (huggingface_hub 2.x's client) and the OS's connection errors."""
    from httpx2 import TransportError

    return (TransportError, ConnectionError, TimeoutError)
