"""`pull`: fill the local cache from the bucket. The story, stage by stage:

1. read the manifest from the bucket (compact or legacy form), narrowed to the selected files
   (`agent.selection`: everything, or only what vLLM will read);
2. if the snapshot is already complete and verified here, use it as it is, writing nothing (a read-only
   volume is served so); else lock the model's cache folder (a second agent waits, then finds the work
   done);
3. clean stale pre-seeds, keeping every blob that verifies;
4. plan the byte ranges still missing, and check the disk;
5. transfer with the chosen engine; each blob is verified as soon as its last part lands (overlapping
   hashing with the transfer) and only then gets its final name;
6. place snapshot links, then the ref, then trees/<commit>.json, so nothing looks complete early.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from agent.cache import RepoCache, is_commit
from agent.clean import clean_stale
from agent.engines import pick_engine
from agent.engines.base import BlobJob, Engine, Limits, Part, TransferHooks
from agent.errors import ReadOnlyCacheError, VerificationError
from agent.manifest import FileEntry, part_count, part_ranges
from agent.output import Output, Progress, human_bytes
from agent.plan import (
    BlobPlan,
    Extents,
    Plan,
    blob_jobs,
    check_disk,
    discard_partial,
    plan_blob,
    size_limits,
    write_part_state,
)
from agent.ready import as_is_problem, cache_writable, refuse_read_only
from agent.remote import RemoteRepo, StagedSnapshot
from agent.s3read import ObjectReader, open_reader
from agent.selection import Selection
from agent.settings import Settings
from agent.subset import Subset, narrow
from agent.verify import StreamingCheck, check_content

URL_EXPIRY = 6 * 3600  # a slow pull of a large model must not outlive its URLs
_CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class PullOptions:
    repo_id: str
    revision: str = "main"
    engine: str = "auto"
    verify: str = "full"
    rehash: bool = False
    concurrency: int | None = None
    selection: Selection = field(default_factory=Selection)

    @property
    def full(self) -> bool:
        return self.verify == "full"


@dataclass
class PullResult:
    source: str
    engine: str
    repo_id: str
    revision: str
    commit: str = ""
    bytes_downloaded: int = 0
    seconds: float = 0.0
    verified: str = "full"
    snapshot_path: str = ""
    files: int = 0
    blobs_fetched: int = 0
    blobs_present: int = 0
    retries: int = 0
    files_skipped: int = 0
    bytes_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    selection: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def open_lock_file(path: Path) -> int:
    """Open (creating) the lock file without following a link: a planted link must not make the agent
    create or touch a file outside the cache. A link found there is removed and the open retried."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        path.unlink()
        return os.open(path, flags, 0o644)


@contextlib.contextmanager
def cache_lock(cache: RepoCache, out: Output) -> Iterator[None]:
    """An exclusive lock per model folder under .locks/ (where huggingface_hub keeps its own)."""
    try:
        cache.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(cache.lock_path)
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
        raise ReadOnlyCacheError(f"{cache.repo_id}: cannot write in the cache {cache.hub_cache} "
                                 f"({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out.event("pull.wait", f"another agent is pulling {cache.repo_id} into this cache; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading_lock(cache: RepoCache, out: Output) -> Iterator[None]:
    """The lock while only reading, so a writer at work is waited for; none where nobody may write."""
    with contextlib.ExitStack() as stack:
        if cache_writable(cache):
            with contextlib.suppress(ReadOnlyCacheError):
                stack.enter_context(cache_lock(cache, out))
        yield


REPAIR_ROUNDS = 6  # reads of a blob without part digests, at most, before its bytes are judged corrupt
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
                 workers: int = 2) -> None:
        self.cache = cache
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


def make_plan(cache: RepoCache, snap: StagedSnapshot, valid: set[str], engine: Engine,
              check_parts: bool) -> Plan:
    plan = Plan()
    for name, entry in snap.manifest.blobs().items():
        if name in valid:
            plan.present.append(name)
            discard_partial(cache, name)
        else:
            plan.to_fetch.append(plan_blob(cache, name, entry, snap.sidecar, check_parts=check_parts,
                                           resume=engine.resumes_in_parts))
    return plan


