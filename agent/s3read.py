"""The read side of S3 that a pull needs, without botocore: list, get small objects, presign GETs.

A pull's control plane is one listing and a few small GETs, but importing botocore and building a client
costs 0.2-0.3 s before the first of them is sent: more than the whole pull of a small model. With the native
extension, SigV4 presigning and ListObjectsV2 parsing come from rusty-s3 (sans-IO, in Rust) and the few
requests go over `http.client`; without it, the boto3 `Store` serves through the same `ObjectReader`
interface. Failures map to the same `AgentError`s as the Store's, and no message carries a query string.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol
from urllib.parse import urlsplit

from agent.errors import AgentError, ConfigError, CredentialsError, NotFoundError, StorageUnavailableError
from agent.retry import backoff_delay, parse_retry_after
from agent.settings import Settings

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
ATTEMPTS = 4
METADATA_LIMIT = 64 << 20
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_CREDENTIAL_CODES = {b"AccessDenied", b"InvalidAccessKeyId", b"SignatureDoesNotMatch", b"InvalidToken"}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""


class ObjectReader(Protocol):
    """What reading a staged model takes: the boto3 `Store` and `NativeReader` both provide it."""

    bucket: str

    def check_bucket(self) -> None: ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def list_prefixes(self, prefix: str) -> list[str]: ...

    def get_bytes(self, key: str, *, limit: int = METADATA_LIMIT) -> bytes: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]: ...

    def presign(self, key: str, *, expires: int = 3600) -> str: ...


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


class _Retry(Exception):
    def __init__(self, error: AgentError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class NativeReader:
    """One bucket, read with URLs signed by the native extension and sent with `http.client`."""

    def __init__(self, settings: Settings, native: ModuleType) -> None:
        require_credentials(settings)
        self.native = native
        self.bucket = settings.bucket
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
        while True:
            url = self.native.presign_list(self.target, prefix, delimiter=delimiter, continuation=token)
            body = self._get(url, f"listing {prefix!r}", METADATA_LIMIT)
            try:
                objects, prefixes, token = self.native.parse_list(body.decode("utf-8", "replace"))
            except ValueError as exc:
                raise StorageUnavailableError(f"listing {prefix!r}: {exc}") from None
            yield [ObjectInfo(key, size, etag) for key, size, etag in objects], prefixes
            if not token:
                return

    def get_bytes(self, key: str, *, limit: int = METADATA_LIMIT) -> bytes:
        return self._get(self.presign(key, expires=300), key, limit)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Several small objects at once: one round trip of latency instead of one per object."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) < 2:
            return {key: self.get_bytes(key) for key in wanted}
        with ThreadPoolExecutor(len(wanted), thread_name_prefix="metadata") as pool:
            return dict(zip(wanted, pool.map(self.get_bytes, wanted), strict=True))

    def _get(self, url: str, what: str, limit: int) -> bytes:
        for attempt in range(ATTEMPTS):
            try:
                return _get_once(url, what, limit)
            except _Retry as retry:
                if attempt == ATTEMPTS - 1:
                    raise retry.error from None
                time.sleep(backoff_delay(attempt, 0.2, 2.0, retry.retry_after))
        raise AssertionError("unreachable")


def _get_once(url: str, what: str, limit: int) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.netloc, timeout=CONNECT_TIMEOUT)
    try:
        connection.connect()
        if connection.sock is not None:
            connection.sock.settimeout(READ_TIMEOUT)
        connection.request("GET", target)
        response = connection.getresponse()
        declared = int(response.getheader("Content-Length") or 0)
        if response.status == 200 and declared > limit:
            raise ConfigError(f"{what}: {declared} bytes is too large for metadata")
        body = response.read(limit + 1)
        if response.status == 200:
            if len(body) > limit:
                raise ConfigError(f"{what}: more than {limit} bytes is too large for metadata")
            _check_etag(body, response.getheader("ETag"), what)
            return body
        raise _status_error(response.status, body, response.getheader("Retry-After"), what)
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(StorageUnavailableError(
            f"{what}: cannot connect to the object storage endpoint ({type(exc).__name__})")) from None
    finally:
        connection.close()


def _check_etag(body: bytes, etag: str | None, what: str) -> None:
    """A single-part object's ETag is the MD5 of its bytes: a body damaged in transit is read again
    (botocore's response checksums do the same for the Store)."""
    tag = (etag or "").strip('"')
    if _MD5_ETAG.match(tag) and hashlib.md5(body, usedforsecurity=False).hexdigest() != tag:
        damaged = StorageUnavailableError(f"{what}: the body does not match its ETag (damaged on the way)")
        raise _Retry(damaged)


def _status_error(status: int, body: bytes, retry_after: str | None, what: str) -> Exception:
    """The AgentError an error answer means (as `Store` maps botocore's), or a retry of it."""
    match = _ERROR_CODE.search(body)
    code = match.group(1) if match else b""
    shown = code.decode("ascii", "replace") or str(status)
    if code == b"NoSuchBucket":
        return ConfigError(f"{what}: the bucket does not exist", hint="check MINIO_BUCKET")
    if status == 404:
        return NotFoundError(f"{what}: not found")
    if status in (401, 403) or code in _CREDENTIAL_CODES:
        return CredentialsError(f"{what}: access denied by the server ({shown})")
    error = StorageUnavailableError(f"{what}: server answered {shown}")
    if status >= 500 or status in (408, 429):
        return _Retry(error, parse_retry_after(retry_after))
    return error


def open_reader(settings: Settings) -> ObjectReader:
    """The native reader when the extension can sign, else the boto3 Store (imported only then)."""
    settings.require_storage()
    try:
        from agent import _native
    except ImportError:
        _native = None  # type: ignore[assignment]
    if _native is not None and hasattr(_native, "presign_get"):
        return NativeReader(settings, _native)
    from agent.store import Store

    return Store(settings)
