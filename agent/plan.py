"""From the manifest and what is already valid on disk to the byte ranges still to fetch.

A partial blob lives in `blobs/<name>.simswarm.part` with a state file `blobs/<name>.simswarm.json`
(`{"size", "part_size", "done": [part indices]}`) written after each part lands. On resume, claimed
parts are re-hashed against the sidecar and only good ones are kept; without a sidecar they are kept and
the whole-blob check decides (a failure there refetches the blob).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.cache import RepoCache, atomic_write
from agent.engines.base import BlobJob, Limits, Part
from agent.errors import DiskFullError
from agent.manifest import FileEntry, Sidecar, part_ranges
from agent.output import human_bytes
from agent.settings import Deadlines
from agent.verify import good_parts

MIN_PART = 8 << 20
MAX_PART = 64 << 20
DISK_MARGIN = 64 << 20


@dataclass
class BlobPlan:
    name: str
    entry: FileEntry
    part_size: int
    missing: list[Part]
    digests: tuple[str, ...] | None = None

    @property
    def bytes_missing(self) -> int:
        return sum(p.length for p in self.missing)


@dataclass
class Plan:
    to_fetch: list[BlobPlan] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # blob names already valid in blobs/

    @property
    def bytes_to_fetch(self) -> int:
        return sum(b.bytes_missing for b in self.to_fetch)


def size_limits(concurrency: int | None = None, deadlines: Deadlines | None = None) -> Limits:
    """Connections sized to the machine: 4 per core, 8 to 64. Loopback or a fat NIC both want several
    streams in flight; memory is bounded by chunk size x streams, not by part size."""
    cores = psutil.cpu_count(logical=True) or 2
    limits = Limits(concurrency=concurrency or max(8, min(64, 4 * cores)))
    return limits.with_deadlines(deadlines) if deadlines is not None else limits


def choose_part_size(size: int, concurrency: int, sidecar: Sidecar | None) -> int:
    """The sidecar's part size when it has one (parts can then be checked as they land), else a size
    that gives each connection a few parts of a large file, within 8-64 MiB."""
    if sidecar is not None:
        return sidecar.part_size
    target = size // max(1, 2 * concurrency)
    return max(MIN_PART, min(MAX_PART, target))


def read_part_state(cache: RepoCache, name: str, size: int, part_size: int) -> set[int]:
    try:
        state = json.loads(cache.part_state_path(name).read_text())
        if state.get("size") != size or state.get("part_size") != part_size:
            return set()
        if cache.part_path(name).stat().st_size != size:
            return set()
        return {int(i) for i in state.get("done", [])}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def write_part_state(cache: RepoCache, name: str, size: int, part_size: int, done: set[int]) -> None:
    # Not fsynced: a crash keeps the page cache, and parts are re-verified on resume anyway.
    state = {"size": size, "part_size": part_size, "done": sorted(done)}
    atomic_write(cache.part_state_path(name), json.dumps(state).encode(), durable=False)


def plan_blob(cache: RepoCache, name: str, entry: FileEntry, sidecar: Sidecar | None,
              concurrency: int) -> BlobPlan:
    part_size = choose_part_size(entry.size, concurrency, sidecar)
    digests = sidecar.digests_for(name, entry.size) if sidecar else None
    claimed = read_part_state(cache, name, entry.size, part_size)
    if claimed and sidecar is not None and digests is not None:
        claimed = good_parts(cache.part_path(name), name, entry.size, sidecar, claimed)
    missing = [Part(i, off, length, digests[i] if digests else None)
               for i, off, length in part_ranges(entry.size, part_size) if i not in claimed]
    if not claimed:
        discard_partial(cache, name)
    return BlobPlan(name, entry, part_size, missing, digests)


def discard_partial(cache: RepoCache, name: str) -> None:
    for path in (cache.part_path(name), cache.part_state_path(name)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_disk(cache: RepoCache, plan: Plan) -> None:
    """Refuse before downloading when the blobs cannot fit (exit 5), counting preallocated partials."""
    need = 0
    for blob in plan.to_fetch:
        try:
            allocated = cache.part_path(blob.name).stat().st_blocks * 512
        except FileNotFoundError:
            allocated = 0
        need += max(0, blob.entry.size - allocated)
    probe = cache.hub_cache
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise DiskFullError(f"not enough disk in {cache.hub_cache}: need {human_bytes(need)} "
                            f"(+{human_bytes(DISK_MARGIN)} margin), {human_bytes(free)} free")


def preallocate(path: Path, size: int) -> None:
    """Create the partial file at full size so parts can be written at their offsets; fallocate makes a
    full disk fail here, before any transfer, rather than mid-write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFullError(f"no space for {path.name} ({human_bytes(size)})") from None
                # Filesystems without fallocate (some overlays) still work with the sparse file.
    finally:
        os.close(fd)


def blob_jobs(cache: RepoCache, plan: Plan, urls: dict[str, str], keys: dict[str, str]) -> list[BlobJob]:
    jobs = []
    for blob in plan.to_fetch:
        path = cache.part_path(blob.name)
        preallocate(path, blob.entry.size)
        jobs.append(BlobJob(blob.name, keys[blob.name], urls[blob.name], blob.entry.size, path,
                            tuple(blob.missing)))
    return jobs
