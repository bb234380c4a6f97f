"""Step 5 of a pull: the planned blobs fetched by an engine, verified as they land, and repaired.

A transfer signs one GET URL per blob (for an engine that reads URLs), preallocates each partial file
(so a full disk fails before any byte moves), and hands the engine its jobs; a `Finisher` checks every
blob and names it. A blob that failed its check is fetched again: by agreeing reads when it has no part
digests and the engine writes parts in place, else once from scratch. What still fails ends the pull
with exit 4.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.cache import RepoCache
from agent.engines.base import BlobJob, Engine, Part, TransferConfig
from agent.errors import DiskFullError, VerificationError
from agent.finish import CheckPolicy, Finisher
from agent.manifest import part_ranges
from agent.output import Output, Progress, human_bytes
from agent.plan import BlobPlan, Extents, Plan, discard_partial, plan_blob
from agent.remote import StagedSnapshot
from agent.s3read import ObjectReader
from agent.verify import hash_range

URL_EXPIRY = 6 * 3600  # a slow pull of a large model must not outlive its URLs
REPAIR_ROUNDS = 6  # reads of a blob without part digests, at most, before its bytes are judged corrupt
# Each repair round widens a part's request by this fraction of the part once more, on one side: other
# shapes for few bytes (six rounds add at most 6/64 to a part read in every one).
WINDOW_STEP = 64
# Bytes, at least: a window of w moves the byte damaged at fraction f of a body by about f*w (after the
# part) or (1-f)*w (before it), so 64 moves it for every f from 1/64 to 63/64, in a small blob too.
MIN_WINDOW = 64


@dataclass(frozen=True)
class Fetch:
    """What every transfer of one pull shares: where the bytes come from, where they go, and how."""

    reader: ObjectReader
    cache: RepoCache
    snap: StagedSnapshot
    engine: Engine
    limits: TransferConfig
    out: Output
    on_named: Callable[[str], None] | None = None  # each blob once it has its final name (it passed)

    def verified(self, plan: Plan, *, full: bool, rehash: bool) -> int:
        """Transfer, then repair what failed its check; returns the bytes fetched, repairs included."""
        policy = CheckPolicy(full=full, rehash=rehash)
        fetched = plan.bytes_to_fetch
        # A blob that fails keeps its bytes: for a repair by agreeing reads they are its first read.
        failures = self.transfer(plan, replace(policy, keep_failed=True))
        for name, problem in failures.items():
            self.out.event("pull.repair", f"blob {name[:12]} failed its check ({problem}); fetching it again",
                           blob=name, problem=problem)
        failed = [b for b in plan.to_fetch if b.name in failures]
        by_reads = [b for b in failed if b.digests is None and self.engine.writes_in_place and full]
        if by_reads:
            repaired, more = self.repair_by_reads(by_reads)
            fetched += more
            for name in repaired:
                failures.pop(name)
        again = [b for b in failed if b not in by_reads]
        if again:  # from scratch: planning without resuming drops the failed bytes
            retry = Plan(to_fetch=[plan_blob(self.cache, b.name, b.entry, self.snap.sidecar, check_parts=full,
                                             resume=False) for b in again])
            fetched += retry.bytes_to_fetch
            for blob in again:
                failures.pop(blob.name)
            failures.update(self.transfer(retry, policy))
        if failures:
            name, problem = next(iter(failures.items()))
            raise VerificationError(
                f"blob {name[:12]} of {self.snap.repo_id} still fails its check after a refetch: {problem}",
                hint="the staged object is corrupt; re-stage the model")
        return fetched

    def transfer(self, plan: Plan, policy: CheckPolicy) -> dict[str, str]:
        """Fetch and check every planned blob; returns the blobs that failed their check."""
        keys = {b.name: self.snap.sources[b.name] for b in plan.to_fetch}
        # A URL is signed only for an engine that reads it: each is a credential for six hours.
        urls = {name: self.reader.presign(key, expires=URL_EXPIRY) if self.engine.reads_urls else ""
                for name, key in keys.items()}
        self.cache.ensure_dirs()
        finisher = Finisher(self.cache, plan, self.engine, policy, on_named=self.on_named)
        jobs = [finisher.job(j) for j in blob_jobs(self.cache, plan, urls, keys, self.engine.writes_in_place)]
        progress = Progress(self.out, plan.bytes_to_fetch)
        try:
            finisher.start_ready()
            wanted = [j for j in jobs if j.parts or j.whole]
            self.engine.fetch(wanted, self.limits, progress, finisher.on_part_done, finisher.hooks())
            return finisher.failures()
        finally:
            progress.close()
            finisher.close()

    def repair_by_reads(self, blobs: list[BlobPlan]) -> tuple[set[str], int]:
        """Blobs without part digests that failed their hash: read them again part by part, keeping the
        sha256 of each read of each part (the first read is the failed transfer's, still on disk), and
        accept a part once two reads agree; only parts still in dispute are read again, and the whole
        hash is re-checked each round. Each round reads a part through another window (`windowed`), so
        a hop that damages every Nth body at the same place damages two reads of one part at different
        bytes: only the bucket's own bytes can agree. A blob all of whose parts agree while its hash
        still fails is corrupt in the bucket (returned as not repaired). Returns (repaired, bytes read)."""
        grids = {b.name: repair_parts(b.entry.size, b.part_size) for b in blobs}
        reads = {b.name: {p.index: [d] for p, d in zip(grids[b.name], self._digests(b, grids[b.name]),
                                                        strict=True)} for b in blobs}
        disputed = dict(grids)
        repaired: set[str] = set()
        fetched = 0
        policy = CheckPolicy(full=True, keep_failed=True)
        for round_ in range(1, REPAIR_ROUNDS + 1):
            todo = [reread(b, disputed[b.name], round_) for b in blobs
                    if b.name not in repaired and disputed[b.name]]
            if not todo:
                break
            round_plan = Plan(to_fetch=todo)
            fetched += round_plan.bytes_to_fetch + sum(p.lead + p.trail for b in todo for p in b.missing)
            failures = self.transfer(round_plan, policy)
            for blob in todo:
                if blob.name not in failures:
                    repaired.add(blob.name)
                    self.out.event("pull.repaired", f"blob {blob.name[:12]} verified after reads that agree",
                                   blob=blob.name)
                    continue
                for part, digest in zip(disputed[blob.name], self._digests(blob, disputed[blob.name]),
                                        strict=True):
                    reads[blob.name][part.index].append(digest)
                disputed[blob.name] = [p for p in grids[blob.name] if not _agreed(reads[blob.name][p.index])]
        for blob in blobs:
            if blob.name not in repaired:
                discard_partial(self.cache, blob.name)
        return repaired, fetched

    def _digests(self, blob: BlobPlan, parts: list[Part]) -> list[str]:
        """The sha256 of each part's bytes as the last read left them on disk (in the page cache)."""
        try:
            fd = os.open(self.cache.part_path(blob.name), os.O_RDONLY)
        except FileNotFoundError:  # no bytes to compare: reads that agree with no other
            return [f"missing {secrets.token_hex(8)}" for _ in parts]
        try:
            digests = []
            for part in parts:
                digest = hashlib.sha256()
                hash_range(fd, part.offset, part.length, digest)
                digests.append(digest.hexdigest())
            return digests
        finally:
            os.close(fd)


def reread(blob: BlobPlan, disputed: list[Part], round_: int) -> BlobPlan:
    """The blob as repair round `round_` fetches it: its disputed parts, each through that round's window."""
    return replace(blob, part_size=repair_part_size(blob.entry.size, blob.part_size), digests=None,
                   kept=Extents(), missing=[windowed(p, blob.entry.size, round_) for p in disputed])


def repair_part_size(size: int, part_size: int) -> int:
    """The parts a repair of a blob of `size` compares: its own, but at least two, so that every part
    has bytes of the blob beside it for its window to reach into."""
    return part_size if size > part_size else max(1, (size + 1) // 2)


def repair_parts(size: int, part_size: int) -> list[Part]:
    ranges = part_ranges(size, repair_part_size(size, part_size))
    return [Part(i, offset, length) for i, offset, length in ranges if length]


def windowed(part: Part, size: int, round_: int) -> Part:
    """The part as repair round `round_` (1, 2, ...) asks for it: with `round_` steps of 1/WINDOW_STEP of
    its length (at least MIN_WINDOW bytes) of the blob's bytes beside it, after it in odd rounds and
    before it in even ones (the other side where the blob ends there); the engine discards them.
    The shapes differ from the first read (no window) and from each other at whatever fraction of a
    body, strictly inside it, a hop damages: a window on one side moves every such byte, windows on
    opposite sides move it opposite ways, and windows on the same side differ in size. Not covered: a
    body's very first or last byte (a window after the part leaves where its body starts), and a part
    whose neighbours are shorter than its window (a blob of a few hundred bytes), which repeats a
    shape (the largest window the blob allows is taken)."""
    want = round_ * max(MIN_WINDOW, part.length // WINDOW_STEP)
    before, after = part.offset, size - part.offset - part.length
    sides = [("trail", after), ("lead", before)] if round_ % 2 else [("lead", before), ("trail", after)]
    side, room = next(((s, r) for s, r in sides if r >= want), max(sides, key=lambda s: s[1]))
    margin = min(want, room)
    return replace(part, lead=margin if side == "lead" else 0, trail=margin if side == "trail" else 0)


def _agreed(digests: list[str] | None) -> bool:
    """The last read of a part (the bytes now on disk) matches an earlier read of it."""
    return digests is not None and len(digests) > 1 and digests[-1] in digests[:-1]


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


def blob_jobs(cache: RepoCache, plan: Plan, urls: dict[str, str], keys: dict[str, str],
              in_place: bool) -> list[BlobJob]:
    """One job per planned blob, its partial file preallocated for an engine that writes parts in place;
    for one that writes whole objects beside it (s5cmd) the file is left empty, so the disk never holds a
    blob twice."""
    jobs = []
    for blob in plan.to_fetch:
        path = cache.part_path(blob.name)
        preallocate(path, blob.entry.size if in_place else 0)
        jobs.append(BlobJob(blob.name, keys[blob.name], urls[blob.name], blob.entry.size, path,
                            tuple(blob.missing)))
    return jobs
