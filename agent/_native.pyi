"""Typed stub of the compiled extension `agent._native` (see native/src)."""

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Required, TypedDict

__all__ = [
    "CertificateError",
    "DigestMismatchError",
    "FetchError",
    "FileWriteError",
    "HttpStatusError",
    "TransferError",
    "fetch",
    "get_small",
    "parse_list",
    "presign_get",
    "presign_list",
    "retry_defaults",
    "retryable_statuses",
    "version",
]

# The shapes `fetch` takes and returns (plain dicts at runtime; these names exist only for type checking).

class _JobSpec(TypedDict, total=False):
    """One blob: `parts` holds (index, offset, length, digest hex or None[, kept bytes[, lead, trail]]);
    `index` is echoed back; `lead` / `trail` bytes around a part are requested with it and discarded.
    `part_digest` names the parts' digest, "sha256" (default) or "blake3". `whole` is
    ("sha256" | "git-sha1", hex) the blob must hash to; `record` asks for the sha256 of each part fetched
    without a digest of its own."""

    url: Required[str]
    headers: Required[Mapping[str, str] | None]
    path: Required[str | PathLike[str]]
    size: Required[int]
    parts: Required[Sequence[tuple[int, int, int, str | None] | tuple[int, int, int, str | None, int]
                             | tuple[int, int, int, str | None, int, int, int]]]
    part_digest: str
    whole: tuple[str, str] | None
    record: bool

class _News(TypedDict):
    written: list[tuple[int, int, int]]
    digests: list[tuple[int, int, str]]
    verdicts: list[tuple[int, bool, str]]

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
class CertificateError(FetchError): ...

class FileWriteError(FetchError):
    errno: int | None

class _Target(TypedDict):
    """One bucket on one endpoint, path-style; no keys: unsigned (anonymous) URLs."""

    endpoint: str
    region: str
    bucket: str
    access_key: str | None
    secret_key: str | None

def version() -> str: ...
def retryable_statuses() -> list[int]: ...
def retry_defaults() -> tuple[int, float, float]: ...
def presign_get(target: _Target, key: str, expires: int) -> str: ...
def presign_list(
    target: _Target,
    prefix: str,
    *,
    delimiter: str | None = None,
    continuation: str | None = None,
    expires: int = 300,
) -> str: ...
def get_small(
    urls: Sequence[str],
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    min_rate: float = 0.0,
    rate_window: float = 20.0,
    limit: int = 67108864,
    ca_file: str | PathLike[str] | None = None,
    ca_dir: str | PathLike[str] | None = None,
) -> list[tuple[int, str | None, str | None, bytes, str | None]]: ...
def parse_list(body: str) -> tuple[list[tuple[str, int, str]], list[str], str | None]: ...
def fetch(
    jobs: Sequence[_JobSpec],
    *,
    concurrency: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    max_retries: int = ...,  # the failure policy's defaults: see retry_defaults()
    backoff_base: float = ...,
    backoff_max: float = ...,
    progress: Callable[[int, list[tuple[int, int]]], object] | None = None,
    progress_interval: float = 0.1,
    report: Callable[[_News], object] | None = None,
    min_rate: float = 0.0,
    rate_window: float = 20.0,
    stall_retries: int | None = None,
    ca_file: str | PathLike[str] | None = None,
    ca_dir: str | PathLike[str] | None = None,
) -> _FetchStats: ...
