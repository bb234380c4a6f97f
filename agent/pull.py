"""`pull`: fill the local cache from the bucket. The story, stage by stage:

1. lock the model's cache folder (a second agent waits, then finds the work done);
2. read the manifest from the bucket (compact or legacy form);
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
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.cache import RepoCache, is_commit
from agent.clean import clean_stale
from agent.engines import pick_engine
from agent.engines.base import BlobJob, Engine, Limits, Part
from agent.errors import VerificationError
from agent.manifest import part_count
from agent.output import Output, Progress, human_bytes
from agent.plan import Plan, blob_jobs, check_disk, discard_partial, plan_blob, size_limits, write_part_state
from agent.remote import RemoteRepo, StagedSnapshot
from agent.settings import Settings
from agent.store import Store
from agent.verify import StreamingCheck, check_content

URL_EXPIRY = 6 * 3600  # a slow pull of a large model must not outlive its URLs


@dataclass
class PullOptions:
    repo_id: str
    revision: str = "main"
    engine: str = "auto"
    verify: str = "full"
    rehash: bool = False
    concurrency: int | None = None

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
    cache.lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(cache.lock_path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out.event("pull.wait", f"another agent is pulling {cache.repo_id} into this cache; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Finisher:
    """Tracks parts per blob; verifies and renames each blob once its last part lands, in threads."""

    def __init__(self, cache: RepoCache, plan: Plan, full: bool, workers: int = 2) -> None:
        self.cache = cache
        self.full = full
        self.blobs = {b.name: b for b in plan.to_fetch}
        self.remaining = {b.name: {p.index for p in b.missing if p.length > 0} for b in plan.to_fetch}
        # Parts not in the plan were kept from an earlier run: they count as done in the state file.
        self.done = {b.name: set(range(part_count(b.entry.size, b.part_size))) - {p.index for p in b.missing}
                     for b in plan.to_fetch}
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="verify")
        self.futures: dict[str, Future[str | None]] = {}
        self.checks = {b.name: StreamingCheck(cache.part_path(b.name), b.entry, b.part_size)
                       for b in plan.to_fetch} if full else {}

    def start_ready(self) -> None:
        """Blobs with nothing left to fetch (resumed complete, or empty) are finished at once."""
        for name, left in self.remaining.items():
            if not left:
                self.futures[name] = self.pool.submit(self.finalize, name)

    def on_part_done(self, job: BlobJob, part: Part) -> None:
        name = job.blob_name
        self.done[name].add(part.index)
        self.remaining[name].discard(part.index)
        blob = self.blobs[name]
        write_part_state(self.cache, name, blob.entry.size, blob.part_size, self.done[name])
        if not self.remaining[name] and name not in self.futures:
            self.futures[name] = self.pool.submit(self.finalize, name)
        elif name in self.checks:
            self.pool.submit(self.checks[name].advance, frozenset(self.done[name]))

    def finalize(self, name: str) -> str | None:
        part = self.cache.part_path(name)
        check = self.checks.get(name)
        problem = check.result() if check else check_content(part, self.blobs[name].entry, full=False)
        if problem is not None:
            discard_partial(self.cache, name)
            return problem
        os.replace(part, self.cache.blob_path(name))
        with contextlib.suppress(FileNotFoundError):
            self.cache.part_state_path(name).unlink()
        if self.full:
            self.cache.remember_verified(name)
        return None

    def failures(self) -> dict[str, str]:
        """Wait for every verification; blob name -> problem for those that failed."""
        problems = {}
        for name, future in self.futures.items():
            problem = future.result()
            if problem is not None:
                problems[name] = problem
        return problems

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_plan(cache: RepoCache, snap: StagedSnapshot, valid: set[str], limits: Limits) -> Plan:
    plan = Plan()
    for name, entry in snap.manifest.blobs().items():
        if name in valid:
            plan.present.append(name)
            discard_partial(cache, name)
        else:
            plan.to_fetch.append(plan_blob(cache, name, entry, snap.sidecar, limits.concurrency))
    return plan


def transfer(store: Store, cache: RepoCache, snap: StagedSnapshot, plan: Plan, engine: Engine,
             limits: Limits, full: bool, out: Output) -> dict[str, str]:
    """Fetch and verify every planned blob; returns the blobs that failed verification."""
    keys = {b.name: snap.sources[b.name] for b in plan.to_fetch}
    urls = {name: store.presign(key, expires=URL_EXPIRY) for name, key in keys.items()}
    cache.ensure_dirs()
    jobs = blob_jobs(cache, plan, urls, keys)
    finisher = Finisher(cache, plan, full)
    progress = Progress(out, plan.bytes_to_fetch)
    try:
        finisher.start_ready()
        engine.fetch([j for j in jobs if any(p.length for p in j.parts)], limits, progress,
                     finisher.on_part_done)
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
    store = Store(settings)
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    engine = pick_engine(opts.engine, settings)
    limits = size_limits(opts.concurrency, settings.deadlines)
    result = PullResult("minio", engine.name, opts.repo_id, opts.revision, verified=opts.verify)
    with cache_lock(cache, out):
        snap = RemoteRepo(store, opts.repo_id).load(opts.revision)  # 2. list + manifest
        result.commit = snap.commit
        out.event("pull.manifest", f"{opts.repo_id}@{snap.commit[:12]}: {len(snap.manifest.files)} files, "
                  f"{human_bytes(snap.manifest.total_size)} ({snap.form} form)",
                  commit=snap.commit, files=len(snap.manifest.files), bytes=snap.manifest.total_size)
        if opts.rehash:
            for name in snap.manifest.blobs():
                cache.forget_verified(name)
        cleaned = clean_stale(cache, snap.commit, snap.manifest, full=opts.full,
                              keep_partials=set(snap.manifest.blobs()),
                              log=lambda m: out.event("pull.clean", m))  # 3. clean
        plan = make_plan(cache, snap, cleaned.valid_blobs, limits)  # 4. plan
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
        result.snapshot_path = str(place(cache, snap, opts.revision))  # 6. links, ref, manifest
        result.files = len(snap.manifest.files)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def fetch_verified(store: Store, cache: RepoCache, snap: StagedSnapshot, plan: Plan, engine: Engine,
                   limits: Limits, opts: PullOptions, out: Output) -> tuple[int, int]:
    """Transfer, then one repair round that refetches any blob whose check failed from scratch."""
    fetched_bytes = plan.bytes_to_fetch
    failures = transfer(store, cache, snap, plan, engine, limits, opts.full, out)
    if failures:
        for name, problem in failures.items():
            out.event("pull.repair", f"blob {name[:12]} failed its check ({problem}); fetching it again",
                      blob=name, problem=problem)
        retry = Plan(to_fetch=[plan_blob(cache, b.name, b.entry, snap.sidecar, limits.concurrency)
                               for b in plan.to_fetch if b.name in failures])
        fetched_bytes += retry.bytes_to_fetch
        failures = transfer(store, cache, snap, retry, engine, limits, opts.full, out)
    if failures:
        name, problem = next(iter(failures.items()))
        raise VerificationError(
            f"blob {name[:12]} of {snap.repo_id} still fails its check after a refetch: {problem}",
            hint="the staged object is corrupt; re-stage the model")
    return fetched_bytes, len(plan.to_fetch)
