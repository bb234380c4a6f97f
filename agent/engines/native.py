"""The `native` engine: the Rust extension `agent._native` fetches the parts, this module adapts it.

Rust does the bytes (tokio + hyper, pooled keep-alive connections, pwrite at each part's offset, part and
whole-blob digests as the bytes arrive, jittered retries that resume a broken part where it stopped, a
checkpoint of every part in progress); Python keeps the planning, signing and the final rename. The
extension releases the GIL for the transfer and wakes every `progress_interval` to run Python signal
handlers and the progress callback, so SIGINT/SIGTERM stop it promptly. The agent runs without the
extension: `available()` is then False and `auto` picks `python`.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from agent.engines.base import BlobJob, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.errors import (
    AgentError,
    InternalError,
    ResourceLimitError,
    StorageUnavailableError,
    UsageError,
    VerificationError,
    errno_in_text,
    error_for_errno,
    untrusted_certificate,
)
from agent.policy import error_for_status
from agent.redact import scrub_queries
from agent.settings import Settings, Trust

if TYPE_CHECKING:
    from agent._native import FetchError
    from agent._native import _FetchStats as FetchStats
    from agent._native import _JobSpec as JobSpec
    from agent._native import _News as News

PROGRESS_INTERVAL = 0.1  # seconds between progress reports, signal checks and cancellation points
# Failures of a socket or thread that come from the pod's own limits, whatever the engine was doing.
_LOCAL_LIMITS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}
_GET_URL = re.compile(r"\(GET ([^\s)]+)\)")  # the (redacted) URL the extension's messages end with


def _extension() -> ModuleType | None:
    try:
        from agent import _native
    except ImportError:
        return None
    return _native if hasattr(_native, "fetch") else None


class NativeEngine:
    name = "native"
    reads_urls = True
    writes_in_place = True
    checks_parts = True
    hashes_blobs = True
    records_digests = True
    resumes_in_parts = True

    def __init__(self, progress_interval: float = PROGRESS_INTERVAL, *, trust: Trust | None = None) -> None:
        self.progress_interval = progress_interval
        self.trust = trust or Trust()
        self.stats: FetchStats | None = None  # of the last fetch: bytes, retries, parts

    @classmethod
    def from_settings(cls, settings: Settings | None) -> NativeEngine:
        # presigned URLs carry all it needs but whom to trust
        return cls(trust=settings.trust if settings is not None else None)

    @classmethod
    def available(cls) -> bool:
        """True when the compiled extension loads (a build without it still runs the agent)."""
        return _extension() is not None

    @property
    def retries(self) -> int:
        return self.stats["retries"] if self.stats else 0

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        native = _extension()
        if native is None:
            raise UsageError("the native engine is not built into this installation",
                             hint="use --engine python, or reinstall with the compiled extension")
        if not any(job.parts or job.whole for job in jobs):
            return

        def report(delta: int, done: list[tuple[int, int]]) -> None:
            if delta:
                progress(delta)
            for job_index, position in done:
                job = jobs[job_index]
                on_part_done(job, job.parts[position])

        deadlines, retry = config.deadlines, config.retry
        try:
            self.stats = native.fetch(
                [to_spec(job) for job in jobs],
                concurrency=config.concurrency,
                connect_timeout=deadlines.connect,
                read_timeout=deadlines.first_byte,
                max_retries=retry.max_retries,
                backoff_base=retry.base,
                backoff_max=retry.cap,
                progress=report,
                progress_interval=self.progress_interval,
                report=_news_handler(jobs, hooks) if hooks else None,
                min_rate=deadlines.min_rate,
                rate_window=deadlines.rate_window,
                stall_retries=retry.stall_retries,
                ca_file=self.trust.ca_file,
                ca_dir=self.trust.ca_dir,
            )
        except (native.FetchError, RuntimeError, ValueError, OverflowError) as exc:
            raise translate(exc, self.trust) from None


def _news_handler(jobs: Sequence[BlobJob], hooks: TransferHooks) -> Callable[[News], None]:
    """The extension's per-tick news as hook calls (in the calling thread, between transfer ticks)."""

    def handle(news: News) -> None:
        if hooks.on_written:
            for job_index, position, written in news["written"]:
                hooks.on_written(jobs[job_index], jobs[job_index].parts[position], written)
        if hooks.on_digest:
            for job_index, position, digest in news["digests"]:
                hooks.on_digest(jobs[job_index], jobs[job_index].parts[position], digest)
        if hooks.on_verdict:
            for job_index, ok, actual in news["verdicts"]:
                job = jobs[job_index]
                expected = job.whole[1] if job.whole else "?"
                hooks.on_verdict(job, None if ok else f"content hash {actual[:12]}... != expected "
                                                      f"{expected[:12]}...")

    return handle


def to_spec(job: BlobJob) -> JobSpec:
    """A job as plain values. Each part's index is its position in `job.parts`, so the extension's
    `(job_index, part_index)` reports map back without ambiguity. Parts are checked by BLAKE3 when the
    sidecar gives it for all of them (two fifths of sha256's CPU: on a busy pod that is the difference
    between hashing at line rate and not), else by sha256."""
    fast = bool(job.parts) and all(p.blake3 for p in job.parts)
    return {
        "url": job.url,
        "headers": None,
        "path": str(job.temp_path),
        "size": job.size,
        "parts": [(i, p.offset, p.length, p.blake3 if fast else p.sha256, p.kept, p.lead, p.trail)
                  for i, p in enumerate(job.parts)],
        "part_digest": "blake3" if fast else "sha256",
        "whole": job.whole,
        "record": job.record,
    }


def translate(exc: FetchError | RuntimeError | ValueError | OverflowError,
              trust: Trust | None = None) -> AgentError:
    """The extension's error as the agent's, with a documented exit code and a hint true for its cause;
    no query string in the text. Besides its FetchError family the extension raises RuntimeError when
    its runtime cannot start (out of open files or threads) and ValueError/OverflowError for arguments
    it refuses (a bug on our side: the agent checks what users give)."""
    from agent import _native

    message = scrub_queries(str(exc), "")
    if isinstance(exc, _native.HttpStatusError):
        return error_for_status(getattr(exc, "status", 0), "", message=message)
    if isinstance(exc, _native.CertificateError):  # named by the URL it refused (no query), not the part
        url = _GET_URL.search(message)
        where = url.group(1) if url else message.split(": bytes ", 1)[0]
        return untrusted_certificate(where, message, (trust or Trust()).source)
    if isinstance(exc, _native.DigestMismatchError):
        return VerificationError(message)
    if isinstance(exc, _native.FileWriteError):
        return error_for_errno(getattr(exc, "errno", None), message)
    number = errno_in_text(message)
    if number in _LOCAL_LIMITS:  # the pod's limits, not the server: say so
        return error_for_errno(number, message)
    if isinstance(exc, _native.TransferError):
        return StorageUnavailableError(message)
    if isinstance(exc, RuntimeError):
        return ResourceLimitError(message, hint="the native engine could not start its threads: raise the "
                                                "pod's limits, or use --engine python")
    return InternalError(f"native engine: {type(exc).__name__}: {message}",
                         hint="a bug in simswarm-agent: use --engine python, and report it")

