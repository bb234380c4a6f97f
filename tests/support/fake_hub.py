"""A fake Hugging Face Hub on loopback that speaks what huggingface_hub's downloads ask of the real one.

Endpoints (see shared/TESTING.md):
- `GET /api/models/{repo}[/revision/{rev}]` -> id, sha, siblings (with sizes/LFS when `?blobs=true`);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=` -> entries, paginated by a `Link` header;
- `HEAD|GET /{repo}/resolve/{rev}/{path}` -> X-Repo-Commit, quoted ETag (sha256 for LFS files, else the
  git blob sha1: it becomes the cache's blob name), Content-Length, X-Linked-Size, single-range 206;
- errors: 404 with `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`; with `token=` set,
  401 as the Hub answers it (no or wrong `Authorization: Bearer`).
It never sends Xet headers, so clients stay on plain HTTP. Faults for robustness tests: `fail_next`,
`drop_next` (cut a body short), `available = False`. `requests` logs (method, path) for counting.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.loopback import HOST, LoopbackServer

DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's own limit for plain git files
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` for a plain file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_tree(directory: Path) -> dict[str, bytes]:
    """{"/"-separated relative path: bytes} of every file under `directory`: a repo's content for add_repo."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in files}


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    """One file of one commit, with the identifiers the Hub derives from it."""

    path: str
    data: bytes
    oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    sha256: str | None = None  # set for LFS files only
    pointer_size: int | None = None

    @classmethod
    def build(cls, path: str, data: bytes, lfs: bool) -> HubFile:
        if not lfs:
            return cls(path, data, git_blob_sha1(data))
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = lfs_pointer(sha256, len(data))
        return cls(path, data, git_blob_sha1(pointer), sha256, len(pointer))

    @property
    def etag(self) -> str:
        """The blob name huggingface_hub gives this file in its cache."""
        return self.sha256 or self.oid

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": self.path, "size": len(self.data), "oid": self.oid}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            sibling.update(size=len(self.data), blobId=self.oid)
            if self.sha256 is not None:
                sibling["lfs"] = {"sha256": self.sha256, "size": len(self.data),
                                  "pointerSize": self.pointer_size}
        return sibling


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _commit_sha(repo_id: str, files: Mapping[str, HubFile]) -> str:
    """Deterministic: the same content registered twice gets the same commit."""
    digest = hashlib.sha1(repo_id.encode())
    for path in sorted(files):
        digest.update(f"\0{path}\0{files[path].oid}".encode())
    return digest.hexdigest()


