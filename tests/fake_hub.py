"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints huggingface_hub's upload path calls.

The real hub cannot be reached from CI, so the upload tests run the real huggingface_hub client against this
server. It answers whoami, repo creation (private or public), repo info, model card validation, branch creation,
preupload (every file as a regular upload, sent inline) and commit, and keeps each branch's files in memory.
Error bodies echo the Authorization header, as a careless server might, so the tests can check that the token
never reaches a message.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import yaml

USER = "tester"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """Start with `with FakeHub(token) as hub:`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self, token: str, forbidden_namespaces: tuple[str, ...] = ()):
        self.token = token
        self.forbidden = set(forbidden_namespaces)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commit_with: int | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
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

            def reply(self, status: int, body: dict) -> None:
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

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if not self.authorized():
                    return
                if self.path == "/api/whoami-v2":
                    return self.reply(200, {"name": USER, "type": "user", "auth": {"type": "access_token"}})
                repo_id = unquote(self.path.removeprefix("/api/models/")).split("/revision/")[0]
                if self.path.startswith("/api/models/") and repo_id in hub.repos:
                    return self.reply(200, {"id": repo_id, "private": hub.repos[repo_id].private, "sha": "0" * 40})
                self.reply(404, {"error": "Repository not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.authorized():
                    return
                if self.path == "/api/repos/create":
                    return self.create_repo(json.loads(body))
                if self.path == "/api/validate-yaml":
                    return self.validate_yaml(json.loads(body)["content"])
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
                    return self.reply(
                        409, {"error": "You already created this model repo", "url": self.repo_url(repo_id)}
                    )
                hub.repos[repo_id] = Repo(private=payload.get("visibility", "public") == "private")
                self.reply(200, {"url": self.repo_url(repo_id)})

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
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                self.reply(200, {"files": modes})

            def commit(self, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
                if hub.fail_commit_with is not None:
                    return self.reply(hub.fail_commit_with, {"error": "commit failed on the server"})
                if revision not in repo.branches:
                    return self.reply(404, {"error": f"Invalid rev id: {revision}"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                added = {
                    item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines
                    if item["key"] == "file"
                }
                repo.branches[revision].update(added)
                oid = f"{len(repo.commits) + 1:040x}"
                repo.commits.append({"revision": revision, "message": header["summary"], "files": sorted(added)})
                self.reply(200, {"commitUrl": f"{self.repo_url(repo_id)}/commit/{oid}", "commitOid": oid})

            def repo_url(self, repo_id: str) -> str:
                return f"{hub.url}/{repo_id}"

        return Handler
