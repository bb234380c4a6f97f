"""Sizes and hashes: the one check every blob passes, whichever engine fetched its bytes.

LFS files are checked by sha256, others by git blob sha1 (`sha1(b"blob <size>\\0" + bytes)`), as
huggingface_hub names them. hashlib releases the GIL on large buffers, so threads can hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3

from agent.audit import BlobCheck, Problem, audit_folder, problems
from agent.cache import RepoCache, git_blob_header
from agent.manifest import FileEntry, Manifest, part_ranges

READ_SIZE = 4 << 20

def _new_hash(entry: FileEntry) -> hashlib._Hash:
    if entry.lfs_sha256:
        return hashlib.sha256()
    return hashlib.sha1(git_blob_header(entry.size))


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
    blake3_parts: tuple[str, ...] = ()


def digest_blob(path: Path, part_size: int) -> BlobDigests:
    """One read of a file gives its sha256, git blob sha1 and per-part sha256s and BLAKE3s (for `stage`):
    every part digest comes from the same bytes that hashed to the blob's name."""
    size = path.stat().st_size
    whole, git = hashlib.sha256(), hashlib.sha1(git_blob_header(size))
    parts, fast_parts = [], []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _, offset, length in part_ranges(size, part_size):
            part, fast = hashlib.sha256(), blake3.blake3()
            done = 0
            while done < length:
                chunk = os.pread(fd, min(READ_SIZE, length - done), offset + done)
                if not chunk:
                    raise OSError(f"{path} shrank while being read")
                for digest in (part, fast, whole, git):
                    digest.update(chunk)
                done += len(chunk)
            parts.append(part.hexdigest())
            fast_parts.append(fast.hexdigest())
    finally:
        os.close(fd)
    return BlobDigests(size, whole.hexdigest(), git.hexdigest(), tuple(parts), tuple(fast_parts))


# -- the whole-cache audit behind `simswarm-agent verify` ------------------------------------------------


def _full_check(path: Path, entry: FileEntry) -> str | None:
    return check_content(path, entry)


def audit_cache(cache: RepoCache, commit: str, manifest: Manifest, revision: str, *,
                check: BlobCheck = _full_check) -> list[Problem]:
    """Every problem of one snapshot in the local cache, each once; empty when the cache is complete.
    `check` judges each blob's bytes (default: size and full hash; `agent.ready` trusts stamps). The
    findings are agent.audit's, the same the pull's clean-up repairs."""
    return problems(audit_folder(cache, commit, manifest, revision, check=check, others=False))
