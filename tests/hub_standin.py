"""A local stand-in for the Hugging Face Hub's HTTP API, for tests without network (HF_ENDPOINT / endpoint=).

Only what huggingface_hub calls to download and upload a model repository, as read from its source
(file_download.py, hf_api.py, _commit_api.py):

    HEAD/GET /{org}/{name}/resolve/{revision}/{file}   X-Repo-Commit, ETag, Content-Length (Range on GET);
                                                       404 with X-Error-Code RepoNotFound / RevisionNotFound /
                                                       EntryNotFound, as the Hub answers
    GET  /api/models/{org}/{name}[/revision/{rev}]     model info: sha and siblings (the file listing)
    POST /api/repos/create                             {"name", "organization"} → {"url"}; 409 when it exists
    POST /api/models/{org}/{name}/branch/{branch}      a branch at main (or "startingPoint"); 409 when it exists
    POST /api/models/{org}/{name}/preupload/{rev}      every file "regular" (no LFS: contents go in the commit)
    POST /api/models/{org}/{name}/commit/{rev}         NDJSON: a header, then {"key": "file", base64 content}
                                                       and {"key": "deletedFile", "path"} lines

Repositories are git-like: commits are {path: bytes} snapshots named by a SHA-1 of their contents, branches point
at commits. Every request is recorded in `requests` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class StandInHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id → {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------------------- content
    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit holding exactly `files` at the head of `branch`."""
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        digest = hashlib.sha1(repr((repo_id, branch, len(repo["commits"]))).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo["commits"][sha] = dict(files)
        repo["branches"][branch] = sha
        return sha

    def publish(self, repo_id: str, directory: Path, branch: str = "main") -> str:
        """Commits every file of a local directory (a saved checkpoint)."""
        files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        return self.commit(repo_id, files, branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["branches"].get(revision, revision)]

    # ------------------------------------------------------------------------------------------- serving
    def start(self) -> "StandInHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the test output is the place for failures only
                pass

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"  # kept after stop(): a stopped stand-in is a Hub that cannot be reached
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        self.requests.append((method, unquote(path)))
        self.auth.append(h.headers.get("Authorization"))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            if method in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(h, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            if method == "GET" and parts[:2] == ["api", "models"] and len(parts) in (4, 6):
                return self._info(h, "/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main")
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create(h, json.loads(body))
            if method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6:
                repo_id, action, rev = "/".join(parts[2:4]), parts[4], parts[5]
                if action == "branch":
                    return self._branch(h, repo_id, rev, json.loads(body or b"{}"))
                if action == "preupload":
                    return self._preupload(h, repo_id, json.loads(body))
                if action == "commit":
                    return self._commit(h, repo_id, rev, body)
            self._send(h, 404, b"not a stand-in endpoint")
        except _Refused as r:
            # the Hub's error bodies are JSON: {"error": message} (plus "url" for a repository that exists)
            self._send(h, r.status, json.dumps({"error": r.message, **r.extra}).encode(),
                       {"X-Error-Code": r.code, "Content-Type": "application/json", **r.headers}, head=method == "HEAD")

    def _commit_of(self, repo_id: str, revision: str) -> str:
        if repo_id not in self.repos:
            raise _Refused(404, "RepoNotFound", f"Repository {repo_id} not found")
        repo = self.repos[repo_id]
        sha = repo["branches"].get(revision, revision)
        if sha not in repo["commits"]:
            raise _Refused(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _resolve(self, h, method: str, repo_id: str, revision: str, filename: str) -> None:
        sha = self._commit_of(repo_id, revision)
        files = self.repos[repo_id]["commits"][sha]
        if filename not in files:
            raise _Refused(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": sha})
        data = files[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = h.headers.get("Range")
        if method == "GET" and rng and rng.startswith("bytes=") and rng[6:].rstrip("-").isdigit():
            start = int(rng[6:].rstrip("-"))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(h, 206 if start else 200, data[start:], headers, head=method == "HEAD")

    def _info(self, h, repo_id: str, revision: str) -> None:
        sha = self._commit_of(repo_id, revision)
        siblings = [{"rfilename": n} for n in sorted(self.repos[repo_id]["commits"][sha])]
        self._json(h, {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False,
                       "tags": [], "downloads": 0, "likes": 0})

    def _create(self, h, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            raise _Refused(409, "RepoExists", "You already created this model repo",
                           extra={"url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = {"branches": {}, "commits": {}}
        self.commit(repo_id, {})  # the Hub starts a repository with an initial commit on main
        self._json(h, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _branch(self, h, repo_id: str, branch: str, payload: dict) -> None:
        start = self._commit_of(repo_id, payload.get("startingPoint") or "main")
        branches = self.repos[repo_id]["branches"]
        if branch in branches:
            raise _Refused(409, "BranchExists", f"Branch {branch} already exists")
        branches[branch] = start
        self._json(h, {})

    def _preupload(self, h, repo_id: str, payload: dict) -> None:
        self._commit_of(repo_id, "main")
        self._json(h, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                 for f in payload["files"]]})

    def _commit(self, h, repo_id: str, revision: str, body: bytes) -> None:
        self._commit_of(repo_id, revision)
        files = dict(self.files(repo_id, revision))
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                if files.pop(item["value"]["path"], None) is None:
                    raise _Refused(404, "EntryNotFound", "A file with this name doesn't exist")
            elif item["key"] != "header":
                raise _Refused(400, "BadRequest", f"the stand-in does not take {item['key']!r} operations")
        sha = self.commit(repo_id, files, revision)
        self._json(h, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    # ------------------------------------------------------------------------------------------- replies
    def _json(self, h, obj) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        h.close_connection = True  # one request a connection: after stop() no kept-alive connection still answers
        h.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.extra = headers or {}, extra or {}
