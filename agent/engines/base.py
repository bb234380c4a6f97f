"""What every engine receives and must do: fetch byte ranges of objects into temporary files.

The orchestration (`agent.pull`) plans which parts of which blobs are still missing, signs one GET URL per
blob, preallocates each temporary file, and hands the engine a list of `BlobJob`s. The engine writes each
part at its offset, checks the part's sha256 when the sidecar gives one, and reports every finished part
through `on_part_done` so a later run can resume. It never renames a file: verification and the final
name belong to the orchestration, the same whichever engine fetched the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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
    """Transfer limits, sized to the machine by `agent.plan.size_limits`."""

    concurrency: int = 8
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_retries: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 10.0


ProgressFn = Callable[[int], None]  # bytes newly written since the last call
PartDoneFn = Callable[[BlobJob, Part], None]


class Engine(Protocol):
    name: str

    def fetch(self, jobs: Sequence[BlobJob], limits: Limits, progress: ProgressFn,
              on_part_done: PartDoneFn) -> None:
        """Fetch every part of every job, or raise an `AgentError` naming what failed."""
        ...
