"""Step 4 of a pull: from the manifest and what is already valid on disk to the byte ranges still to fetch.

A partial blob lives in `blobs/<name>.simswarm.part` with a checkpoint `blobs/<name>.simswarm.json`:
`{"size": N, "have": [[start, end], ...]}`, the byte ranges known to be on disk (written, not yet
verified). The orchestration rewrites it a few times a second from the engine's reports, without fsync (a
killed process keeps the page cache), so a SIGKILL loses a fraction of a second of transfer. It is
rewritten in place with one write of at most a page (a kill cannot tear that; trailing spaces pad a
shorter text), not by rename: on ext4 a rename over a file forces the new file's blocks to be
allocated and written out, 2 ms per checkpoint, and the blob's final naming then waited as long again
to free them. The ranges
are bytes, not part numbers, so a rerun with another `--concurrency` or on another machine keeps them.

On resume each part keeps the bytes at its start that the checkpoint covers (`Part.kept`) and fetches the
rest; the engine re-reads the kept bytes into the part's digest when the sidecar has one, so a kept byte
is checked exactly like a fetched one. Without a sidecar the whole-blob hash decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache import FILE_MODE, RepoCache, atomic_write
from agent.engines.base import Part
from agent.errors import DiskFullError
from agent.manifest import DEFAULT_PART_SIZE, FileEntry, Sidecar, part_ranges
from agent.output import human_bytes
from agent.remote import StagedSnapshot

DISK_MARGIN = 64 << 20
IN_PLACE_BYTES = 4096  # one page: a single write of it is all or nothing for a process that is killed


class Extents:
    """Sorted, disjoint byte ranges [start, end) of one file."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.ranges: list[tuple[int, int]] = []
        for start, end in ranges or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        merged = []
        for s, e in self.ranges:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        self.ranges = sorted(merged)

    def prefix(self, offset: int, length: int) -> int:
        """How many bytes from `offset` on (at most `length`) the ranges cover without a gap."""
        for s, e in self.ranges:
            if s <= offset < e:
                return min(length, e - offset)
        return 0

    def total(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)


@dataclass
class BlobPlan:
    name: str
    entry: FileEntry
    part_size: int
    missing: list[Part]  # parts with bytes to fetch or kept bytes to re-check
    digests: tuple[str, ...] | None = None
    bound: bool = False  # the part digests are bound to the blob's identity (see agent.manifest)
    kept: Extents = field(default_factory=Extents)

    @property
    def bytes_missing(self) -> int:
        return sum(p.length - p.kept for p in self.missing)


@dataclass
class Plan:
    to_fetch: list[BlobPlan] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # blob names already valid in blobs/

    @property
    def bytes_to_fetch(self) -> int:
        return sum(b.bytes_missing for b in self.to_fetch)


def choose_part_size(size: int, sidecar: Sidecar | None) -> int:
    """The sidecar's part size when it has one (parts can then be checked as they land), else a fixed
    size: parts do not follow the stream count, so neither a checkpoint nor a repair depends on it."""
    return sidecar.part_size if sidecar is not None else DEFAULT_PART_SIZE


def read_part_state(cache: RepoCache, name: str, size: int) -> Extents:
    """The byte ranges a checkpoint says are on disk; none when it does not fit the partial file.
    A checkpoint of the earlier format (`part_size` and finished part indices) is read as ranges."""
    try:
        state = json.loads(cache.part_state_path(name).read_text())
        if state.get("size") != size or cache.part_path(name).stat().st_size != size:
            return Extents()
        if "have" in state:
            ranges = [(int(s), int(e)) for s, e in state["have"]]
        else:
            part_size = int(state["part_size"])
            ranges = [(i * part_size, min(size, (i + 1) * part_size)) for i in map(int, state["done"])]
        if any(s < 0 or e > size or s > e for s, e in ranges):
            return Extents()
        return Extents(ranges)
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return Extents()


def write_part_state(cache: RepoCache, name: str, size: int, have: Extents) -> None:
    # A crash keeps the page cache, and kept bytes are re-verified on resume anyway.
    state = {"size": size, "have": [list(r) for r in have.ranges]}
    data = json.dumps(state).encode()
    path = cache.part_state_path(name)
    if len(data) <= IN_PLACE_BYTES and _write_in_place(path, data):
        return
    atomic_write(path, data)  # a long checkpoint (many ranges), or no plain file there: replaced whole


def _write_in_place(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError:  # a link or a folder in its place: the rename replaces it
        return False
    try:
        old = os.fstat(fd).st_size
        if old > IN_PLACE_BYTES:
            return False
        os.pwrite(fd, data.ljust(old, b" "), 0)
        return True
    finally:
        os.close(fd)


def plan_blob(cache: RepoCache, name: str, entry: FileEntry, sidecar: Sidecar | None, *,
              check_parts: bool = True, resume: bool = True) -> BlobPlan:
    """The parts of one blob still to fetch. `check_parts`: hand the sidecar's part digests to the
    engine; `resume`: keep what the checkpoint says is on disk (else start over)."""
    part_size = choose_part_size(entry.size, sidecar)
    digests = sidecar.digests_for(name, entry.size) if sidecar and check_parts else None
    fast = sidecar.blake3_for(name, entry.size) if sidecar and digests else None
    bound = digests is not None and sidecar is not None and sidecar.is_bound(name, entry.size)
    kept = read_part_state(cache, name, entry.size) if resume else Extents()
    if not kept:
        discard_partial(cache, name)
    missing = []
    for i, offset, length in part_ranges(entry.size, part_size):
        digest = digests[i] if digests else None
        have = kept.prefix(offset, length)
        if have < length or digest is not None:  # a kept part with a digest is re-checked, not refetched
            missing.append(Part(i, offset, length, digest, have, fast[i] if fast else None))
    return BlobPlan(name, entry, part_size, missing, digests, bound, kept)


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


def make_plan(cache: RepoCache, snap: StagedSnapshot, valid: set[str], *, check_parts: bool,
              resume: bool = True) -> Plan:
    """Every blob of the snapshot either present (valid on disk: its partial, if any, dropped) or to
    fetch, with the parts it still misses. `resume`: keep checkpointed bytes (the engine can)."""
    plan = Plan()
    for name, entry in snap.manifest.blobs().items():
        if name in valid:
            plan.present.append(name)
            discard_partial(cache, name)
        else:
            plan.to_fetch.append(plan_blob(cache, name, entry, snap.sidecar, check_parts=check_parts,
                                           resume=resume))
    return plan
