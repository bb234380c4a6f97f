"""Step 5 of a pull: the planned blobs fetched by an engine, verified as they land, and repaired.

A transfer signs one GET URL per blob (for an engine that reads URLs), preallocates each partial file
(so a full disk fails before any byte moves), and hands the engine its jobs; a `Finisher` checks every
blob and names it. A blob that failed its check is fetched again: by agreeing reads when it has no part
digests and the engine can report the digest of every part it reads, else once from scratch. What still
fails ends the pull with exit 4.
"""

from __future__ import annotations

import errno
import os
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

URL_EXPIRY = 6 * 3600  # a slow pull of a large model must not outlive its URLs
REPAIR_ROUNDS = 6  # reads of a blob without part digests, at most, before its bytes are judged corrupt

DigestFn = Callable[[BlobJob, Part, str], None]


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
        failures = self.transfer(plan, policy)
        for name, problem in failures.items():
            self.out.event("pull.repair", f"blob {name[:12]} failed its check ({problem}); fetching it again",
                           blob=name, problem=problem)
        failed = [b for b in plan.to_fetch if b.name in failures]
        by_reads = [b for b in failed if b.digests is None and self.engine.records_digests and full]
        if by_reads:
            repaired, more = self.repair_by_reads(by_reads)
            fetched += more
            for name in repaired:
                failures.pop(name)
        again = [b for b in failed if b not in by_reads]
        if again:
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

    def transfer(self, plan: Plan, policy: CheckPolicy, on_digest: DigestFn | None = None) -> dict[str, str]:
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
            self.engine.fetch(wanted, self.limits, progress, finisher.on_part_done, finisher.hooks(on_digest))
            return finisher.failures()
        finally:
            progress.close()
            finisher.close()

    def repair_by_reads(self, blobs: list[BlobPlan]) -> tuple[set[str], int]:
        """Blobs without part digests that failed their hash: read them again part by part, keeping each
        read's sha256, and accept a part once two reads of it agree; only parts still in dispute are read
        again, and the whole hash is re-checked each round. A blob all of whose parts agree while its hash
        still fails is corrupt in the bucket (returned as not repaired). Returns (repaired, bytes read)."""
        reads: dict[str, dict[int, list[str]]] = {b.name: {} for b in blobs}
        disputed = {b.name: [p for _, p in _all_parts(b)] for b in blobs}
        repaired: set[str] = set()
        fetched = 0

        def on_digest(job: BlobJob, part: Part, digest: str) -> None:
            reads[job.blob_name].setdefault(part.index, []).append(digest)

        policy = CheckPolicy(full=True, record=True, keep_failed=True)
        for _ in range(REPAIR_ROUNDS):
            todo = [replace(b, missing=disputed[b.name], kept=Extents()) for b in blobs
                    if b.name not in repaired and disputed[b.name]]
            if not todo:
                break
            round_plan = Plan(to_fetch=todo)
            fetched += round_plan.bytes_to_fetch
            failures = self.transfer(round_plan, policy, on_digest)
            for blob in todo:
                if blob.name not in failures:
                    repaired.add(blob.name)
                    self.out.event("pull.repaired", f"blob {blob.name[:12]} verified after reads that agree",
                                   blob=blob.name)
                    continue
                disputed[blob.name] = [p for i, p in _all_parts(blob) if not _agreed(reads[blob.name].get(i))]
        for blob in blobs:
            if blob.name not in repaired:
                discard_partial(self.cache, blob.name)
        return repaired, fetched


def _all_parts(blob: BlobPlan) -> list[tuple[int, Part]]:
    ranges = part_ranges(blob.entry.size, blob.part_size)
    return [(i, Part(i, offset, length)) for i, offset, length in ranges]


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
