"""A loopback stand-in for the Hugging Face Hub's HTTP API (the calls ``push_to_hub`` makes):
a real HTTP server on 127.0.0.1 that records repo creations, branches and commits, so a test
sees exactly which files an upload sends, and no test reaches the network.

Use the ``fake_hub`` fixture (tests/conftest.py): it points ``huggingface_hub`` at the server
and lifts offline mode for the test.
"""
from __future__ import annotations

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """``repos``: name -> the create request's JSON; ``commits``: one dict per commit with
    ``repo``, ``revision`` (``refs/pr/N`` for a pull request's), ``summary``, ``description`` and
    ``files`` (path -> bytes);
    ``branches``: (repo, branch) created; ``pulls``: pull requests opened (repo, num, title,
    description); ``requests``: (method, path) of every request."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.pulls: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            return gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body

        def _send(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_HEAD(self):  # e.g. a README lookup: the fake repos start empty
            hub.requests.append(("HEAD", self.path))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            hub.requests.append(("GET", self.path))
            path = self.path.split("?")[0]
            if path.startswith("/api/models/") and "/discussions/" in path:
                repo, num = path.removeprefix("/api/models/").split("/discussions/")
                pr = next(p for p in hub.pulls if p["repo"] == repo and p["num"] == int(num))
                return self._send(200, {
                    "title": pr["title"], "num": pr["num"], "author": {"name": "user"},
                    "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                    "repo": {"name": repo, "type": "model"}, "events": [], "filesWithConflicts": [],
                    "changes": {"base": "refs/heads/main"}, "diff": ""})
            self._send(404, {"error": "Entry not found"})

        def do_POST(self):
            hub.requests.append(("POST", self.path))
            body = self._body()
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req.get('organization') or 'user'}/{req['name']}"
                hub.repos[repo] = req
                return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if path.startswith("/api/models/") and "/branch/" in path:
                repo, branch = path.removeprefix("/api/models/").split("/branch/")
                hub.branches.append((repo, branch))
                return self._send(200, {})
            if path.startswith("/api/models/") and path.endswith("/discussions"):
                repo = path.removeprefix("/api/models/").removesuffix("/discussions")
                req = json.loads(body)
                hub.pulls.append(dict(repo=repo, num=len(hub.pulls) + 1, title=req["title"],
                                      description=req.get("description")))
                return self._send(200, {"num": len(hub.pulls)})
            if path.startswith("/api/models/") and "/preupload/" in path:
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if path.startswith("/api/models/") and "/commit/" in path:
                repo, revision = path.removeprefix("/api/models/").split("/commit/")
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                         for x in lines if x["key"] == "file"}
                hub.commits.append(dict(repo=repo, revision=revision.replace("%2F", "/"),
                                        summary=header.get("summary"), description=header.get("description"),
                                        files=files))
                return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                        "pullRequestUrl": None})
            self._send(404, {"error": f"fake hub: no route for POST {path}"})

    return Handler
