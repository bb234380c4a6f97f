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

With a `Handoff` (serve's overlapped start, `agent.serving`), step 5 runs in two rounds: first the
files vLLM reads before any weight, which are then linked with the ref (step 6 for them alone), and the
handoff is told so vLLM can start; then the weights, in the order vLLM reads them, the handoff told of
each blob as it gets its final name (it passed its check). Step 6 then completes the snapshot as always.

Where each step lives: 1 `agent.remote` and `agent.subset`; 2 `agent.ready`, and the lock `agent.lock`;
3 `agent.clean`; 4 `agent.plan`; 5 `agent.fetch` (the transfer and its repairs) with `agent.finish` (each
blob's check and final name) and the engines; 6 `agent.cache`. A pod's entry point is
`agent.fallback.pull_with_fallback`: this pull first, then the Hub when the bucket cannot deliver.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from agent.cache import RepoCache, is_commit
from agent.clean import clean_stale
from agent.engines import pick_engine
from agent.engines.base import Engine, TransferConfig
from agent.errors import VerificationError
from agent.fetch import Fetch
from agent.lock import cache_lock
from agent.output import Output, human_bytes
from agent.plan import Plan, check_disk, make_plan
from agent.ready import as_is_problem, refuse_read_only
from agent.remote import RemoteRepo, StagedSnapshot
from agent.s3read import ObjectReader, open_reader
from agent.selection import Selection
from agent.settings import Settings
from agent.subset import Subset, narrow


@dataclass
class PullOptions:
    repo_id: str
    revision: str = "main"
    engine: str = "auto"
    verify: str = "full"
    rehash: bool = False
    concurrency: int | None = None
    selection: Selection = field(default_factory=Selection)
    transfer: TransferConfig | None = None  # None: sized to the machine, `concurrency` streams if given

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


class Handoff(Protocol):
    """What a caller that starts its consumer before the pull ends is asked and told, in this order."""

    def first(self, path: str) -> bool:
        """Whether `path` must be in place before the rest is fetched."""

    def reading_order(self, paths: list[str]) -> list[str]:
        """`paths` (of the rest) in the order the consumer will read them."""

    def placed_first(self, cache: RepoCache, snap: StagedSnapshot) -> None:
        """The first files are verified and linked, and the ref points at the commit."""

    def arrived(self, blob_name: str) -> None:
        """A blob of the rest is on disk under its final name: it passed its check."""


def link_files(cache: RepoCache, snap: StagedSnapshot,
               wanted: Callable[[str], bool] = lambda _: True) -> None:
    """Each wanted file's snapshot link, its blob on disk first."""
    for path, entry in snap.manifest.files.items():
        if not wanted(path):
            continue
        if not cache.blob_path(entry.blob_name).is_file():
            raise VerificationError(f"{path}: blob {entry.blob_name[:12]} is missing after the transfer")
        cache.link(snap.commit, path, entry.blob_name)


def place(cache: RepoCache, snap: StagedSnapshot, revision: str) -> Path:
    """Links first, then the ref, then the manifest: each step only once the previous one is true."""
    link_files(cache, snap)
    if not is_commit(revision):
        cache.write_ref(revision, snap.commit)
    cache.write_tree(snap.commit, snap.manifest.to_json())
    return cache.snapshot_dir(snap.commit)


def place_first(cache: RepoCache, snap: StagedSnapshot, revision: str, first: Callable[[str], bool]) -> None:
    """Step 6 for the first files alone: their links, then the ref. trees/<commit>.json is written only
    once the rest has landed: huggingface_hub checks an offline snapshot against it, and one listing
    files still on their way would make vLLM's resolution of the model fail."""
    link_files(cache, snap, first)
    with contextlib.suppress(FileNotFoundError):
        cache.tree_path(snap.commit).unlink()
    if not is_commit(revision):
        cache.write_ref(revision, snap.commit)


def fetch_in_two_rounds(fetch: Fetch, plan: Plan, opts: PullOptions, handoff: Handoff) -> int:
    """Step 5 with a handoff: the first files, placed and handed off, then the rest in the handoff's
    order, each blob handed off as it gets its name. Returns the bytes fetched."""
    snap = fetch.snap
    first_blobs = {e.blob_name for p, e in snap.manifest.files.items() if handoff.first(p)}
    first = [b for b in plan.to_fetch if b.name in first_blobs]
    later = [p for p, e in snap.manifest.files.items() if e.blob_name not in first_blobs]
    rank: dict[str, int] = {}
    order = handoff.reading_order(later)
    for index, path in enumerate(order):
        rank.setdefault(snap.manifest.files[path].blob_name, index)
    rest = sorted((b for b in plan.to_fetch if b.name not in first_blobs), key=lambda b: rank.get(b.name, 0))
    fetched = fetch.verified(Plan(first), full=opts.full, rehash=opts.rehash) if first else 0
    place_first(fetch.cache, snap, opts.revision, handoff.first)
    handoff.placed_first(fetch.cache, snap)
    for name in plan.present:
        handoff.arrived(name)
    if rest:
        fetched += replace(fetch, on_named=handoff.arrived).verified(Plan(rest), full=opts.full,
                                                                      rehash=opts.rehash)
    return fetched


def fetch_planned(fetch: Fetch, plan: Plan, opts: PullOptions, handoff: Handoff | None) -> int:
    if handoff is None:
        return fetch.verified(plan, full=opts.full, rehash=opts.rehash)
    return fetch_in_two_rounds(fetch, plan, opts, handoff)


def pull_from_store(settings: Settings, opts: PullOptions, out: Output, *, reader: ObjectReader | None = None,
                    engine: Engine | None = None, handoff: Handoff | None = None) -> PullResult:
    """The story above, step by step. `reader` and `engine`: the bucket and the engine to use (by default
    the ones `settings` and `opts` name); `handoff`: told when the first files are in place and as each
    later blob lands (never when the snapshot is complete already, or has nothing to fetch)."""
    started = time.monotonic()
    reader = reader or open_reader(settings)
    engine = engine or pick_engine(opts.engine, settings)
    limits = opts.transfer or TransferConfig.sized(opts.concurrency, settings.deadlines)
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    result = PullResult("minio", engine.name, opts.repo_id, opts.revision, verified=opts.verify)
    subset = read_snapshot(reader, cache, opts, result, out)  # 1. list + manifest, narrowed
    snap = subset.snap
    problem = as_is_problem(cache, snap.commit, snap.manifest, opts.revision, full=opts.full,
                            rehash=opts.rehash)  # 2. complete already? read only
    if problem is None:
        return used_as_is(result, cache, snap, started, out)
    refuse_read_only(cache, snap.commit, problem)
    with cache_lock(cache, out):  # something must be written: from here on, one agent at a time
        plan = clean_and_plan(cache, subset, opts, engine.resumes_in_parts, out)  # 3. clean, 4. plan
        result.blobs_present = len(plan.present)
        if plan.to_fetch:
            check_disk(cache, plan)
            out.event("pull.plan", f"fetching {len(plan.to_fetch)} blobs "
                      f"({human_bytes(plan.bytes_to_fetch)}) with the {engine.name} engine, "
                      f"{limits.concurrency} streams",
                      blobs=len(plan.to_fetch), bytes=plan.bytes_to_fetch, engine=engine.name)
            fetch = Fetch(reader, cache, snap, engine, limits, out)
            result.bytes_downloaded = fetch_planned(fetch, plan, opts, handoff)  # 5. fetch
            result.blobs_fetched = len(plan.to_fetch)
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


def read_snapshot(reader: ObjectReader, cache: RepoCache, opts: PullOptions, result: PullResult,
                  out: Output) -> Subset:
    """Step 1: the staged snapshot (ref, manifest, sidecar), narrowed to the files asked for."""
    snap = RemoteRepo(reader, opts.repo_id).load(opts.revision)
    result.commit = snap.commit
    out.event("pull.manifest", f"{opts.repo_id}@{snap.commit[:12]}: {len(snap.manifest.files)} files, "
              f"{human_bytes(snap.manifest.total_size)} ({snap.form} form)",
              commit=snap.commit, files=len(snap.manifest.files), bytes=snap.manifest.total_size)
    subset = narrow(reader, cache, snap, opts.selection, out)  # reads only
    report_selection(result, subset)
    return subset


def clean_and_plan(cache: RepoCache, subset: Subset, opts: PullOptions, resume: bool, out: Output) -> Plan:
    """Steps 3 and 4, under the lock: stale pre-seeds go (every blob that verifies stays), then the byte
    ranges still missing are planned."""
    snap = subset.snap
    if opts.rehash:
        for name in snap.manifest.blobs():
            cache.forget_verified(name)
    cleaned = clean_stale(cache, snap.commit, snap.manifest, full=opts.full,
                          keep_partials=set(snap.manifest.blobs()), keep_blobs=subset.keep_on_disk,
                          revision=opts.revision, log=lambda m: out.event("pull.clean", m))
    valid = cleaned.valid_blobs | subset.store_fetched(cache)
    return make_plan(cache, snap, valid, check_parts=opts.full, resume=resume)


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
