"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for testing `gptq push` end to end
with the real huggingface_hub client (HF_ENDPOINT pointed here). Stdlib only: http.server in a
thread.

It implements exactly the endpoints huggingface_hub (2.x) calls to create a repo and commit files:

    GET  /api/agent-harnesses
        the client's agent-detection registry (best effort)
    POST /api/repos/create
        create_repo (409 + url when it exists: exist_ok)
    GET  /api/models/{repo}
        repo_info (create_repo's check after a 401/403)
    POST /api/models/{repo}/branch/{branch}
        create_branch
    POST /api/validate-yaml
        create_commit checks README.md's metadata first
    POST /api/models/{repo}/preupload/{revision}
        _fetch_upload_modes: "lfs" or "regular" per file
    POST /{repo}.git/info/lfs/objects/batch
        the git-LFS batch API: where to PUT each object
    PUT  /lfs-upload/{oid}
        the upload itself (a pre-signed URL on the real Hub)
    POST /{repo}.git/info/lfs/objects/verify
        the LFS verify action
    POST /api/models/{repo}/commit/{revision}
        the NDJSON commit: header, file (base64), lfsFile lines

Large files take the LFS path only when huggingface_hub's Xet upload is off (HF_HUB_DISABLE_XET;
hf_xet speaks to a separate storage service that this server does not imitate). Every request is
recorded in `requests`, unknown ones also in `unhandled` (answered 404); `fail(endpoint, status)`
makes the next call of a named endpoint fail. Uploaded content is checked (sha256 = oid, sizes) and
stored byte for byte: `files(repo_id, branch)` gives what a clone of the branch would hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

# The real Hub stores these as LFS whatever their size (its default .gitattributes), and anything >=
# 10 MiB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, path pattern, endpoint name = the _handle_<name> method)
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", rf"/api/models/{_REPO}", "repo_info"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", "commit"),
]
# Endpoints called without the user's token (on the real Hub the upload URL is pre-signed storage).
UNAUTHENTICATED = {"agent_harnesses", "lfs_upload"}


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **body: Any):
        super().__init__(message)
        self.status, self.message, self.error_code, self.body = status, message, error_code, body


