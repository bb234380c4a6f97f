"""The `native` engine: the Rust extension `agent._native` fetches the parts, this module adapts it.

Rust does the bytes (tokio + hyper, pooled keep-alive connections, pwrite at each part's offset, sha256
as the bytes arrive, jittered retries that resume a broken part where it stopped); Python keeps the
planning, signing and final verification. The extension releases the GIL for the transfer and wakes every
`progress_interval` to run Python signal handlers and the progress callback, so SIGINT/SIGTERM stop it
promptly. The agent runs without the extension: `available()` is then False and `auto` picks `python`.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from agent.engines.base import BlobJob, Limits, PartDoneFn, ProgressFn
from agent.errors import (
    AgentError,
    CredentialsError,
    DiskFullError,
    NotFoundError,
    StorageUnavailableError,
    UsageError,
    VerificationError,
)
from agent.store import scrub_queries

if TYPE_CHECKING:
    from agent._native import FetchError
    from agent._native import _FetchStats as FetchStats
    from agent._native import _JobSpec as JobSpec

PROGRESS_INTERVAL = 0.1  # seconds between progress reports, signal checks and cancellation points
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _extension() -> ModuleType | None:
    try:
        from agent import _native
    except ImportError:
        return None
    return _native if hasattr(_native, "fetch") else None


class NativeEngine:
    name = "native"

    def __init__(self, progress_interval: float = PROGRESS_INTERVAL) -> None:
        self.progress_interval = progress_interval
        self.stats: FetchStats | None = None  # of the last fetch: bytes, retries, parts

    @classmethod
    def available(cls) -> bool:
        """True when the compiled extension loads (a build without it still runs the agent)."""
        return _extension() is not None

    @property
    def retries(self) -> int:
        return self.stats["retries"] if self.stats else 0

    def fetch(self, jobs: Sequence[BlobJob], limits: Limits, progress: ProgressFn,
              on_part_done: PartDoneFn) -> None:
        native = _extension()
        if native is None:
            raise UsageError("the native engine is not built into this installation",
                             hint="use --engine python, or reinstall with the compiled extension")
        if not any(job.parts for job in jobs):
            return

        def report(delta: int, done: list[tuple[int, int]]) -> None:
            if delta:
                progress(delta)
            for job_index, position in done:
                job = jobs[job_index]
                on_part_done(job, job.parts[position])

        try:
            self.stats = native.fetch(
                [to_spec(job) for job in jobs],
                concurrency=limits.concurrency,
                connect_timeout=limits.connect_timeout,
                read_timeout=limits.read_timeout,
                max_retries=limits.max_retries,
                backoff_base=limits.backoff_base,
                backoff_max=limits.backoff_max,
                progress=report,
                progress_interval=self.progress_interval,
                min_rate=limits.min_rate,
                rate_window=limits.rate_window,
                stall_retries=limits.stall_retries,
            )
        except native.FetchError as exc:
            raise translate(exc) from None


def to_spec(job: BlobJob) -> JobSpec:
    """A job as plain values. Each part's index is its position in `job.parts`, so the extension's
    `(job_index, part_index)` reports map back without ambiguity."""
    return {
        "url": job.url,
        "headers": None,
        "path": str(job.temp_path),
        "size": job.size,
        "parts": [(i, p.offset, p.length, p.sha256) for i, p in enumerate(job.parts)],
    }


def translate(exc: FetchError) -> AgentError:
    """The extension's error as the agent's, with its exit code; no query string in the text."""
    from agent import _native

    message = scrub_queries(str(exc), "")
    if isinstance(exc, _native.HttpStatusError):
        status = exc.status
        if status == 403:
            return CredentialsError(message)
        if status == 404:
            return NotFoundError(message)
        if status == 416:
            return VerificationError(message, hint="the object is shorter than the manifest says; "
                                                   "re-stage the model")
        return StorageUnavailableError(message)
    if isinstance(exc, _native.DigestMismatchError):
        return VerificationError(message)
    if isinstance(exc, _native.FileWriteError):
        if exc.errno in _DISK_FULL:
            return DiskFullError(message)
        return AgentError(message, hint="check that the cache directory exists and is writable")
    return StorageUnavailableError(message)
