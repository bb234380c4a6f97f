"""What an engine is: it fills the partial files of a pull with the bytes of their objects.

The orchestration (`agent.pull`, `agent.fetch`) plans which parts of which blobs are still missing,
preallocates each partial file (`BlobJob.temp_path`), and hands the engine a list of `BlobJob`s. The
engine puts every missing part's bytes into that file, checks the part's digest when the sidecar gives
one (BLAKE3 in the native engine when there is one, sha256 in the python engine; re-reading the part's
`kept` leading bytes, already on disk, into that check), and reports every
finished part through `on_part_done` so a later run can resume. It never gives a blob its final name:
that belongs to the orchestration (`agent.finish`), whichever engine fetched the bytes. Every engine is
built the same way, `from_settings(settings)`, and says whether it can run here with `available()`.

What engines differ in is said by their class attributes, so the orchestration asks instead of guessing:
- `reads_urls`: the engine fetches each job's presigned `url` and needs no credentials (native, python).
  The s5cmd engine does not: it reads `job.key` from the bucket with the credentials of the settings it
  was built from, so no URL is signed for it (`url` is empty);
- `writes_in_place`: parts are written at their offsets into the preallocated file (native, python).
  For the s5cmd engine the orchestration leaves the file empty instead (the disk must not hold each
  blob twice): s5cmd writes the whole object beside it and renames that over `temp_path`, which thus
  holds either an empty file or the complete object;
- `checks_parts`: part digests are checked as the bytes arrive (native, python; s5cmd fetches whole
  objects with no part digests, so the orchestration hashes its blobs whole);
- `hashes_blobs`: the engine computes a job's `whole` digest itself, in the stream, and reports the
  verdict through `TransferHooks.on_verdict` (native); otherwise the orchestration hashes the blob;
- `records_digests`: with `job.record`, the sha256 of every part fetched is reported through
  `TransferHooks.on_digest` (native); repair by agreeing reads does not need it (it hashes the bytes
  each read left on disk, whichever engine wrote them);
- `resumes_in_parts`: a partial part's `kept` bytes are kept rather than fetched again, and progress
  within a part is reported through `TransferHooks.on_written` (native, python).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.errors import ConfigError
from agent.policy import RetryPolicy
from agent.settings import Deadlines, Settings


@dataclass(frozen=True)
class Part:
    """One byte range of a blob. `sha256` is the sidecar's digest of exactly these bytes, when known, and
    `blake3` their BLAKE3 (an engine checks whichever it can; both are bound to the blob alike);
    `kept` leading bytes are on disk from an earlier run (re-checked with the part's digest if any).
    `lead` and `trail`: bytes of the object just before and after the part that its request asks for
    too and the engine discards: a repair's reads of one part then differ in shape (see agent.fetch).
    Such a part is fetched with a request of its own."""

    index: int
    offset: int
    length: int
    sha256: str | None = None
    kept: int = 0
    blake3: str | None = None
    lead: int = 0
    trail: int = 0


@dataclass(frozen=True)
class BlobJob:
    """One blob to fill: where its bytes come from and the parts still missing from `temp_path`."""

    blob_name: str
    key: str
    url: str  # presigned GET: a credential, never logged; empty for an engine that does not read URLs
    size: int
    temp_path: Path
    parts: tuple[Part, ...]
    whole: tuple[str, str] | None = None  # ("sha256" | "git-sha1", hex) for engines that hash blobs
    record: bool = False  # report each fetched part's sha256 (repair by agreeing reads)


@dataclass(frozen=True)
class TransferConfig:
    """Everything that bounds a transfer, validated once and handed down to the engine (after
    s3transfer's `TransferConfig`): how many streams, how long a request may take (`deadlines`:
    `first_byte` is also the longest silence) and how failures are retried (`retry`).

    The command line builds it from its flags and settings with `sized`; a test passes its own. The
    engines read the retry counts from `retry` only (`sized` copies the settings' `deadlines.retries`
    and `stall_retries` there)."""

    concurrency: int = 8
    deadlines: Deadlines = field(default_factory=Deadlines)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}",
                              hint="see --concurrency")

    @classmethod
    def sized(cls, concurrency: int | None = None, deadlines: Deadlines | None = None) -> TransferConfig:
        """Sized to the machine: 4 connections per core, 8 to 64, unless `concurrency` says otherwise.
        Loopback or a fat NIC both want several streams in flight; memory is bounded by chunk size x
        streams, not by part size. With `deadlines` (the settings'), the retry counts come from them."""
        streams = concurrency or max(8, min(64, 4 * usable_cores()))
        if deadlines is None:
            return cls(streams)
        return cls(streams, deadlines, RetryPolicy.from_deadlines(deadlines))


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 2
    except (AttributeError, OSError):  # not on Linux
        import psutil

        return psutil.cpu_count(logical=True) or 2


ProgressFn = Callable[[int], None]  # bytes newly written since the last call
PartDoneFn = Callable[[BlobJob, Part], None]


@dataclass(frozen=True)
class TransferHooks:
    """What an engine reports beyond finished parts, each where its attributes say it can."""

    on_written: Callable[[BlobJob, Part, int], None] | None = None  # bytes on disk from the part's start
    on_digest: Callable[[BlobJob, Part, str], None] | None = None  # sha256 of a part read with `record`
    on_verdict: Callable[[BlobJob, str | None], None] | None = None  # None: the blob matched `whole`


class Engine(Protocol):
    name: str
    reads_urls: bool
    writes_in_place: bool
    checks_parts: bool
    hashes_blobs: bool
    records_digests: bool
    resumes_in_parts: bool

    @classmethod
    def from_settings(cls, settings: Settings | None) -> Engine:
        """The engine for a pull with these settings (only an engine that reads keys itself uses them)."""
        ...

    @classmethod
    def available(cls) -> bool:
        """Whether the engine can run here (its extension loads, its binary is on PATH)."""
        ...

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        """Fetch every part of every job, or raise an `AgentError` naming what failed."""
        ...
