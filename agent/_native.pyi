"""Typed stub of the compiled extension `agent._native` (see native/src)."""

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import TypedDict

__all__ = [
    "DigestMismatchError",
    "FetchError",
    "FileWriteError",
    "HttpStatusError",
    "TransferError",
    "fetch",
    "version",
]

# The shapes `fetch` takes and returns (plain dicts at runtime; these names exist only for type checking).

class _JobSpec(TypedDict):
    """One blob: `parts` holds (index, offset, length, sha256 hex or None); `index` is echoed back."""

    url: str
    headers: Mapping[str, str] | None
    path: str | PathLike[str]
    size: int
    parts: Sequence[tuple[int, int, int, str | None]]

class _FetchStats(TypedDict):
    bytes: int
    retries: int
    parts: int

class FetchError(Exception):
    path: str
    offset: int
    length: int
    job_index: int
    part_index: int
    attempts: int

class HttpStatusError(FetchError):
    status: int

class DigestMismatchError(FetchError):
    expected: str
    actual: str

class TransferError(FetchError): ...

class FileWriteError(FetchError):
    errno: int | None

def version() -> str: ...
def fetch(
    jobs: Sequence[_JobSpec],
    *,
    concurrency: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    max_retries: int = 5,
    backoff_base: float = 0.2,
    backoff_max: float = 10.0,
    progress: Callable[[int, list[tuple[int, int]]], object] | None = None,
    progress_interval: float = 0.1,
    min_rate: float = 0.0,
    rate_window: float = 20.0,
    stall_retries: int | None = None,
) -> _FetchStats: ...