def _directories(paths: list[str]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return found


@dataclass
class Fault:
    remaining: int
    status: int
    matches: Callable[[str, str], bool]
    cut_after: int | None = None  # drop_next: bytes of body sent before the connection is closed


class FakeHub(LoopbackServer):
    """The fake Hub server. Thread-safe: handlers run on their own threads."""

    thread_name = "fake-hub"
    not_started = "FakeHub is not started"

    def __init__(self, *, token: str | None = None, tree_page_size: int = 1000) -> None:
        super().__init__()
        self.token = token
        self.tree_page_size = tree_page_size
        self.available = True  # False: every request gets 503, as a Hub outage
        self.requests: list[tuple[str, str]] = []
        self.range_requests: list[tuple[str, str]] = []  # (path, Range header) of ranged file requests
        self._repos: dict[str, HubRepo] = {}
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    # -- lifecycle (start, stop, `with`: tests.support.loopback) ---------------------------------------

    def _make_server(self) -> ThreadingHTTPServer:
        return _Server((HOST, 0), _Handler, self)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- content ----------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], commit: str | None = None, *,
                 lfs_threshold: int = DEFAULT_LFS_THRESHOLD, branch: str = "main") -> str:
        """Register a commit of `repo_id` and point `branch` at it; returns the 40-hex commit sha.

        Calling it again for the same repo adds another commit (older ones stay resolvable by sha).
        """
        entries = {
            path: HubFile.build(path, data, path.endswith(LFS_SUFFIXES) or len(data) > lfs_threshold)
            for path, data in files.items()
        }
        sha = commit or _commit_sha(repo_id, entries)
        if not COMMIT_RE.match(sha):
            raise ValueError(f"commit must be 40 lowercase hex digits: {sha!r}")
        with self._lock:
            repo = self._repos.setdefault(repo_id, HubRepo(repo_id))
            repo.commits[sha] = entries
            repo.refs[branch] = sha
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        """The registered files of a revision (tests compare the cache against these)."""
        repo = self._repos[repo_id]
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return dict(repo.commits[commit])

    # -- faults and observation ------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500, *, method: str | None = None,
                  path_contains: str | None = None) -> None:
        """Answer the next `n` matching requests with `status` (a small JSON error body)."""
        self._add_fault(Fault(n, status, self._matcher(method, path_contains)))

    def drop_next(self, n: int = 1, *, after: int = 0, path_contains: str = "/resolve/") -> None:
        """Cut the next `n` matching GET bodies after `after` bytes: the client sees a short read."""
        self._add_fault(Fault(n, 200, self._matcher("GET", path_contains), cut_after=after))

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and path_contains in p)

    def downloads(self) -> list[str]:
        """Paths of every file body served (GET on /resolve/), in order."""
        with self._lock:
            return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.range_requests.clear()

    @staticmethod
    def _matcher(method: str | None, path_contains: str | None) -> Callable[[str, str], bool]:
        def matches(m: str, path: str) -> bool:
            return (method is None or m == method) and (path_contains is None or path_contains in path)
        return matches

    def _add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
            self._faults = [f for f in self._faults if f.remaining > 0]
        return None

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _record_range(self, path: str, header: str) -> None:
        with self._lock:
            self.range_requests.append((path, header))

    def _repo_for(self, rest: str) -> tuple[HubRepo, str] | None:
        """Split `org/name/tail...` into a registered repo and the tail (repo ids contain a slash, and
        huggingface_hub puts them into URLs unencoded)."""
        with self._lock:
            for repo_id in sorted(self._repos, key=len, reverse=True):
                if rest == repo_id or rest.startswith(repo_id + "/"):
                    return self._repos[repo_id], rest[len(repo_id) + 1:]
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep the test process alive

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: FakeHub) -> None:
        self.hub = hub
        super().__init__(address, handler)


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    cut_after: int | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    timeout = 30  # an idle keep-alive connection frees its thread after this
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is `hub.requests`
        pass

    # -- dispatch ---------------------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        path = url.path
        hub._record(method, path)
        try:
            reply = self._reply(hub, method, path, parse_qs(url.query))
        except HubError as err:
            reply = _error_reply(err)
        self._send(method, reply)

    def _reply(self, hub: FakeHub, method: str, path: str, query: dict[str, list[str]]) -> Reply:
        fault = hub._take_fault(method, path)
        if fault is not None and fault.cut_after is None:
            raise HubError(fault.status, message="injected failure")
        if not hub.available:
            raise HubError(503, message="Hub unavailable")
        if path.startswith("/api/models/"):
            self._check_token(hub)
            return self._api(hub, path[len("/api/models/"):], query)
        if "/resolve/" in path:
            self._check_token(hub)
            if self.headers.get("Range"):
                hub._record_range(path, self.headers["Range"])
            reply = self._resolve(hub, path.lstrip("/"), method)
            if fault is not None:
                reply.cut_after = fault.cut_after
            return reply
        raise HubError(404, message="Not Found")  # e.g. /api/agent-harnesses: best effort on the client side

    def _check_token(self, hub: FakeHub) -> None:
        if hub.token is None:
            return
        auth = self.headers.get("Authorization")
        if auth is None:  # the Hub hides private repos from anonymous callers
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        if auth != f"Bearer {hub.token}":
            raise HubError(401, message="Invalid credentials in Authorization header")

    # -- /api/models -----------------------------------------------------------------------------------

    def _api(self, hub: FakeHub, rest: str, query: dict[str, list[str]]) -> Reply:
        found = hub._repo_for(rest)
        if found is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        repo, tail = found  # tail still percent-encoded: a revision may be `refs%2Fpr%2F1`
        if tail == "":
            return self._info(repo, "main", query)
        kind, _, after = tail.partition("/")
        if kind == "revision" and after:
            return self._info(repo, unquote(after), query)
        if kind == "tree" and after:
            revision, _, sub = after.partition("/")
            return self._tree(hub, repo, unquote(revision), unquote(sub).strip("/"), query)
        raise HubError(404, message="Not Found")

    def _info(self, repo: HubRepo, revision: str, query: dict[str, list[str]]) -> Reply:
        commit = _resolve_or_raise(repo, revision)
        files = repo.commits[commit]
        blobs = _flag(query, "blobs")
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit,
            "lastModified": LAST_MODIFIED,
            "private": self.server.hub.token is not None,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [files[p].sibling(blobs) for p in sorted(files)],
        }
        return _json_reply(info, {"X-Repo-Commit": commit})

    def _tree(self, hub: FakeHub, repo: HubRepo, revision: str, sub: str,
              query: dict[str, list[str]]) -> Reply:
        commit = _resolve_or_raise(repo, revision)
        files = repo.commits[commit]
        entries = list(_tree_entries(files, sub, recursive=_flag(query, "recursive")))
        if sub and not entries and sub not in files:
            raise HubError(404, "EntryNotFound", f"{sub} does not exist on {revision}")
        if sub in files:  # the Hub answers a file path with that file's entry
            entries = [files[sub].tree_entry()]
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + hub.tree_page_size]
        headers = {"X-Repo-Commit": commit}
        if start + hub.tree_page_size < len(entries):
            params = "&".join(f"{k}={quote(v[0])}" for k, v in query.items() if k != "cursor")
            link = f"{hub.endpoint}{self.path.split('?')[0]}?{params}&cursor={start + hub.tree_page_size}"
            headers["Link"] = f'<{link}>; rel="next"'
        return _json_reply(page, headers)

    # -- /{repo}/resolve/{rev}/{path} --------------------------------------------------------------------

    def _resolve(self, hub: FakeHub, rest: str, method: str) -> Reply:
        found = hub._repo_for(rest)
        if found is None or not found[1].startswith("resolve/"):
            raise HubError(404, "RepoNotFound", "Repository not found")
        repo, tail = found
        revision, _, filename = tail[len("resolve/"):].partition("/")
        commit = _resolve_or_raise(repo, unquote(revision))
        entry = repo.commits[commit].get(unquote(filename))
        if entry is None:
            # X-Repo-Commit lets huggingface_hub record the miss under .no_exist/<commit>/
            raise HubError(404, "EntryNotFound", f"{unquote(filename)} does not exist",
                           {"X-Repo-Commit": commit})
        return _file_reply(entry, commit, self.headers.get("Range"))

    # -- output ---------------------------------------------------------------------------------------

    def _send(self, method: str, reply: Reply) -> None:
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD":
            return
        body = reply.body if reply.cut_after is None else reply.body[: reply.cut_after]
        try:
            self.wfile.write(body)
            if reply.cut_after is not None:
                self.wfile.flush()
                self.close_connection = True  # the client sees fewer bytes than Content-Length said
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[0].lower() in {"1", "true"}


