"""Sizes and hashes: the one check every blob passes, whichever engine fetched its bytes.

LFS files are checked by sha256, others by git blob sha1 (`sha1(b"blob <size>\\0" + bytes)`), as
huggingface_hub names them. hashlib releases the GIL on large buffers, so threads can hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.cache import BLOB_RE, PART_SUFFIX, STATE_SUFFIX, RepoCache, is_commit, safe_relpath
from agent.errors import ManifestError
from agent.manifest import FileEntry, Manifest, parse_manifest, part_ranges

READ_SIZE = 4 << 20
BlobCheck = Callable[[Path, FileEntry], "str | None"]  # None when the blob's bytes are right


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def _new_hash(entry: FileEntry) -> hashlib._Hash:
    if entry.lfs_sha256:
        return hashlib.sha256()
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % entry.size)
    return digest


def _expected(entry: FileEntry) -> str:
    return entry.lfs_sha256 or entry.blob_id


def hash_range(fd: int, offset: int, length: int, digest: hashlib._Hash) -> int:
    """Feed bytes [offset, offset+length) of an open file into `digest`; returns bytes read."""
    done = 0
    while done < length:
        chunk = os.pread(fd, min(READ_SIZE, length - done), offset + done)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    return done


def check_content(path: Path, entry: FileEntry, *, full: bool = True) -> str | None:
    """None when the file matches the entry; else what is wrong, in a few words."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size != entry.size:
        return f"size {size} != expected {entry.size}"
    if not full:
        return None
    digest = _new_hash(entry)
    fd = os.open(path, os.O_RDONLY)
    try:
        hash_range(fd, 0, size, digest)
    finally:
        os.close(fd)
    if digest.hexdigest() != _expected(entry):
        return f"content hash {digest.hexdigest()[:12]}... != expected {_expected(entry)[:12]}..."
    return None


class StreamingCheck:
    """The full-content check of one blob, fed as its parts land, so hashing overlaps the transfer
    instead of following it. Parts finish in any order; each `advance` hashes the run of finished parts
    just past what was already read (from the page cache, right after the engine wrote them)."""

    def __init__(self, path: Path, entry: FileEntry, part_size: int) -> None:
        self.path = path
        self.entry = entry
        self.ranges = list(part_ranges(entry.size, part_size))
        self.digest = _new_hash(entry)
        self.next_index = 0
        self.short_read = False
        self.lock = threading.Lock()

    def advance(self, done: frozenset[int]) -> None:
        with self.lock:
            if self.next_index >= len(self.ranges) or self.next_index not in done:
                return
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while self.next_index < len(self.ranges) and self.next_index in done:
                    _, offset, length = self.ranges[self.next_index]
                    self.short_read |= hash_range(fd, offset, length, self.digest) != length
                    self.next_index += 1
            finally:
                os.close(fd)

    def result(self) -> str | None:
        """Once every part is in: None when size and hash match the manifest, else what is wrong."""
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if size != self.entry.size:
            return f"size {size} != expected {self.entry.size}"
        self.advance(frozenset(range(len(self.ranges))))
        actual = self.digest.hexdigest()
        if self.short_read or actual != _expected(self.entry):
            return f"content hash {actual[:12]}... != expected {_expected(self.entry)[:12]}..."
        return None


@dataclass(frozen=True)
class BlobDigests:
    size: int
    sha256: str
    git_sha1: str
    parts: tuple[str, ...]


def digest_blob(path: Path, part_size: int) -> BlobDigests:
    """One read of a file gives its sha256, git blob sha1 and per-part sha256s (for `stage`)."""
    size = path.stat().st_size
    whole, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    parts = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _, offset, length in part_ranges(size, part_size):
            part = hashlib.sha256()
            done = 0
            while done < length:
                chunk = os.pread(fd, min(READ_SIZE, length - done), offset + done)
                if not chunk:
                    raise OSError(f"{path} shrank while being read")
                for digest in (part, whole, git):
                    digest.update(chunk)
                done += len(chunk)
            parts.append(part.hexdigest())
    finally:
        os.close(fd)
    return BlobDigests(size, whole.hexdigest(), git.hexdigest(), tuple(parts))


# -- the whole-cache audit behind `simswarm-agent verify` ------------------------------------------------


def _link_target(relpath: str, blob_name: str) -> str:
    depth = relpath.count("/")
    return "../" * (depth + 2) + f"blobs/{blob_name}"


