"""The `python` engine: ranged GETs in worker processes, written with pwrite into preallocated files.

Each worker process keeps one urllib3 pool (kept-alive connections) and fetches whole parts: it streams
the body in 1 MiB chunks to the part's offset while hashing it, so memory stays at a chunk per worker.
A part is retried by the failure policy (`agent.policy`) on a connection error, a read timeout (a
stalled server), a short body, a digest mismatch, or a retryable status (honouring Retry-After); any
other status fails at once, mapped by `error_for_status`. Workers ignore SIGINT/SIGTERM: the
parent handles the signal and kills them, so an interrupted pull unwinds in one place.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace

import urllib3

from agent.engines.base import BlobJob, Part, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.errors import (
    AgentError,
    ResourceLimitError,
    StorageUnavailableError,
    VerificationError,
    errno_in_text,
    error_for_errno,
    from_os_error,
)
from agent.policy import error_for_status, is_retryable, parse_retry_after
from agent.redact import scrub_queries
from agent.settings import Settings, Trust
from agent.transport import Pace, TooSlow, is_stall, paced_chunks, pool_for, untrusted_certificate

CHUNK = 1 << 20
# Errors of the pod's own disk and limits, as opposed to a socket's (reset, refused, timed out).
LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                errno.EACCES, errno.EPERM, errno.EIO, errno.EBADF, errno.ENOENT}
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_POOL: urllib3.PoolManager | None = None


class _Retryable(Exception):
    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class _BadDigest(_Retryable):
    """The part's bytes are not the sidecar's: no usable answer, retried like a stall."""


@dataclass(frozen=True)
class PartTask:
    url: str
    path: str
    size: int
    part: Part
    config: TransferConfig
    trust: Trust = field(default_factory=Trust)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _pool(url: str, config: TransferConfig, trust: Trust) -> urllib3.PoolManager:
    """One pool per worker (every URL of a pull names the same server), direct or via the env's proxy."""
    global _POOL
    if _POOL is None:
        _POOL = pool_for(url, connect=config.deadlines.connect, first_byte=config.deadlines.first_byte,
                         trust=trust)
    return _POOL


