"""A local stand-in for the Hugging Face Hub HTTP API, so that the real clients can be tested offline.

`LocalHubServer` is a small HTTP server (standard library only) that speaks enough of the Hub's protocol for the
unmodified ``huggingface_hub``, ``transformers`` and ``peft`` clients to create repos, push commits, list files and
download them, with ``HF_ENDPOINT`` pointing at it. Nothing is mocked on the client side: requests travel over a
real socket bound to ``127.0.0.1`` on an ephemeral port, and the server keeps every repo in memory.

Storage model
    Each repo (model, dataset or space) is a set of immutable commits. A commit is a full snapshot
    ``{path: file}`` with a new 40-hex sha; branches (``main`` first) and tags point at commits, and every old
    commit stays resolvable by its sha. Like on the Hub, a new repo starts with one commit holding a
    ``.gitattributes`` file. Files are plain git blobs: their oid/ETag is the git blob sha1 of their content.
    There is no LFS or Xet storage: preupload answers ``uploadMode: "regular"`` for every file, so file
    contents travel base64-encoded inside the commit payload (clients must run with ``HF_HUB_DISABLE_XET=1``).

Authentication
    Writes and ``whoami-v2`` need an ``Authorization: Bearer ...`` header (any token, or exactly ``token`` if
    one was given to the constructor); reads are anonymous. Private repos are invisible without a token.

Routes (``{type}`` is ``models``, ``datasets`` or ``spaces``; revisions may be url-encoded, e.g. ``refs%2Fpr%2F1``)
    ``GET  /api/whoami-v2``                                   the user behind the token
    ``POST /api/validate-yaml``                               README metadata check (always valid)
    ``POST /api/repos/create``                                409 (with the repo ``url``) if it exists
    ``DELETE /api/repos/delete``
    ``GET  /api/{type}/{repo_id}[/revision/{rev}]``           repo info: ``sha``, ``siblings``, ``private``...
    ``GET  /api/{type}/{repo_id}/tree/{rev}[/{path}]``        ``?recursive=true`` and ``?expand=true`` supported
    ``POST /api/{type}/{repo_id}/paths-info/{rev}``           form-encoded ``paths`` (repeated) and ``expand``
    ``POST /api/{type}/{repo_id}/preupload/{rev}``            ``uploadMode: "regular"`` + remote oid per file
    ``POST /api/{type}/{repo_id}/commit/{rev}``               ndjson: header, file, deletedFile, deletedFolder;
                                                              ``?create_pr=1`` commits to a new ``refs/pr/N``
    ``GET  /api/{type}/{repo_id}/refs``                       branches, tags (and PR refs with ``include_prs=1``)
    ``GET  /api/{type}/{repo_id}/commits/{rev}``              history, newest first
    ``POST|DELETE /api/{type}/{repo_id}/branch/{branch}``     create (``startingPoint``) / delete a branch
    ``POST /api/{type}/{repo_id}/tag/{rev}``, ``DELETE .../tag/{tag}``
    ``HEAD|GET /[datasets/|spaces/]{repo_id}/resolve/{rev}/{path}``
        ``ETag``, ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``; single ``Range: bytes=...`` requests
        get ``206`` + ``Content-Range`` (``416`` if unsatisfiable).

Errors follow the Hub's conventions so that clients raise their usual exceptions: 404 with header
``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the latter also carries
``X-Repo-Commit``), 401 for missing credentials, 409 for conflicts, 412 for a stale ``parentCommit``, 400 for
malformed requests. Anything else answers 404 without an error code, never a 5xx that clients would retry; a
route that crashes answers 400 and leaves its traceback in ``LocalHubServer.errors``.

Not implemented: LFS / Xet uploads (an ``lfsFile`` commit line is refused with 400), redirects to a CDN (so no
``X-Linked-Etag`` / ``X-Linked-Size``: clients fall back to ``ETag`` / ``Content-Length``), discussions, settings.

Example (``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported: in pytest, use the ``hub_env`` fixture of
``tests/hub_fixtures.py``, which also patches the already imported clients)::

    with LocalHubServer() as hub:
        os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_dummy", HF_HUB_DISABLE_XET="1")
        ...  # import and use huggingface_hub / transformers / peft
        assert "config.json" in hub.list_files("user/tiny-llama")
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import mimetypes
import re
import threading
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubError", "LocalHubServer"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
RANGE_HEADER = re.compile(r"bytes=(\d*)-(\d*)")
# What may follow `/api/{type}/{repo_id}/`
REPO_ACTIONS = frozenset({"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "branch", "tag"})

# What the Hub puts in the first commit of a new repo (abridged list of LFS patterns).
INITIAL_GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as the oid/ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, ``X-Error-Code`` header, json ``error`` body)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    oid: str  # git blob sha1
    last_commit: str  # sha of the commit that last changed this file

    @classmethod
    def create(cls, content: bytes, commit: str) -> StoredFile:
        return cls(content=content, oid=git_blob_sha1(content), last_commit=commit)


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name (incl. refs/pr/N) -> commit sha
    tags: dict[str, str] = field(default_factory=dict)
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag, PR ref, full sha or unambiguous sha prefix (7+ chars) points at."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        if sha is None and re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [candidate for candidate in self.commits if candidate.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class LocalHubServer:
    """An in-memory Hub, served over HTTP on ``127.0.0.1`` (see the module docstring for the routes).

    Args:
        username: the user that ``whoami-v2`` reports, and the namespace of repos created without one.
        token: if set, the only bearer token accepted for writes; by default any token is accepted.
        port: the port to bind; ``0`` (the default) picks a free ephemeral port.
    """

    def __init__(self, username: str = "user", token: str | None = None, port: int = 0):
        self.username = username
        self.token = token
        self._port = port
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self.errors: list[str] = []  # tracebacks of requests that crashed a route (answered with a 400)

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        handler = type("BoundHubRequestHandler", (HubRequestHandler,), {"hub": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHubServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ inspection for tests

    def reset(self) -> None:
        """Forget every repo and the request log."""
        with self._lock:
            self._repos.clear()
            self.request_log.clear()
            self.errors.clear()

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def list_repos(self, repo_type: str | None = None) -> list[str]:
        with self._lock:
            return sorted(rid for rtype, rid in self._repos if repo_type is None or rtype == repo_type)

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> list[str]:
        with self._lock:
            return sorted(self._get_repo(repo_type, repo_id).resolve(revision).files)

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> bytes:
        with self._lock:
            files = self._get_repo(repo_type, repo_id).resolve(revision).files
            if path not in files:
                raise KeyError(f"{path!r} is not in {repo_type} repo {repo_id!r} at {revision!r}")
            return files[path].content

    def head(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> str:
        """The commit sha that ``revision`` (a branch by default) currently points at."""
        with self._lock:
            return self._get_repo(repo_type, repo_id).resolve(revision).sha

    def list_commits(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        with self._lock:
            return [commit.sha for commit in self._history(self._get_repo(repo_type, repo_id), revision)]

    # ------------------------------------------------------------------------------------------- repo storage

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool = True) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_sha(self, *parts: object) -> str:
        seed = json.dumps([next(self._counter), _now(), *map(str, parts)])
        return hashlib.sha1(seed.encode()).hexdigest()

    def _commit(
        self, repo: Repo, branch: str, title: str, description: str, files: dict[str, bytes | StoredFile]
    ) -> Commit:
        """Record a new snapshot on ``branch``; ``files`` is the full new tree (new contents as bytes)."""
        parent = repo.branches.get(branch)
        sha = self._new_sha(repo.repo_type, repo.repo_id, parent, title, sorted(files))
        snapshot = {
            path: StoredFile.create(value, sha) if isinstance(value, bytes) else value
            for path, value in sorted(files.items())
        }
        commit = Commit(sha=sha, parent=parent, title=title, description=description, date=_now(), files=snapshot)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def _history(self, repo: Repo, revision: str) -> list[Commit]:
        commits = []
        commit: Commit | None = repo.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = repo.commits[commit.parent] if commit.parent else None
        return commits

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        self._commit(repo, DEFAULT_BRANCH, "initial commit", "", {".gitattributes": INITIAL_GITATTRIBUTES})
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}"


class HubRequestHandler(BaseHTTPRequestHandler):
    """Parses one request, dispatches it to a route method and writes the answer. State lives in ``hub``."""

    hub: LocalHubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections
    server_version = "LocalHubServer/1.0"
    timeout = 60  # idle keep-alive connections are closed after this many seconds

    # ------------------------------------------------------------------------------------------ HTTP plumbing

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in `hub.request_log` instead of being printed

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        body = self._read_body()
        try:
            with self.hub._lock:
                status, headers, payload = self._route(method, split.path, body)
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            status, payload = error.status, {"error": error.message}
        except Exception as error:  # noqa: BLE001 - a crash must not look like a flaky server (clients retry 5xx)
            self.hub.errors.append(traceback.format_exc())
            status, headers, payload = 400, {}, {"error": f"LocalHubServer failed: {error!r}"}
        self._send(method, status, headers, payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
                if size == 0:
                    break
                chunks.append(chunk)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, method: str, status: int, headers: dict[str, str], payload: Any) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers.setdefault("Content-Length", str(len(data)))
        self.send_response(status)
        for name, value in headers.items():
            # Header values must be latin-1 on a single line: escape anything else (e.g. unicode file names).
            self.send_header(name, " ".join(value.encode("ascii", "backslashreplace").decode().splitlines()))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)
        self.hub.request_log.append((method, self.path, status))

    @property
    def bearer_token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip() or None

    @property
    def authorized(self) -> bool:
        token = self.bearer_token
        return token is not None and (self.hub.token is None or token == self.hub.token)

    def _require_auth(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    # ------------------------------------------------------------------------------------------------ routing

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        segments = path.strip("/").split("/")
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self.whoami()
            if rest == ["validate-yaml"] and method == "POST":
                return 200, {}, {"errors": [], "warnings": []}
            if rest == ["repos", "create"] and method == "POST":
                return self.create_repo(json.loads(body or b"{}"))
            if rest == ["repos", "delete"] and method == "DELETE":
                return self.delete_repo(json.loads(body or b"{}"))
            if rest and rest[0] in REPO_TYPES:
                repo_type = REPO_TYPES[rest[0]]
                repo_id, action, args = self._split_repo_path(rest[1:])
                return self.repo_api(method, repo_type, repo_id, action, args, body)
        elif "resolve" in segments[:4] and method in ("GET", "HEAD"):
            repo_type = REPO_TYPES[segments[0]] if segments[0] in ("datasets", "spaces") else "model"
            segments = segments[1:] if repo_type != "model" else segments
            index = segments.index("resolve") if "resolve" in segments[:3] else -1
            if index in (1, 2) and len(segments) >= index + 3:
                repo_id = "/".join(segments[:index])
                revision = unquote(segments[index + 1])
                filename = "/".join(unquote(part) for part in segments[index + 2 :])
                return self.resolve(method, repo_type, repo_id, revision, filename)
        raise HubError(404, f"Not found: {method} {path} (route not implemented by LocalHubServer)")

    @staticmethod
    def _split_repo_path(segments: list[str]) -> tuple[str, str | None, list[str]]:
        """``[ns, name, action, *args]`` or ``[name, action, *args]`` -> (repo_id, action, args)."""
        if len(segments) >= 2 and segments[1] not in REPO_ACTIONS:
            repo_id, rest = "/".join(segments[:2]), segments[2:]
        else:
            repo_id, rest = segments[0], segments[1:]
        if not rest:
            return repo_id, None, []
        if rest[0] not in REPO_ACTIONS:
            raise HubError(404, f"Unknown repo route: {'/'.join(rest)}")
        return repo_id, rest[0], [unquote(part) for part in rest[1:]]

    def repo_api(
        self, method: str, repo_type: str, repo_id: str, action: str | None, args: list[str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        repo = self.hub._get_repo(repo_type, repo_id, authorized=self.authorized)
        revision = args[0] if args else DEFAULT_BRANCH
        subpath = "/".join(args[1:])
        match (method, action):
            case ("GET", None) | ("GET", "revision"):
                return self.repo_info(repo, revision)
            case ("GET", "tree"):
                return self.tree(repo, revision, subpath)
            case ("POST", "paths-info"):
                return self.paths_info(repo, revision, body)
            case ("POST", "preupload"):
                return self.preupload(repo, revision, json.loads(body or b"{}"))
            case ("POST", "commit"):
                return self.commit(repo, revision, body)
            case ("GET", "refs"):
                return self.refs(repo)
            case ("GET", "commits"):
                return self.commits(repo, revision)
            case ("POST", "branch") | ("DELETE", "branch"):
                return self.branch(method, repo, "/".join(args), json.loads(body or b"{}"))
            case ("POST", "tag") | ("DELETE", "tag"):
                return self.tag(method, repo, "/".join(args), json.loads(body or b"{}"))
        raise HubError(404, f"Not found: {method} {action} on {repo_type} {repo_id}")

    # ------------------------------------------------------------------------------------------------- routes

    def whoami(self) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        user = self.hub.username
        return (
            200,
            {},
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def _repo_key_from_payload(self, payload: dict) -> tuple[str, str]:
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        return repo_type, f"{payload.get('organization') or self.hub.username}/{name}"

    def create_repo(self, payload: dict) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        repo_type, repo_id = self._repo_key_from_payload(payload)
        url = self.hub.repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.hub._repos:
            return (
                409,
                {"X-Error-Message": "You already created this repo"},
                {
                    "error": "You already created this repo",
                    "url": url,
                },
            )
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        self.hub._create_repo(repo_type, repo_id, private=private)
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def delete_repo(self, payload: dict) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        repo_type, repo_id = self._repo_key_from_payload(payload)
        self.hub._get_repo(repo_type, repo_id)
        del self.hub._repos[(repo_type, repo_id)]
        return 200, {}, {}

    def repo_info(self, repo: Repo, revision: str) -> tuple[int, dict[str, str], Any]:
        commit = repo.resolve(revision)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, stored in commit.files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(stored.content), blobId=stored.oid)
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(stored.content) for stored in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return 200, {}, info

    @staticmethod
    def _file_entry(path: str, stored: StoredFile, repo: Repo, expand: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": stored.oid, "size": len(stored.content), "path": path}
        if expand:
            last = repo.commits[stored.last_commit]
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _folder_entry(path: str, commit: Commit, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        content = sorted((name, stored.oid) for name, stored in commit.files.items() if name.startswith(prefix))
        entry: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(content).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    @staticmethod
    def _folders(commit: Commit) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in commit.files for depth in range(1, path.count("/") + 1)}

    def tree(self, repo: Repo, revision: str, subpath: str) -> tuple[int, dict[str, str], Any]:
        commit = repo.resolve(revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        subpath = subpath.strip("/")
        folders = self._folders(commit)
        if subpath and subpath not in folders:
            raise HubError(404, f"Entry not found: {subpath}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        prefix = subpath + "/" if subpath else ""
        depth = prefix.count("/")

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or path.count("/") == depth)

        entries = [self._folder_entry(path, commit, expand) for path in sorted(folders) if wanted(path)]
        entries += [self._file_entry(p, f, repo, expand) for p, f in commit.files.items() if wanted(p)]
        return 200, {}, entries

    def paths_info(self, repo: Repo, revision: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        commit = repo.resolve(revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        folders = self._folders(commit)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(path, commit.files[path], repo, expand))
            elif path in folders:
                entries.append(self._folder_entry(path, commit, expand))
        return 200, {}, entries

    def preupload(self, repo: Repo, revision: str, payload: dict) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        creating_pr = self.query.get("create_pr") == "1"
        files = {} if creating_pr and revision not in repo.branches else repo.resolve(revision).files
        answer = []
        for file in payload.get("files", []):
            remote = files.get(file["path"])
            answer.append(
                {
                    "path": file["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": remote.oid if remote else None,
                }
            )
        return 200, {}, {"files": answer}

    def commit(self, repo: Repo, revision: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first ndjson line of a commit must be its header")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr") == "1"
        if revision not in repo.branches and not create_pr:
            if revision in repo.tags or revision in repo.commits:
                raise HubError(400, f"Cannot commit to {revision}: not a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        base = repo.resolve(revision)
        parent = header.get("parentCommit")
        if parent and not base.sha.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: {revision} is now at {base.sha}")

        files: dict[str, bytes | StoredFile] = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                encoding = value.get("encoding", "base64")
                content = value.get("content", "")
                data = base64.b64decode(content) if encoding == "base64" else content.encode()
                unchanged = isinstance(files.get(path), StoredFile) and files[path].content == data
                if not unchanged:
                    files[path] = data
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [name for name in files if name.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in doomed:
                    del files[name]
            elif key == "lfsFile":
                raise HubError(400, "LocalHubServer stores no LFS objects: preupload only answers 'regular'")
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")

        pr_url = None
        branch = revision
        if create_pr:
            repo.num_prs += 1
            branch = f"refs/pr/{repo.num_prs}"
            repo.branches[branch] = base.sha
            pr_url = f"{self.hub.repo_url(repo.repo_type, repo.repo_id)}/discussions/{repo.num_prs}"
        new = self.hub._commit(repo, branch, header.get("summary", ""), header.get("description", ""), files)
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": new.sha,
                "commitUrl": f"{self.hub.repo_url(repo.repo_type, repo.repo_id)}/commit/{new.sha}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    def refs(self, repo: Repo) -> tuple[int, dict[str, str], Any]:
        def ref(kind: str, name: str, sha: str) -> dict[str, str]:
            return {
                "name": name,
                "ref": name if name.startswith("refs/") else f"refs/{kind}/{name}",
                "targetCommit": sha,
            }

        branches = [ref("heads", n, sha) for n, sha in repo.branches.items() if not n.startswith("refs/pr/")]
        prs = [ref("pr", n, sha) for n, sha in repo.branches.items() if n.startswith("refs/pr/")]
        answer = {"branches": branches, "converts": [], "tags": [ref("tags", n, s) for n, s in repo.tags.items()]}
        if self.query.get("include_prs") == "1":
            answer["pullRequests"] = prs
        return 200, {}, answer

    def commits(self, repo: Repo, revision: str) -> tuple[int, dict[str, str], Any]:
        return (
            200,
            {},
            [
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.description,
                    "authors": [{"user": self.hub.username, "avatar": None}],
                    "date": commit.date,
                }
                for commit in self.hub._history(repo, revision)
            ],
        )

    def branch(self, method: str, repo: Repo, name: str, payload: dict) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        if method == "DELETE":
            if name not in repo.branches or name == DEFAULT_BRANCH:
                raise HubError(404 if name not in repo.branches else 403, f"Cannot delete branch {name}")
            del repo.branches[name]
            return 200, {}, {}
        if name in repo.branches:
            raise HubError(409, f"Branch {name} already exists")
        repo.branches[name] = repo.resolve(payload.get("startingPoint") or DEFAULT_BRANCH).sha
        return 200, {}, {}

    def tag(self, method: str, repo: Repo, name: str, payload: dict) -> tuple[int, dict[str, str], Any]:
        self._require_auth()
        if method == "DELETE":
            if name not in repo.tags:
                raise HubError(404, f"Tag {name} does not exist")
            del repo.tags[name]
            return 200, {}, {}
        tag = payload.get("tag")
        if not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = repo.resolve(name).sha  # for POST, the url names the revision to tag
        return 200, {}, {}

    def resolve(
        self, method: str, repo_type: str, repo_id: str, revision: str, filename: str
    ) -> tuple[int, dict[str, str], Any]:
        repo = self.hub._get_repo(repo_type, repo_id, authorized=self.authorized)
        commit = repo.resolve(revision)
        stored = commit.files.get(filename)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        content, size = stored.content, len(stored.content)
        headers = {
            "Content-Type": mimetypes.guess_type(filename)[0] or "application/octet-stream",
            "ETag": f'"{stored.oid}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        requested = self.headers.get("Range")
        if requested is None:
            return 200, headers, content
        match = RANGE_HEADER.fullmatch(requested.strip())
        if match is None or match.groups() == ("", ""):
            raise HubError(416, f"Unsupported range: {requested}", headers={"Content-Range": f"bytes */{size}"})
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            raise HubError(416, f"Unsatisfiable range: {requested}", headers={"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, headers, content[start : end + 1]
