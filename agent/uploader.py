"""The GPU pod's side of artifact upload: PUT each file of a directory to the presigned URL it was handed.

The pod holds no credentials, only the JSON map `{file: presigned PUT URL}` from
`SimDataStorage.generate_upload_urls`, so this is plain HTTP (urllib3), not the SDK. Each PUT is retried
by the failure policy (`agent.policy`: full-jitter exponential backoff on 408/429/5xx answers and
connection errors); any other 4xx (expired or tampered URL) fails at once. Every URL is a credential:
nothing here prints or returns a query string.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.artifacts import InvalidArtifactRequest, redact_signing_logs, validate_artifact_name
from agent.errors import ConfigError
from agent.policy import RetryPolicy, is_retryable
from agent.redact import redact_url, scrub_queries

if TYPE_CHECKING:  # urllib3 is imported by the functions that upload: other commands never pay for it
    import urllib3

CONTENT_TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8"}
# Five tries per file, waits from 0.5 s: a PUT of a whole file is worth more patience than a part's GET.
UPLOAD_RETRY = RetryPolicy(max_retries=4, base=0.5, cap=10.0)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0  # the server answers a PUT once the whole body is in


def with_attempts(attempts: int) -> RetryPolicy:
    """The upload policy with `attempts` tries per file (`--attempts`)."""
    return replace(UPLOAD_RETRY, max_retries=attempts - 1)


@dataclass
class UploadSummary:
    """What happened to each file of the URL map: uploaded, missing from the directory, or failed (why)."""

    uploaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_uploaded: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "uploaded": self.uploaded, "missing": self.missing, "failed": self.failed,
                "bytes_uploaded": self.bytes_uploaded}


class _Retryable(Exception):
    """One failed try that may succeed on the next (5xx, 429, connection error)."""


class _Fatal(Exception):
    """A failure retrying cannot fix (4xx, unreadable file)."""


def load_url_map(path: Path) -> dict[str, str]:
    """The JSON object `{artifact name: presigned URL}` in `path`, checked: known names, http(s) URLs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the URL map {path}: {exc.strerror or exc}",
                          hint="pass the JSON file the API handed out with --urls") from None
    except ValueError:
        raise ConfigError(f"the URL map {path} is not valid JSON",
                          hint="pass the JSON file the API handed out with --urls") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"the URL map {path} must be a non-empty JSON object {{file: url}}")
    urls: dict[str, str] = {}
    for name, url in data.items():
        validate_artifact_name(name)  # also keeps DIR/<name> inside DIR
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in {"http", "https"} or not parts.netloc:
            raise InvalidArtifactRequest(f"the URL for {name} in {path} is not an http(s) URL",
                                         hint="pass the JSON file the API handed out with --urls")
        urls[name] = url
    return urls


def _put_once(http: urllib3.PoolManager, url: str, path: Path) -> int:
    """One PUT of the whole file; returns its size, or raises _Retryable / _Fatal."""
    import urllib3

    try:
        size = path.stat().st_size
        body = path.open("rb")
    except OSError as exc:
        raise _Fatal(f"cannot read the file: {exc.strerror or type(exc).__name__}") from None
    headers = {"Content-Length": str(size),
               "Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream")}
    try:
        with body:
            response = http.request("PUT", url, body=body, headers=headers, retries=False, redirect=False,
                                    preload_content=True,
                                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT))
    except urllib3.exceptions.HTTPError as exc:  # connection refused/reset, timeouts, TLS
        raise _Retryable(f"connection error: {type(exc).__name__}: {scrub_queries(str(exc))}") from None
    except OSError as exc:
        raise _Fatal(f"reading the file failed: {exc.strerror or type(exc).__name__}") from None
    if 200 <= response.status < 300:
        return size
    reason = f"HTTP {response.status}{_s3_error_code(response.data)}"
    if is_retryable(response.status):
        raise _Retryable(reason)
    raise _Fatal(reason)


def _s3_error_code(body: bytes) -> str:
    """` (SignatureDoesNotMatch)` from an S3 XML error body, or ''."""
    match = re.search(rb"<Code>([A-Za-z0-9]{1,64})</Code>", body[:4096])
    return f" ({match.group(1).decode()})" if match else ""


def upload_file(http: urllib3.PoolManager, url: str, path: Path, *, policy: RetryPolicy,
                sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> int:
    """PUT `path` to `url`, retrying transient failures; bytes sent, or RuntimeError(reason)."""
    rng = rng or random.Random()
    last = ""
    for attempt in range(policy.attempts):
        if attempt:
            sleep(policy.delay(attempt - 1, rng))
        try:
            return _put_once(http, url, path)
        except _Retryable as exc:
            last = str(exc)
        except _Fatal as exc:
            raise RuntimeError(str(exc)) from None
    raise RuntimeError(f"{last} (after {policy.attempts} attempts)")


EventFn = Callable[[str, str, Mapping[str, Any]], None]  # (event name, message, fields)


def upload_artifacts(directory: Path, urls: Mapping[str, str], *, http: urllib3.PoolManager | None = None,
                     policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                     on_event: EventFn | None = None) -> UploadSummary:
    """Upload every file of `urls` found in `directory`; never raises for one file's failure."""
    import urllib3

    redact_signing_logs()  # urllib3 logs request lines, query string included, at DEBUG
    http = http or urllib3.PoolManager(num_pools=2, maxsize=2)
    policy = policy or UPLOAD_RETRY
    summary = UploadSummary()

    def emit(name: str, message: str, **fields: Any) -> None:
        if on_event is not None:
            on_event(name, message, fields)

    for name, url in urls.items():
        path = directory / validate_artifact_name(name)
        if not path.is_file():
            summary.missing.append(name)
            emit("upload_missing", f"{name}: not in {directory}, skipped", file=name)
            continue
        try:
            sent = upload_file(http, url, path, policy=policy, sleep=sleep)
        except RuntimeError as exc:
            summary.failed[name] = str(exc)
            emit("upload_failed", f"{name}: upload failed: {exc}", file=name, url=redact_url(url))
            continue
        summary.uploaded.append(name)
        summary.bytes_uploaded += sent
        emit("uploaded", f"{name}: uploaded {sent} bytes", file=name, bytes=sent, url=redact_url(url))
    return summary
