"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints huggingface_hub's upload path calls.

The real hub cannot be reached from CI, so the upload tests run the real huggingface_hub client against this
server. It answers whoami, repo creation (private or public), repo and revision info, file listing, model card
validation, branch creation, preupload (weights and ONNX files as LFS, the rest inline, with the oids of files
already there so unchanged files are skipped), the LFS batch API and its PUT uploads, the Xet write-token
request (refused: Xet storage itself is not modelled) and commit (additions, LFS pointers, deletions). Error
bodies echo the Authorization header, as a careless server might, so the tests can check that the token never
reaches a message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

USER = "tester"
ORGS = [  # what whoami says of the account's organizations
    {"name": "acme", "roleInOrg": "write"},
    {"name": "someone-else", "roleInOrg": "contributor"},  # may create repos, yet the server refuses this one
    {"name": "readers", "roleInOrg": "read"},
]
LFS_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".png")


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that went away (the Ctrl-C test) is expected
        pass


@dataclass
class Repo:
    private: bool
    # a new repository's first commit holds .gitattributes, as on the hub
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """Start with `with FakeHub(token) as hub:`; point HF_ENDPOINT at `hub.url`.

    Knobs: `fail_commit_with` (an HTTP status for the commit call), `interrupt_commit` (the commit call sends
    SIGINT to this process, as Ctrl-C would, and then fails), `read_only` (whoami reports a read token).
    """

    def __init__(self, token: str, forbidden_namespaces: tuple[str, ...] = ()):
        self.token = token
        self.forbidden = set(forbidden_namespaces)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.fail_commit_with: int | None = None
        self.interrupt_commit = False
        self.read_only = False
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict | list) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                if auth != f"Bearer {hub.token}":
                    self.reply(401, {"error": f"Invalid credentials in Authorization header ({auth})"})
                    return False
                return True

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_PUT(self):  # LFS object upload (the href the batch API handed out)
                hub.requests.append(("PUT", self.path))
                data = self.body()
                oid = self.path.rsplit("/", 1)[-1]
                if hashlib.sha256(data).hexdigest() != oid:
                    return self.reply(400, {"error": "sha256 mismatch"})
                hub.lfs_objects[oid] = data
                self.reply(200, {})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if not self.authorized():
                    return
                url = urlparse(self.path)
                if url.path == "/api/whoami-v2":
                    role = "read" if hub.read_only else "write"
                    me = {"name": USER, "type": "user", "orgs": ORGS, "auth": {"accessToken": {"role": role}}}
                    return self.reply(200, me)
                path = unquote(url.path.removeprefix("/api/models/"))
                for action in ("/tree/", "/revision/", "/xet-write-token/"):
                    if action in path:
                        repo_id, revision = path.split(action, 1)
                        break
                else:
                    repo_id, revision, action = path, "main", "/revision/"
                repo = hub.repos.get(repo_id)
                if not url.path.startswith("/api/models/") or repo is None:
                    return self.reply(404, {"error": "Repository not found"})
                if revision not in repo.branches:
                    return self.reply(404, {"error": f"Invalid rev id: {revision}"})
                files = repo.branches[revision]
                if action == "/tree/":
                    return self.reply(200, [self.tree_entry(p, d) for p, d in files.items()])
                if action == "/xet-write-token/":
                    return self.reply(403, {"error": "Xet storage is not available on this hub"})
                sha = f"{sum(c['revision'] == revision for c in repo.commits):040x}"
                self.reply(200, {"id": repo_id, "private": repo.private, "sha": sha})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.body()
                if not self.authorized():
                    return
                if self.path == "/api/repos/create":
                    return self.create_repo(json.loads(body))
                if self.path == "/api/validate-yaml":
                    return self.validate_yaml(json.loads(body)["content"])
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    return self.lfs_batch(json.loads(body))
                path = unquote(self.path.removeprefix("/api/models/"))
                for action in ("/preupload/", "/commit/", "/branch/"):
                    if action in path:
                        repo_id, arg = path.split(action, 1)
                        if repo_id not in hub.repos:
                            return self.reply(404, {"error": "Repository not found"})
                        if repo_id.split("/")[0] in hub.forbidden:
                            return self.reply(
                                403, {"error": f"no write access to {repo_id} for {self.headers['Authorization']}"}
                            )
                        return getattr(self, action.strip("/"))(hub.repos[repo_id], repo_id, arg, body)
                self.reply(404, {"error": "not found"})

            def create_repo(self, payload: dict) -> None:
                namespace = payload.get("organization") or USER
                repo_id = f"{namespace}/{payload['name']}"
                if namespace in hub.forbidden:
                    return self.reply(403, {"error": f"You cannot create a repo in {namespace}"})
                if repo_id in hub.repos:
                    return self.reply(409, {"error": "You already created this model repo", "url": self.url(repo_id)})
                hub.repos[repo_id] = Repo(private=payload.get("visibility", "public") == "private")
                self.reply(200, {"url": self.url(repo_id)})

            def validate_yaml(self, readme: str) -> None:
                _, _, rest = readme.partition("---\n")
                try:
                    metadata = yaml.safe_load(rest.partition("\n---")[0])
                    assert isinstance(metadata, dict)
                except (yaml.YAMLError, AssertionError):
                    return self.reply(400, {"errors": [{"message": "README.md metadata is not a YAML mapping"}]})
                self.reply(200, {"errors": [], "warnings": []})

            def branch(self, repo: Repo, repo_id: str, branch: str, body: bytes) -> None:
                if branch in repo.branches:
                    return self.reply(409, {"error": "Branch already exists"})
                repo.branches[branch] = dict(repo.branches["main"])
                self.reply(200, {})

            def preupload(self, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
                existing = repo.branches.get(revision, {})
                answers = []
                for f in json.loads(body)["files"]:
                    path, lfs = f["path"], is_lfs(f["path"])
                    answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                    if path in existing:
                        data = existing[path]
                        answer["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_oid(data)
                    answers.append(answer)
                self.reply(200, {"files": answers})

            def lfs_batch(self, payload: dict) -> None:
                objects = [
                    {"oid": o["oid"], "size": o["size"]}  # no actions: the hub already stores this object
                    if o["oid"] in hub.lfs_objects
                    else {**o, "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                    for o in payload["objects"]
                ]
                self.reply(200, {"transfer": "basic", "objects": objects})

            def commit(self, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
                if hub.interrupt_commit:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the client waits for this answer
                    return self.reply(503, {"error": "the client went away"})
                if hub.fail_commit_with is not None:
                    return self.reply(hub.fail_commit_with, {"error": "commit failed on the server"})
                if revision not in repo.branches:
                    return self.reply(404, {"error": f"Invalid rev id: {revision}"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                files = dict(repo.branches[revision])
                for item in lines:
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self.reply(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                        files[value["path"]] = hub.lfs_objects[value["oid"]]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                changed = sorted(p for p in files if repo.branches[revision].get(p) != files[p])
                deleted = sorted(set(repo.branches[revision]) - set(files))
                repo.branches[revision] = files
                repo.commits.append(
                    {"revision": revision, "message": header["summary"], "files": changed, "deleted": deleted}
                )
                oid = f"{sum(c['revision'] == revision for c in repo.commits):040x}"
                self.reply(200, {"commitUrl": f"{self.url(repo_id)}/commit/{oid}", "commitOid": oid})

            @staticmethod
            def tree_entry(path: str, data: bytes) -> dict:
                entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
                if is_lfs(path):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                return entry

            def url(self, repo_id: str) -> str:
                return f"{hub.url}/{repo_id}"

        return Handler