def _resolve_or_raise(repo: HubRepo, revision: str) -> str:
    commit = repo.resolve(revision)
    if commit is None:
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return commit


def _tree_entries(files: Mapping[str, HubFile], sub: str, *, recursive: bool) -> Iterator[dict[str, Any]]:
    """Directories then files under `sub`, as the Hub lists them (only direct children unless recursive)."""
    prefix = f"{sub}/" if sub else ""
    below = sorted(p for p in files if p.startswith(prefix))
    relative = [p[len(prefix):] for p in below]
    for directory in sorted(_directories(relative)):
        if recursive or "/" not in directory:
            oid = hashlib.sha1(f"tree {prefix}{directory}".encode()).hexdigest()
            yield {"type": "directory", "path": prefix + directory, "oid": oid, "size": 0}
    for path, rel in zip(below, relative, strict=True):
        if recursive or "/" not in rel:
            yield files[path].tree_entry()


def _json_reply(data: Any, headers: Mapping[str, str]) -> Reply:
    body = json.dumps(data).encode()
    return Reply(200, {"Content-Type": "application/json; charset=utf-8", **headers}, body)


def _error_reply(err: HubError) -> Reply:
    headers = dict(err.headers)
    if err.code:
        headers["X-Error-Code"] = err.code
    if err.message:
        headers["X-Error-Message"] = err.message
    body = json.dumps({"error": err.message or HTTPStatus(err.status).phrase}).encode()
    return Reply(err.status, {"Content-Type": "application/json; charset=utf-8", **headers}, body)


def _file_reply(entry: HubFile, commit: str, range_header: str | None) -> Reply:
    size = len(entry.data)
    headers = {
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": f'"{entry.etag}"',
        "X-Repo-Commit": commit,
        "X-Linked-Size": str(size),
    }
    if entry.sha256 is not None:  # the Hub names LFS content by its sha256
        headers["X-Linked-ETag"] = f'"{entry.sha256}"'
    span = _parse_range(range_header, size)
    if span is None:
        return Reply(200, headers, entry.data)
    start, end = span
    if start >= size or start > end:
        raise HubError(416, message="Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Reply(206, headers, entry.data[start:end + 1])


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, clipped to the file; None means the whole file
    (no header, or one we do not serve partially, such as several ranges: a 200 is a valid answer)."""
    match = RANGE_RE.match((header or "").strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        return max(0, size - int(last)), size - 1
    end = min(int(last), size - 1) if last else size - 1
    return int(first), end
