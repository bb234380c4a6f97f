"""What every engine receives and must do: fetch byte ranges of objects into temporary files.

The orchestration (`agent.pull`) plans which parts of which blobs are still missing, signs one GET URL per
blob, preallocates each temporary file, and hands the engine a list of `BlobJob`s. The engine writes each
part at its offset, checks the part's sha256 when the sidecar gives one, and reports every finished part
through `on_part_done` so a later run can resume. It never renames a file: verification and the final
name belong to the orchestration, the same whichever engine fetched the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from agent.settings import Deadlines

_D = Deadlines()


@dataclass(frozen=True)
class Part:
    """One byte range of a blob. `sha256` is the sidecar's digest of exactly these bytes, when known."""

    index: int
    offset: int
    length: int
    sha256: str | None = None


@dataclass(frozen=True)
class BlobJob:
    """One blob to fill: where its bytes come from and the parts still missing from `temp_path`."""

    blob_name: str
    key: str
    url: str  # presigned GET: a credential, never logged
    size: int
    temp_path: Path
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Limits:
    """Transfer limits, sized to the machine by `agent.plan.size_limits`; the deadlines come from
    `agent.settings.Deadlines` (`read_timeout` is its first-byte deadline, also the longest silence)."""

    concurrency: int = 8
    connect_timeout: float = _D.connect
    read_timeout: float = _D.first_byte
    max_retries: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    min_rate: float = _D.min_rate  # bytes/s over each `rate_window`; 0: off
    rate_window: float = _D.rate_window
    stall_retries: int = _D.stall_retries  # retries of a part that got no usable answer

    def with_deadlines(self, deadlines: Deadlines) -> Limits:
        return replace(self, connect_timeout=deadlines.connect, read_timeout=deadlines.first_byte,
                       min_rate=deadlines.min_rate, rate_window=deadlines.rate_window,
                       stall_retries=deadlines.stall_retries, max_retries=deadlines.retries)


ProgressFn = Callable[[int], None]  # bytes newly written since the last call
PartDoneFn = Callable[[BlobJob, Part], None]


class Engine(Protocol):
    name: str

    def fetch(self, jobs: Sequence[BlobJob], limits: Limits, progress: ProgressFn,
              on_part_done: PartDoneFn) -> None:
        """Fetch every part of every job, or raise an `AgentError` naming what failed."""
        ...
