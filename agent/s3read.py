"""The read side of S3 that a pull needs, without botocore: list, get small objects, presign GETs.

A pull's control plane is one listing and a few small GETs, but importing botocore and building a client
costs 0.2-0.3 s before the first of them is sent: more than the whole pull of a small model. With the native
extension, SigV4 presigning and ListObjectsV2 parsing come from rusty-s3 (sans-IO, in Rust) and the few
requests are sent together by the extension's HTTP client; without it, the boto3 `Store` serves through
the same `ObjectReader` interface. Failures map to the same `AgentError`s as the Store's, and no message
carries a query string.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol, TypeVar

from agent.errors import (
    AgentError,
    ConfigError,
    CredentialsError,
    StorageUnavailableError,
    untrusted_certificate,
)
from agent.policy import RetryPolicy, error_for_status, is_retryable, parse_retry_after
from agent.settings import Settings

METADATA_LIMIT = 64 << 20
T = TypeVar("T")
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""


class ObjectReader(Protocol):
    """What reading a staged model takes: the boto3 `Store` and `NativeReader` both provide it."""

    bucket: str
    body_retry: RetryPolicy  # how a body that broke, failed its checksum or does not parse is read again

    def check_bucket(self) -> None: ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def list_prefixes(self, prefix: str) -> list[str]: ...

    def get_bytes(self, key: str, *, limit: int = METADATA_LIMIT) -> bytes: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]: ...

    def presign(self, key: str, *, expires: int = 3600) -> str: ...


class ObjectStore(ObjectReader, Protocol):
    """What staging also needs, reading and writing: the boto3 `Store` provides it (and the tests'
    in-memory `FakeStore`)."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def head_metadata(self, key: str) -> dict[str, str] | None: ...

    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None: ...

    def upload_file(self, path: Path, key: str, *, metadata: dict[str, str] | None = None,
                    callback: Callable[[int], None] | None = None) -> None: ...


def require_credentials(settings: Settings) -> None:
    """Both keys, before any request: without them botocore searches ~/.aws and the instance metadata
    service, then fails with NoCredentialsError, which would read as a server problem."""
    missing = [name for name, value in (("MINIO_ACCESS_KEY", settings.access_key),
                                        ("MINIO_SECRET_KEY", settings.secret_key)) if not value]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise CredentialsError(f"{' / '.join(missing)} {verb} not set",
                               hint="set both for the bucket at MINIO_ENDPOINT, or unset MINIO_ENDPOINT "
                                    "to turn object storage off")


def parsed_or_read_again(body: bytes, read: Callable[[], bytes], parse: Callable[[bytes], T],
                         policy: RetryPolicy) -> T:
    """`parse(body)`; while it raises, the object is read again under `policy`, as a broken body is.

    A metadata answer can arrive well framed and still cut short or damaged (a listing has no checksum,
    and not every object's ETag is an MD5): the bytes are the only sign, and one bad answer is a
    transient fault. The same bytes read twice are the object itself, not the way: its error then,
    without waiting out the retries (a malformed manifest still ends at once)."""
    for attempt in range(policy.attempts):
        try:
            return parse(body)
        except AgentError:
            if policy.gives_up(attempt):
                raise
            time.sleep(policy.delay(attempt))
            again = read()
            if again == body:
                raise
            body = again
    raise AssertionError("unreachable")


