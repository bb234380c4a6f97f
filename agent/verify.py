"""Sizes and hashes: the one check every blob passes, whichever engine fetched its bytes.

LFS files are checked by sha256, others by git blob sha1 (`sha1(b"blob <size>\\0" + bytes)`), as
huggingface_hub names them. hashlib releases the GIL on large buffers, so threads can hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.manifest import FileEntry, Sidecar, part_ranges

READ_SIZE = 4 << 20


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


def good_parts(path: Path, blob_name: str, size: int, sidecar: Sidecar, indices: set[int]) -> set[int]:
    """Which of the claimed-complete parts of a partial file really hold the right bytes."""
    digests = sidecar.digests_for(blob_name, size)
    if digests is None:
        return set()
    good = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        for index, offset, length in part_ranges(size, sidecar.part_size):
            if index in indices:
                digest = hashlib.sha256()
                if hash_range(fd, offset, length, digest) == length and digest.hexdigest() == digests[index]:
                    good.add(index)
    finally:
        os.close(fd)
    return good


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