def transfer(store: ObjectReader, cache: RepoCache, snap: StagedSnapshot, plan: Plan, engine: Engine,
             limits: Limits, policy: CheckPolicy, out: Output,
             on_digest: Callable[[BlobJob, Part, str], None] | None = None) -> dict[str, str]:
    """Fetch and verify every planned blob; returns the blobs that failed verification."""
    keys = {b.name: snap.sources[b.name] for b in plan.to_fetch}
    urls = {name: store.presign(key, expires=URL_EXPIRY) for name, key in keys.items()}
    cache.ensure_dirs()
    finisher = Finisher(cache, plan, engine, policy)
    jobs = [finisher.job(j) for j in blob_jobs(cache, plan, urls, keys)]
    progress = Progress(out, plan.bytes_to_fetch)
    try:
        finisher.start_ready()
        wanted = [j for j in jobs if j.parts or j.whole]
        engine.fetch(wanted, limits, progress, finisher.on_part_done, finisher.hooks(on_digest))
        return finisher.failures()
    finally:
        progress.close()
        finisher.close()


def place(cache: RepoCache, snap: StagedSnapshot, revision: str) -> Path:
    """Links first, then the ref, then the manifest: each step only once the previous one is true."""
    for path, entry in snap.manifest.files.items():
        if not cache.blob_path(entry.blob_name).is_file():
            raise VerificationError(f"{path}: blob {entry.blob_name[:12]} is missing after the transfer")
        cache.link(snap.commit, path, entry.blob_name)
    if not is_commit(revision):
        cache.write_ref(revision, snap.commit)
    cache.write_tree(snap.commit, snap.manifest.to_json())
    return cache.snapshot_dir(snap.commit)


def pull_from_store(settings: Settings, opts: PullOptions, out: Output) -> PullResult:
    started = time.monotonic()
    store = open_reader(settings)
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    engine = pick_engine(opts.engine, settings)
    limits = size_limits(opts.concurrency, settings.deadlines)
    result = PullResult("minio", engine.name, opts.repo_id, opts.revision, verified=opts.verify)
    snap = RemoteRepo(store, opts.repo_id).load(opts.revision)  # 1. list + manifest
    result.commit = snap.commit
    out.event("pull.manifest", f"{opts.repo_id}@{snap.commit[:12]}: {len(snap.manifest.files)} files, "
              f"{human_bytes(snap.manifest.total_size)} ({snap.form} form)",
              commit=snap.commit, files=len(snap.manifest.files), bytes=snap.manifest.total_size)
    subset = narrow(store, cache, snap, opts.selection, out)  # 1b. only the files asked for (reads only)
    snap = subset.snap
    report_selection(result, subset)
    problem = as_is_problem(cache, snap.commit, snap.manifest, opts.revision, full=opts.full,
                            rehash=opts.rehash)  # 2. complete already? read only
    if problem is None:
        return used_as_is(result, cache, snap, started, out)
    refuse_read_only(cache, snap.commit, problem)
    with cache_lock(cache, out):  # something must be written: from here on, one agent at a time
        if opts.rehash:
            for name in snap.manifest.blobs():
                cache.forget_verified(name)
        cleaned = clean_stale(cache, snap.commit, snap.manifest, full=opts.full,
                              keep_partials=set(snap.manifest.blobs()), keep_blobs=subset.keep_on_disk,
                              revision=opts.revision, log=lambda m: out.event("pull.clean", m))  # 3. clean
        valid = cleaned.valid_blobs | subset.store_fetched(cache)
        plan = make_plan(cache, snap, valid, engine, check_parts=opts.full)  # 4. plan
        result.blobs_present = len(plan.present)
        if plan.to_fetch:
            check_disk(cache, plan)
            out.event("pull.plan", f"fetching {len(plan.to_fetch)} blobs "
                      f"({human_bytes(plan.bytes_to_fetch)}) with the {engine.name} engine, "
                      f"{limits.concurrency} streams",
                      blobs=len(plan.to_fetch), bytes=plan.bytes_to_fetch, engine=engine.name)
            result.bytes_downloaded, result.blobs_fetched = fetch_verified(
                store, cache, snap, plan, engine, limits, opts, out)  # 5. transfer + verify
            result.retries = int(getattr(engine, "retries", 0))
        else:
            result.source = "cache"
            out.event("pull.warm", "everything is present and verified: nothing to download")
        result.bytes_downloaded += subset.bytes_fetched
        subset.write_record(cache)
        result.snapshot_path = str(place(cache, snap, opts.revision))  # 6. links, ref, manifest
        result.files = len(snap.manifest.files)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def report_selection(result: PullResult, subset: Subset) -> None:
    result.files_skipped, result.bytes_skipped = len(subset.choice.skipped), subset.bytes_skipped
    result.skipped, result.selection = sorted(subset.choice.skipped), subset.describe()
    result.notes += subset.choice.notes