class HubServer:
    """The Hub's state (repos, LFS objects) and the HTTP server around it; use as a context
    manager."""

    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched
        self._failures: dict[str, int] = {}  # endpoint name -> status of its next answer
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def fail(self, endpoint: str, status: int = 500) -> None:
        """Answer the next request to `endpoint` (a name from ROUTES) with `status`."""
        self._failures[endpoint] = status

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[branch])

    def endpoints_called(self) -> list[str]:
        return [_route(method, path)[0] or f"{method} {path}" for method, path in self.requests]

    # ----- endpoints: each gets the route's match groups and the parsed body, returns the JSON
    # answer -----

    def _handle_agent_harnesses(self, body: dict, headers: dict) -> dict:
        return {"standardEnvVars": [], "harnesses": {}}

    def _handle_create_repo(self, body: dict, headers: dict) -> dict:
        repo_id = (
            f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        )
        if repo_id in self.repos:
            # the client reads the url from this answer too (create_repo with exist_ok)
            raise HttpError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _handle_repo_info(self, body: dict, headers: dict, repo: str) -> dict:
        info = self._repo(repo)
        return {
            "id": repo,
            "private": info.private,
            "sha": info.commits[-1]["oid"] if info.commits else None,
            "siblings": [{"rfilename": path} for path in sorted(info.branches["main"])],
        }

    def _handle_create_branch(self, body: dict, headers: dict, repo: str, branch: str) -> dict:
        branches = self._repo(repo).branches
        if branch in branches:
            raise HttpError(409, f"Reference refs/heads/{branch} already exists")
        branches[branch] = dict(branches[body.get("startingPoint") or "main"])
        return {}

    def _handle_validate_yaml(self, body: dict, headers: dict) -> dict:
        text = body["content"]
        if text.startswith("---"):
            try:
                yaml.safe_load(text[3:].split("\n---", 1)[0])
            except yaml.YAMLError as e:
                raise HttpError(400, f"invalid YAML metadata: {e}") from None
        return {"errors": [], "warnings": []}

    def _handle_preupload(self, body: dict, headers: dict, repo: str, revision: str) -> dict:
        self._branch(repo, revision)
        return {
            "files": [
                {
                    "path": f["path"],
                    "shouldIgnore": False,
                    "oid": None,
                    "uploadMode": "lfs"
                    if f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                    else "regular",
                }
                for f in body["files"]
            ]
        }

    def _handle_lfs_batch(self, body: dict, headers: dict, repo: str) -> dict:
        self._repo(repo)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            # already stored objects get no actions: nothing to send
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _handle_lfs_upload(self, content: bytes, headers: dict, oid: str) -> dict:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HttpError(400, "uploaded content does not match its sha256 oid")
        self.lfs_objects[oid] = content
        return {}

    def _handle_lfs_verify(self, body: dict, headers: dict, repo: str) -> dict:
        stored = self.lfs_objects.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            raise HttpError(404, f"LFS object {body['oid']} of {body['size']} bytes not found")
        return {}

    def _handle_commit(self, lines: list[dict], headers: dict, repo: str, revision: str) -> dict:
        files = self._branch(repo, revision)
        if (
            headers.get("content-type") != "application/x-ndjson"
            or not lines
            or lines[0]["key"] != "header"
        ):
            raise HttpError(400, "a commit is NDJSON starting with a header line")
        added = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None or len(content) != value.get("size", len(content)):
                    raise HttpError(
                        400, f"LFS object {value['oid']} for {value['path']} was never uploaded"
                    )
                added[value["path"]] = content
            else:
                raise HttpError(400, f"unsupported commit line {line['key']!r}")
        files.update(added)
        oid = hashlib.sha1(
            json.dumps([repo, revision, len(self.repos[repo].commits), sorted(added)]).encode()
        ).hexdigest()
        self.repos[repo].commits.append(
            {
                "oid": oid,
                "branch": revision,
                "summary": lines[0]["value"]["summary"],
                "description": lines[0]["value"].get("description", ""),
                "files": sorted(added),
            }
        )
        return {
            "commitUrl": f"{self.url}/{repo}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo_id: str, revision: str) -> dict[str, bytes]:
        branches = self._repo(repo_id).branches
        if revision not in branches:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return branches[revision]

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one request; runs under the server's lock."""
        with self._lock:
            self.requests.append((method, path))
            name, groups = _route(method, path)
            if name is None:
                self.unhandled.append((method, path))
                return 404, {"error": f"no such endpoint: {method} {path}"}, {}
            try:
                if (
                    name not in UNAUTHENTICATED
                    and headers.get("authorization") != f"Bearer {self.token}"
                ):
                    raise HttpError(401, "Invalid credentials in Authorization header")
                if name in self._failures:
                    raise HttpError(self._failures.pop(name), f"injected failure of {name}")
                payload: Any = body
                if name == "commit":
                    payload = [json.loads(line) for line in body.splitlines() if line.strip()]
                elif name != "lfs_upload":
                    payload = json.loads(body or b"{}")
                return 200, getattr(self, f"_handle_{name}")(payload, headers, **groups), {}
            except HttpError as e:
                extra = {"X-Error-Code": e.error_code} if e.error_code else {}
                return e.status, {"error": e.message, **e.body}, extra


def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    for route_method, pattern, name in ROUTES:
        match = re.fullmatch(pattern, path)
        if match and method == route_method:
            return name, {k: unquote(v) for k, v in match.groupdict().items()}
    return None, {}


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def _serve(self) -> None:
            body = self._read_body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer, extra = server.answer(
                self.command, urlsplit(self.path).path, headers, body
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                    if size == 0:
                        return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    return Handler