class _Retry(Exception):
    """A failure worth another try; `stalled`: no usable answer (those get only `stall_retries`)."""

    def __init__(self, error: AgentError, retry_after: float | None = None, *, stalled: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.stalled = stalled


class NativeReader:
    """One bucket, read with URLs signed by the native extension and sent with `http.client`."""

    def __init__(self, settings: Settings, native: ModuleType) -> None:
        require_credentials(settings)
        self.native = native
        self.deadlines = settings.deadlines
        self.retry = RetryPolicy.from_deadlines(settings.deadlines)
        self.body_retry = self.retry  # a body that does not parse is retried as one that broke
        self.bucket = settings.bucket
        self.trust = settings.trust
        self.endpoint = settings.require_storage()
        self.target = {"endpoint": settings.require_storage(), "region": settings.region,
                       "bucket": settings.bucket, "access_key": settings.access_key,
                       "secret_key": settings.secret_key}

    def presign(self, key: str, *, expires: int = 3600) -> str:
        url: str = self.native.presign_get(self.target, key, expires)
        return url

    def check_bucket(self) -> None:
        """A clear error now (missing bucket, refused keys, no server) rather than mid-command."""
        next(self._pages("", "/"), None)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for objects, _ in self._pages(prefix, None):
            yield from objects

    def list_prefixes(self, prefix: str) -> list[str]:
        return [p for _, prefixes in self._pages(prefix, "/") for p in prefixes]

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[tuple[list[ObjectInfo], list[str]]]:
        token: str | None = None
        what = f"listing {prefix!r}"
        while True:
            url = self.native.presign_list(self.target, prefix, delimiter=delimiter, continuation=token)
            read = functools.partial(self._get, url, what, METADATA_LIMIT)
            objects, prefixes, token = parsed_or_read_again(read(), read, functools.partial(self._page, what),
                                                            self.body_retry)
            yield [ObjectInfo(key, size, etag) for key, size, etag in objects], prefixes
            if not token:
                return

    def _page(self, what: str, body: bytes) -> tuple[list[tuple[str, int, str]], list[str], str | None]:
        try:
            page: tuple[list[tuple[str, int, str]], list[str], str | None] = self.native.parse_list(
                body.decode("utf-8", "replace"))
        except ValueError as exc:
            raise StorageUnavailableError(f"{what}: {exc}") from None
        return page

    def get_bytes(self, key: str, *, limit: int = METADATA_LIMIT) -> bytes:
        return self._get_all([(self.presign(key, expires=300), key)], limit)[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Several small objects at once: one round trip of latency instead of one per object."""
        wanted = list(dict.fromkeys(keys))
        bodies = self._get_all([(self.presign(key, expires=300), key) for key in wanted], METADATA_LIMIT)
        return dict(zip(wanted, bodies, strict=True))

    def _get(self, url: str, what: str, limit: int) -> bytes:
        return self._get_all([(url, what)], limit)[0]

    def _get_all(self, requests: list[tuple[str, str]], limit: int) -> list[bytes]:
        """GET (url, what) pairs at once in the native extension, under the pull's deadlines. A request
        that got no usable answer is retried `stall_retries` times, any other transient failure
        `max_retries` times (the policy every engine follows), with backoff, for the requests that had one."""
        bodies: dict[int, bytes] = {}
        pending = list(range(len(requests)))
        stalls = dict.fromkeys(pending, 0)
        d, policy = self.deadlines, self.retry
        for attempt in range(policy.attempts):
            answers = self.native.get_small([requests[i][0] for i in pending], connect_timeout=d.connect,
                                            read_timeout=d.first_byte, min_rate=d.min_rate,
                                            rate_window=d.rate_window, limit=limit,
                                            ca_file=self.trust.ca_file, ca_dir=self.trust.ca_dir)
            again: list[int] = []
            waits: list[float] = []
            for i, answer in zip(pending, answers, strict=True):
                try:
                    bodies[i] = _judge(answer, requests[i][1], self.trust.source, self.endpoint)
                except _Retry as retry:
                    stalls[i] += retry.stalled
                    if stalls[i] > policy.stall_retries:
                        tries = policy.stall_retries + 1
                        raise StorageUnavailableError(f"{retry.error} on {tries} tries in a row: the object "
                                                      "storage stalled") from None
                    if policy.gives_up(attempt):
                        raise retry.error from None
                    again.append(i)
                    waits.append(retry.retry_after or 0.0)
            if not again:
                break
            pending = again
            time.sleep(policy.delay(attempt, retry_after=max(waits) or None))
        return [bodies[i] for i in range(len(requests))]


def _judge(answer: tuple[int, str | None, str | None, bytes, str | None], what: str,
           trust_source: str = "the system store", endpoint: str = "") -> bytes:
    """One answer of `get_small` as the body, an AgentError, or a retry."""
    status, etag, retry_after, body, error = answer
    if error == "too large":
        raise ConfigError(f"{what}: too large for metadata")
    if error is not None:
        kind, _, why = error.partition(": ")
        if kind == "untrusted":  # a person must give trust: no retry, no stall count
            raise untrusted_certificate(f"{what} at {endpoint}" if endpoint else what, why, trust_source)
        raise _Retry(StorageUnavailableError(f"{what}: {why[:200]}"), stalled=kind == "stalled")
    if status == 200:
        _check_etag(body, etag, what)
        return body
    raise _status_error(status, body, retry_after, what)


def _check_etag(body: bytes, etag: str | None, what: str) -> None:
    """A single-part object's ETag is the MD5 of its bytes: a body damaged in transit is read again
    (botocore's response checksums do the same for the Store)."""
    tag = (etag or "").strip('"')
    if _MD5_ETAG.match(tag) and hashlib.md5(body, usedforsecurity=False).hexdigest() != tag:
        damaged = StorageUnavailableError(f"{what}: the body does not match its ETag (damaged on the way)")
        raise _Retry(damaged)


def _status_error(status: int, body: bytes, retry_after: str | None, what: str) -> Exception:
    """The AgentError an error answer means (the policy's map, as for the `Store`), or a retry of it."""
    match = _ERROR_CODE.search(body)
    code = match.group(1).decode("ascii", "replace") if match else ""
    error = error_for_status(status, what, code=code)
    if is_retryable(status) and isinstance(error, StorageUnavailableError):  # a code can say "never again"
        return _Retry(error, parse_retry_after(retry_after))
    return error


def open_reader(settings: Settings) -> ObjectReader:
    """The native reader when the extension can sign, else the boto3 Store (imported only then)."""
    settings.require_storage()
    try:
        from agent import _native
    except ImportError:
        _native = None  # type: ignore[assignment]
    if _native is not None and hasattr(_native, "get_small"):
        return NativeReader(settings, _native)
    from agent.store import Store

    return Store(settings)
