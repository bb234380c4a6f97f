"""Each blob's way from its first byte to its final name, whichever engine fetches it.

While the engine writes, the finisher saves checkpoints of the bytes on disk (a few times a second, so a
SIGKILL loses little); when a blob's last part lands it is checked, by the first of these that applies:
1. its parts, when the sidecar's part digests are bound to the blob's name and the engine checked them
   as they arrived: nothing is read again;
2. the engine's own whole hash in the stream (native), whose verdict arrives through `on_verdict`;
3. a hash here, in a verify thread, for an engine that cannot (`StreamingCheck` follows the finished
   parts, so little is left to hash when the last one lands).
Only a blob that passed gets its final name in `blobs/`; one that failed is discarded (or kept on disk
for a repair round that reads it again part by part).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from agent.cache import RepoCache
from agent.engines.base import BlobJob, Engine, Part, TransferHooks
from agent.manifest import FileEntry, part_count
from agent.plan import BlobPlan, Extents, Plan, discard_partial, write_part_state
from agent.verify import StreamingCheck, check_content

CHECKPOINT_SECONDS = 0.25  # how often progress inside parts is saved for a rerun after SIGKILL
CHECKPOINT_MIN_BYTES = 1 << 20  # a smaller one-part blob is fetched again rather than checkpointed


@dataclass(frozen=True)
class CheckPolicy:
    """How the blobs of one transfer are checked. `full`: content, not only sizes; `rehash`: hash whole
    blobs even when their bound part digests already prove them; `record`: have the engine report the
    sha256 of every part it reads (repair); `keep_failed`: a blob that fails keeps its bytes on disk."""

    full: bool
    rehash: bool = False
    record: bool = False
    keep_failed: bool = False


def whole_digest(entry: FileEntry) -> tuple[str, str]:
    """The digest that names a blob, as the engines take it."""
    return ("sha256", entry.lfs_sha256) if entry.lfs_sha256 else ("git-sha1", entry.blob_id)


class Finisher:
    """Follows every planned blob through the transfer: saves checkpoints of its bytes as they land,
    has it checked (by its bound part digests, by the engine's whole hash, or by hashing it here for an
    engine that cannot), and gives it its final name once the check passed."""

    def __init__(self, cache: RepoCache, plan: Plan, engine: Engine, policy: CheckPolicy,
                 workers: int = 2, on_named: Callable[[str], None] | None = None) -> None:
        self.cache = cache
        self.on_named = on_named  # told each blob that got its final name (checked): vLLM may read it
        self.policy = policy
        self.engine = engine
        self.blobs = {b.name: b for b in plan.to_fetch}
        # An empty part has nothing to fetch or check (engines may not even report it).
        self.remaining = {b.name: {p.index for p in b.missing if p.length} for b in plan.to_fetch}
        self.have = {b.name: Extents(b.kept.ranges) for b in plan.to_fetch}
        self.whole = {b.name for b in plan.to_fetch if self._needs_whole(b)}
        # Thousands of small files must not cost a checkpoint write each.
        self.checkpointed = {b.name for b in plan.to_fetch
                             if b.entry.size >= CHECKPOINT_MIN_BYTES or b.entry.size > b.part_size}
        # Parts not in the plan were kept whole from an earlier run: they count as done.
        self.done = {b.name: set(range(part_count(b.entry.size, b.part_size))) - self.remaining[b.name]
                     for b in plan.to_fetch}
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="verify")
        self.futures: dict[str, Future[str | None]] = {}
        self.problems: dict[str, str] = {}
        self.finished: set[str] = set()
        self.dirty: set[str] = set()
        self.flushed = time.monotonic()
        self.lock = threading.Lock()  # a checkpoint is never written after its blob got its name
        self.checks = {name: StreamingCheck(cache.part_path(name), self.blobs[name].entry,
                                            self.blobs[name].part_size)
                       for name in self.whole if not engine.hashes_blobs}

    def _needs_whole(self, blob: BlobPlan) -> bool:
        proven_by_parts = blob.bound and self.engine.checks_parts and not self.policy.rehash
        return self.policy.full and (not proven_by_parts or self.policy.record)

    def job(self, job: BlobJob) -> BlobJob:
        """The job as the engine must run it: with the blob's digest when the engine hashes it."""
        if job.blob_name in self.whole and self.engine.hashes_blobs:
            job = replace(job, whole=whole_digest(self.blobs[job.blob_name].entry))
        return replace(job, record=self.policy.record)

    def hooks(self, on_digest: Callable[[BlobJob, Part, str], None] | None = None) -> TransferHooks:
        return TransferHooks(on_written=self.on_written, on_digest=on_digest, on_verdict=self.on_verdict)

    def start_ready(self) -> None:
        """Blobs with nothing left to fetch (resumed complete, or empty) are finished at once, unless
        the engine judges them (it hashes their kept bytes itself)."""
        for name, left in self.remaining.items():
            if not left and not (name in self.whole and self.engine.hashes_blobs):
                self.futures[name] = self.pool.submit(self.finalize, name)

    def on_written(self, job: BlobJob, part: Part, written: int) -> None:
        if job.blob_name not in self.finished and job.blob_name in self.checkpointed:
            self.have[job.blob_name].add(part.offset, part.offset + written)
            self.dirty.add(job.blob_name)
            self.save_checkpoints()

    def on_part_done(self, job: BlobJob, part: Part) -> None:
        name = job.blob_name
        self.done[name].add(part.index)
        self.remaining[name].discard(part.index)
        if name in self.finished:
            return
        self.have[name].add(part.offset, part.offset + part.length)
        if not self.remaining[name] and name not in self.futures:
            if name in self.checks:  # hashing here: in a verify thread, off the transfer's path
                self.futures[name] = self.pool.submit(self.finalize, name)
            elif name not in self.whole:  # proven by its parts (or sizes only): named at once
                self.finalize(name)
            return  # else the engine's verdict on its whole hash finishes it
        if name in self.checks:
            self.pool.submit(self.checks[name].advance, frozenset(self.done[name]))
        # A finished part is saved at once (a blob about to get its name needs no checkpoint); progress
        # inside parts is saved a few times a second.
        if name in self.checkpointed:
            self.dirty.add(name)
            self.save_checkpoints(force=True)

    def on_verdict(self, job: BlobJob, problem: str | None) -> None:
        self.problems.pop(job.blob_name, None)
        self.give_name(job.blob_name, problem)

    def save_checkpoints(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.flushed < CHECKPOINT_SECONDS:
            return
        self.flushed = now
        with self.lock:
            for name in self.dirty - self.finished:
                write_part_state(self.cache, name, self.blobs[name].entry.size, self.have[name])
            self.dirty.clear()

    def finalize(self, name: str) -> str | None:
        """In a verify thread: the blob's check where this process makes it, then its final name."""
        check = self.checks.get(name)
        entry = self.blobs[name].entry
        problem = check.result() if check else check_content(self.cache.part_path(name), entry, full=False)
        return self.give_name(name, problem)

    def give_name(self, name: str, problem: str | None) -> str | None:
        with self.lock:
            self.finished.add(name)
        if problem is not None:
            self.problems[name] = problem
            if not self.policy.keep_failed:
                discard_partial(self.cache, name)
            return problem
        os.replace(self.cache.part_path(name), self.cache.blob_path(name))
        with contextlib.suppress(FileNotFoundError):
            self.cache.part_state_path(name).unlink()
        if self.policy.full:
            self.cache.remember_verified(name)
        if self.on_named is not None:
            self.on_named(name)
        return None

    def failures(self) -> dict[str, str]:
        """Wait for every verification; blob name -> problem for those that failed."""
        for future in self.futures.values():
            future.result()
        for name in self.blobs:
            if name not in self.finished:
                self.problems[name] = "the engine reported no verdict on it"
        return dict(self.problems)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.save_checkpoints(force=True)