def _body_start(response: urllib3.BaseHTTPResponse, task: PartTask, asked: int | None = None) -> int:
    """Where in the object the body begins: `asked` (default: the part's first byte not kept) for 206,
    0 for a plain 200."""
    asked = task.part.offset + task.part.kept if asked is None else asked
    status = response.status
    if status in (200, 206):
        match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match:
            start = int(match.group(1))
            if start > asked:  # bytes before it would be missing: never write them shifted
                raise _Retryable(f"server sent bytes from {start}, asked from {asked}")
            return start
        if status == 206:
            raise _Retryable("206 without Content-Range")
        return 0  # the server ignored Range and sends the whole object
    if is_retryable(status):
        raise _Retryable(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
    raise error_for_status(status, f"{task.path} bytes {task.part.offset}+{task.part.length}")


def _kept_digest(fd: int, part: Part) -> hashlib._Hash:
    """The part's running sha256 over its kept leading bytes (re-checked with the rest of the part)."""
    digest = hashlib.sha256()
    done = 0
    while done < part.kept:
        chunk = os.pread(fd, min(CHUNK, part.kept - done), part.offset + done)
        if not chunk:
            raise _Retryable("kept bytes are shorter than recorded")
        digest.update(chunk)
        done += len(chunk)
    return digest


def _stream_part(task: PartTask, fd: int) -> None:
    part = task.part
    digest = _kept_digest(fd, part) if part.sha256 else None
    written = part.kept
    if written == part.length:
        if digest is not None and digest.hexdigest() != part.sha256:
            raise _BadDigest("part digest mismatch")
        return
    # A part's window (`lead`, `trail`) widens the request; only the part's own bytes are written.
    start = part.offset + written - (part.lead if written == 0 else 0)
    end = part.offset + part.length - 1 + part.trail
    response = _pool(task.url, task.config, task.trust).request(
        "GET", task.url, headers={"Range": f"bytes={start}-{end}"}, preload_content=False)
    reusable = False
    try:
        pos = _body_start(response, task)
        pace = Pace(task.config.deadlines.min_rate, task.config.deadlines.rate_window)
        for chunk in paced_chunks(response, pace, CHUNK):  # the stored bytes, byte for byte
            if pos < part.offset + written:  # a 200 for the whole object: skip to our range
                skip = min(len(chunk), part.offset + written - pos)
                chunk, pos = chunk[skip:], pos + skip
            chunk = chunk[: part.length - written]
            if chunk:
                os.pwrite(fd, chunk, part.offset + written)
                if digest is not None:
                    digest.update(chunk)
                written += len(chunk)
                pos += len(chunk)
            if written >= part.length:
                break
        if written != part.length:
            raise _Retryable(f"short body: {written} of {part.length} bytes")
        if digest is not None and digest.hexdigest() != part.sha256:
            raise _BadDigest("part digest mismatch")
        reusable = pos == end + 1 and response.status == 206  # a trail left unread: not reusable
    finally:
        # Only a fully read 206 leaves the connection clean for the next request; otherwise drop it.
        if not reusable:
            response.close()
        response.release_conn()


def fetch_part(task: PartTask) -> int:
    """Runs in a worker: fetch one part with retries; returns the number of retries it needed."""
    fd = os.open(task.path, os.O_RDWR)
    policy = task.config.retry
    stalls = 0
    try:
        for attempt in range(policy.attempts):
            try:
                _stream_part(task, fd)
                return attempt
            except (_Retryable, TooSlow, urllib3.exceptions.HTTPError, OSError) as exc:
                untrusted = untrusted_certificate(exc, task.url.split("?", 1)[0], task.trust)
                if untrusted is not None:  # a person must act: no retry makes the certificate valid
                    raise untrusted from None
                # no usable answer (nobody there, too slow, wrong bytes): only `stall_retries`; 503s and
                # resets get more
                stalls += is_stall(exc) or isinstance(exc, _BadDigest)
                if policy.gives_up(attempt, stalls):
                    raise _final_error(task, exc) from None
                # Kept bytes are trusted for one try only: a failed part is fetched whole next time.
                task = replace(task, part=replace(task.part, kept=0))
                retry_after = exc.retry_after if isinstance(exc, _Retryable) else None
                time.sleep(policy.delay(attempt, retry_after=retry_after))
    finally:
        os.close(fd)
    return policy.max_retries


def _final_error(task: PartTask, exc: Exception) -> AgentError:
    where = f"{os.path.basename(task.path)} bytes {task.part.offset}+{task.part.length}"
    if isinstance(exc, _BadDigest):
        return VerificationError(f"{where}: part digest mismatch after retries")
    # urllib3 names the request path with its query (MaxRetryError: "... with url: /b/k?X-Amz-..."), with
    # or without a scheme: strip every query string, not only those of full URLs.
    reason = scrub_queries(str(exc))
    message = f"{where}: gave up after retries ({type(exc).__name__}: {reason[:200]})"
    # A socket error is the server's or the network's; these are the pod's own (urllib3 keeps the
    # errno only in its text): a hint about MINIO_ENDPOINT would send a person the wrong way.
    number = exc.errno if isinstance(exc, OSError) and exc.errno else errno_in_text(reason)
    if number in LOCAL_ERRNOS:
        return error_for_errno(number, message)
    return StorageUnavailableError(message)


class PythonEngine:
    name = "python"
    reads_urls = True
    writes_in_place = True
    checks_parts = True
    hashes_blobs = False
    records_digests = False
    resumes_in_parts = True  # a part's kept bytes are kept; progress inside a part is not reported

    def __init__(self, processes: int | None = None, *, trust: Trust | None = None) -> None:
        self.processes = processes
        self.trust = trust or Trust()
        self.retries = 0

    @classmethod
    def from_settings(cls, settings: Settings | None) -> PythonEngine:
        # presigned URLs carry all it needs but whom to trust
        return cls(trust=settings.trust if settings is not None else None)

    @classmethod
    def available(cls) -> bool:
        return True  # pure Python: always

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        tasks = [(job, part) for job in jobs for part in job.parts if part.length > 0]
        if not tasks:
            return
        workers = max(1, min(self.processes or config.concurrency, len(tasks)))
        # forkserver: workers start from a clean single-threaded server (fork from a threaded parent is
        # unsafe) without paying spawn's full interpreter start per worker.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["agent.engines.python"])
        try:
            executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
            try:
                self._run(executor, tasks, config, progress, on_part_done)
            except BaseException:  # a signal, or a part that failed: nothing more of this fetch is wanted
                _stop(executor, kill=True)
                raise
            _stop(executor)
        except BrokenProcessPool as exc:  # a worker vanished: the OOM killer is the usual cause
            raise ResourceLimitError(f"a download worker process died ({exc})",
                                     hint="the pod may be short of memory: raise its limit, lower "
                                          "--concurrency, or use --engine native") from None
        except OSError as exc:  # opening a part file, or starting workers (out of files or processes)
            raise from_os_error(exc, "python engine") from None

    def _run(self, executor: ProcessPoolExecutor, tasks: list[tuple[BlobJob, Part]], config: TransferConfig,
             progress: ProgressFn, on_part_done: PartDoneFn) -> None:
        pending: dict[Future[int], tuple[BlobJob, Part]] = {}
        for job, part in tasks:
            task = PartTask(job.url, str(job.temp_path), job.size, part, config, self.trust)
            pending[executor.submit(fetch_part, task)] = (job, part)
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                job, part = pending.pop(future)
                self.retries += future.result()  # re-raises the worker's AgentError
                progress(part.length - part.kept)
                on_part_done(job, part)


def _stop(executor: ProcessPoolExecutor, kill: bool = False) -> None:
    """Cancel what has not started and wait for the workers. `kill`: the fetch is being abandoned (a
    signal, a failed part), so the workers are killed at once rather than left writing: they ignore
    SIGTERM and SIGINT, which the agent handles for them. A killed worker's part is simply not done."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    if kill:
        for proc in processes:
            if proc.is_alive():
                proc.kill()
    executor.shutdown(wait=kill, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=5)