def _snapshot_problems(cache: RepoCache, commit: str, manifest: Manifest) -> list[Problem]:
    """Every manifest path must be a relative link to its blob; nothing else may sit in the snapshot."""
    problems: list[Problem] = []
    snap = cache.snapshot_dir(commit)
    if not snap.is_dir() or snap.is_symlink():
        return [Problem(f"snapshots/{commit}", "missing snapshot folder")]
    for relpath in sorted(manifest.files):
        entry = manifest.files[relpath]
        path = snap.joinpath(*safe_relpath(relpath).parts)
        where = f"snapshots/{commit[:12]}/{relpath}"
        if not path.is_symlink():
            what = "not a link (a copy of the file)" if path.exists() else "missing link"
            problems.append(Problem(where, what))
            continue
        target = os.readlink(path)
        if cache.link_target_blob(path) != entry.blob_name:
            problems.append(Problem(where, f"wrong link target {target!r}, expected blob {entry.blob_name}"))
        elif target != _link_target(relpath, entry.blob_name):
            problems.append(Problem(where, f"link target {target!r} is not the relative "
                                           f"{_link_target(relpath, entry.blob_name)!r}"))
    on_disk = {rel for rel, _ in cache.snapshot_entries(commit)}
    for extra in sorted(on_disk - set(manifest.files)):
        what = "stray temporary file" if _is_temporary(extra) else "not in the manifest"
        problems.append(Problem(f"snapshots/{commit[:12]}/{extra}", what))
    return problems


def _is_temporary(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return (base.endswith((PART_SUFFIX, STATE_SUFFIX, ".incomplete", ".tmp", ".simswarm-link", ".lock"))
            or base.startswith("."))


def _blob_problems(cache: RepoCache, manifest: Manifest, check: BlobCheck) -> list[Problem]:
    problems: list[Problem] = []
    for name, entry in sorted(manifest.blobs().items()):
        path = cache.blob_path(name)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(Problem(f"blobs/{name}", "not a regular file"))
        elif not path.exists():
            problems.append(Problem(f"blobs/{name}", "missing blob"))
        else:
            what = check(path, entry)
            if what is not None:
                problems.append(Problem(f"blobs/{name}", what))
    if cache.blobs.is_dir():
        for path in sorted(cache.blobs.iterdir()):
            if not BLOB_RE.match(path.name):
                problems.append(Problem(f"blobs/{path.name}", "stray temporary file"))
    return problems


def _ref_problems(cache: RepoCache, revision: str, commit: str) -> list[Problem]:
    """The requested ref must hold exactly the commit (no newline); every other ref a snapshot's commit."""
    problems: list[Problem] = []
    if not is_commit(revision) and not cache.ref_path(revision).is_file():
        problems.append(Problem(f"refs/{revision}", "missing ref"))
    if not cache.refs.is_dir():
        return problems
    for path in sorted(cache.refs.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        name = path.relative_to(cache.refs).as_posix()
        if path.is_symlink() or _is_temporary(name):
            problems.append(Problem(f"refs/{name}", "stray temporary file" if _is_temporary(name)
                                    else "a link, not a file"))
            continue
        raw = path.read_bytes()
        text = raw.decode("utf-8", "replace")
        if is_commit(text.strip()) and text != text.strip():
            problems.append(Problem(f"refs/{name}", "holds whitespace or a trailing newline around the "
                                                    "commit (breaks offline resolution)"))
        elif not is_commit(text):
            problems.append(Problem(f"refs/{name}", f"does not hold a 40-hex commit: {text[:50]!r}"))
        elif name == revision and text != commit:
            problems.append(Problem(f"refs/{name}", f"points at {text[:12]}, expected {commit[:12]}"))
        elif not cache.snapshot_dir(text).is_dir():
            problems.append(Problem(f"refs/{name}", f"points at {text[:12]}, which has no snapshot"))
    return problems


def _tree_problems(cache: RepoCache, commit: str, manifest: Manifest) -> list[Problem]:
    """A trees/<commit>.json is optional, but when present it must list exactly the manifest's files."""
    path = cache.tree_path(commit)
    if not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_file():
        return [Problem(f"trees/{commit}.json", "not a regular file")]
    try:
        local = parse_manifest(path.read_bytes())
    except ManifestError as exc:
        return [Problem(f"trees/{commit}.json", str(exc))]
    if dict(local.files) != dict(manifest.files):
        return [Problem(f"trees/{commit}.json", "does not list exactly the files of the snapshot")]
    return []


def _full_check(path: Path, entry: FileEntry) -> str | None:
    return check_content(path, entry)


def audit_cache(cache: RepoCache, commit: str, manifest: Manifest, revision: str, *,
                check: BlobCheck = _full_check) -> list[Problem]:
    """Every problem of one snapshot in the local cache, each once; empty when the cache is complete.
    `check` judges each blob's bytes (default: size and full hash; `agent.ready` trusts stamps)."""
    if not cache.repo_dir.is_dir() or cache.repo_dir.is_symlink():
        return [Problem(cache.folder, "model folder missing from the cache")]
    return (_ref_problems(cache, revision, commit) + _snapshot_problems(cache, commit, manifest)
            + _blob_problems(cache, manifest, check) + _tree_problems(cache, commit, manifest))