def used_as_is(result: PullResult, cache: RepoCache, snap: StagedSnapshot, started: float,
               out: Output) -> PullResult:
    result.source = "cache"
    result.snapshot_path = str(cache.snapshot_dir(snap.commit))
    result.files = len(snap.manifest.files)
    result.blobs_present = len(snap.manifest.blobs())
    result.seconds = round(time.monotonic() - started, 3)
    out.event("pull.warm", "everything is present and verified: nothing to download or write")
    return result


def fetch_verified(store: ObjectReader, cache: RepoCache, snap: StagedSnapshot, plan: Plan, engine: Engine,
                   limits: Limits, opts: PullOptions, out: Output) -> tuple[int, int]:
    """Transfer, then repair: a blob whose check failed is fetched again, by agreeing reads when it has
    no part digests and the engine can report them, else once from scratch."""
    policy = CheckPolicy(full=opts.full, rehash=opts.rehash)
    fetched_bytes = plan.bytes_to_fetch
    failures = transfer(store, cache, snap, plan, engine, limits, policy, out)
    for name, problem in failures.items():
        out.event("pull.repair", f"blob {name[:12]} failed its check ({problem}); fetching it again",
                  blob=name, problem=problem)
    failed = [b for b in plan.to_fetch if b.name in failures]
    by_reads = [b for b in failed if b.digests is None and engine.records_digests and opts.full]
    if by_reads:
        repaired, more = repair_by_reads(store, cache, snap, by_reads, engine, limits, out)
        fetched_bytes += more
        for name in repaired:
            failures.pop(name)
    again = [b for b in failed if b not in by_reads]
    if again:
        retry = Plan(to_fetch=[plan_blob(cache, b.name, b.entry, snap.sidecar, check_parts=opts.full,
                                         resume=False) for b in again])
        fetched_bytes += retry.bytes_to_fetch
        for blob in again:
            failures.pop(blob.name)
        failures.update(transfer(store, cache, snap, retry, engine, limits, policy, out))
    if failures:
        name, problem = next(iter(failures.items()))
        raise VerificationError(
            f"blob {name[:12]} of {snap.repo_id} still fails its check after a refetch: {problem}",
            hint="the staged object is corrupt; re-stage the model")
    return fetched_bytes, len(plan.to_fetch)


def repair_by_reads(store: ObjectReader, cache: RepoCache, snap: StagedSnapshot, blobs: list[BlobPlan],
                    engine: Engine, limits: Limits, out: Output) -> tuple[set[str], int]:
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
        failures = transfer(store, cache, snap, round_plan, engine, limits, policy, out, on_digest)
        for blob in todo:
            if blob.name not in failures:
                repaired.add(blob.name)
                out.event("pull.repaired", f"blob {blob.name[:12]} verified after reads that agree",
                          blob=blob.name)
                continue
            disputed[blob.name] = [p for i, p in _all_parts(blob) if not _agreed(reads[blob.name].get(i))]
    for blob in blobs:
        if blob.name not in repaired:
            discard_partial(cache, blob.name)
    return repaired, fetched


def _all_parts(blob: BlobPlan) -> list[tuple[int, Part]]:
    ranges = part_ranges(blob.entry.size, blob.part_size)
    return [(i, Part(i, offset, length)) for i, offset, length in ranges]


def _agreed(digests: list[str] | None) -> bool:
    """The last read of a part (the bytes now on disk) matches an earlier read of it."""
    return digests is not None and len(digests) > 1 and digests[-1] in digests[:-1]
