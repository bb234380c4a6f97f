"""S3 access behind a narrow interface: list, head, get/put small objects, upload files, presign.

boto3 does the signing (SigV4, path-style, as MinIO expects). Every botocore failure is turned into an
`AgentError` here, so callers never see a traceback and no message ever carries a credential.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig as UploadConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import SSLError as BotoSSLError

from agent.errors import (
    AgentError,
    ConfigError,
    CredentialsError,
    NotFoundError,
    StorageUnavailableError,
    is_certificate_failure,
    untrusted_certificate,
)
from agent.policy import RetryPolicy, error_for_status
from agent.redact import SIGNING_LOGGERS, RedactSignatures, redact_signing_logs, redact_url, scrub_queries
from agent.s3read import ObjectInfo, require_credentials
from agent.settings import Settings, Trust
from agent.transport import DeadlineSender

__all__ = ["SIGNING_LOGGERS", "ObjectInfo", "RedactSignatures", "Store", "redact_signing_logs", "redact_url",
           "require_credentials", "scrub_queries", "translate"]

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

# Multipart above 64 MiB, in 64 MiB parts: few requests for multi-GiB shards, bounded memory.
UPLOAD_CONFIG = UploadConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
# A body that breaks or fails its checksum while being read, which botocore does not retry (it retries
# sending the request): the whole GET again, a few times, quickly.
BODY_RETRY = RetryPolicy(max_retries=3, base=0.2, cap=2.0)


def build_client(settings: Settings, *, max_pool: int = 16, retries: int | None = None) -> S3Client:
    endpoint = settings.require_storage()
    require_credentials(settings)
    redact_signing_logs()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        # botocore is the one retry layer of every request it sends (the policy's count, its backoff)
        retries={"total_max_attempts": 1 + (RetryPolicy.from_deadlines(settings.deadlines).max_retries
                                            if retries is None else retries), "mode": "standard"},
        connect_timeout=settings.deadlines.connect,
        read_timeout=30,  # botocore's own sending is left to uploads; metadata goes via DeadlineSender
        max_pool_connections=max_pool,
    )
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        region_name=settings.region,
        config=config,
        verify=settings.trust.boto_verify(),  # the agent's one rule of trust, not botocore's own search
    )
    if settings.trust.ca_dir is not None:
        _trust_folder(client._endpoint.http_session, settings.trust)  # type: ignore[attr-defined]
    DeadlineSender.install(client, endpoint, settings.deadlines, maxsize=max_pool, trust=settings.trust)
    return client


def _trust_folder(session: Any, trust: Trust) -> None:
    """botocore's `verify=` names one PEM file; SSL_CERT_DIR's folder is set on each of its connection
    pools beside it (what botocore's own sender sends: uploads), as urllib3 takes it (`ca_cert_dir`)."""
    setup = session._setup_ssl_cert

    def with_folder(conn: Any, url: str, verify: Any) -> None:
        setup(conn, url, verify)
        if url.lower().startswith("https"):
            conn.ca_certs = str(trust.ca_file) if trust.ca_file is not None else None
            conn.ca_cert_dir = str(trust.ca_dir)

    session._setup_ssl_cert = with_folder


def translate(exc: Exception, what: str, trust: Trust | None = None) -> AgentError:
    """Map a botocore failure to the agent's error with the right exit code; no secret in the text."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, BotoSSLError) and is_certificate_failure(str(exc)):
        return untrusted_certificate(what, str(exc), (trust or Trust()).source)
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        # botocore names a bodyless answer (HEAD) by its status: "404" is a status, not an S3 code
        return error_for_status(status, what, code="" if code == str(status) else code)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return CredentialsError(f"{what}: no credentials to sign with ({type(exc).__name__})")
    if isinstance(exc, EndpointConnectionError):
        return StorageUnavailableError(f"{what}: cannot connect to the object storage endpoint")
    if isinstance(exc, BotoCoreError):
        return StorageUnavailableError(f"{what}: {type(exc).__name__}")
    return StorageUnavailableError(f"{what}: {type(exc).__name__}: {exc}")


class Store:
    """One bucket on one endpoint. Keys are full object keys (`models/hf-cache/...`)."""

    body_retry = BODY_RETRY

    def __init__(self, settings: Settings, client: S3Client | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client if client is not None else build_client(settings)

    def _translate(self, exc: Exception, what: str) -> AgentError:
        return translate(exc, what, self.settings.trust)

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, what) from None

    def check_bucket(self) -> None:
        self._call(f"bucket {self.bucket!r}", self.client.head_bucket, Bucket=self.bucket)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, following pagination."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"listing {prefix!r}") from None

    def list_prefixes(self, prefix: str) -> list[str]:
        """The immediate 'folders' under `prefix` (S3 common prefixes)."""
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[str] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                found.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"listing {prefix!r}") from None
        return found

    def _head_object(self, key: str) -> Any:
        """HEAD's response, or None when the object does not exist."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            err = self._translate(exc, key)
            if isinstance(err, NotFoundError):
                return None
            raise err from None
        except BotoCoreError as exc:
            raise self._translate(exc, key) from None

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag, or None when it does not exist."""
        meta = self._head_object(key)
        if meta is None:
            return None
        return ObjectInfo(key, int(meta["ContentLength"]), str(meta.get("ETag", "")).strip('"'))

    def head_metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata plus its `content-length`, or None when it does not exist."""
        meta = self._head_object(key)
        if meta is None:
            return None
        metadata: dict[str, str] = meta.get("Metadata", {})
        metadata["content-length"] = str(meta["ContentLength"])
        return metadata

    def get_bytes(self, key: str, *, limit: int = 64 << 20) -> bytes:
        """A small object's bytes (manifests, refs); refuses anything over `limit`.

        botocore retries a failed request but not a body that breaks or fails its checksum while being
        read; one such blip on the manifest must not send a pod to the Hub, so the whole GET is retried
        then, and only then (a request botocore gave up on is not sent again)."""
        for attempt in range(BODY_RETRY.attempts):
            response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=key)
            if int(response["ContentLength"]) > limit:
                raise ConfigError(f"{key}: {response['ContentLength']} bytes is too large for metadata")
            try:
                data: bytes = response["Body"].read()
                return data
            except (BotoCoreError, OSError) as exc:
                if BODY_RETRY.gives_up(attempt):
                    raise self._translate(exc, key) from None
                time.sleep(BODY_RETRY.delay(attempt))
        raise AssertionError("unreachable")

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Several small objects at once (the client is thread-safe)."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) < 2:
            return {key: self.get_bytes(key) for key in wanted}
        with ThreadPoolExecutor(len(wanted), thread_name_prefix="metadata") as pool:
            return dict(zip(wanted, pool.map(self.get_bytes, wanted), strict=True))

    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data,
                   Metadata=metadata or {}, ContentType=content_type)

    def upload_file(self, path: Path, key: str, *, metadata: dict[str, str] | None = None,
                    callback: Callable[[int], None] | None = None) -> None:
        """Upload a file, multipart when large (s3transfer)."""
        try:
            self.client.upload_file(str(path), self.bucket, key, Config=UPLOAD_CONFIG,
                                    ExtraArgs={"Metadata": metadata or {}}, Callback=callback)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from None
        except Exception as exc:  # s3transfer wraps failures in its own types
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                raise self._translate(cause, key) from None
            raise self._translate(exc, key) from None

    def presign(self, key: str, *, method: str = "get_object", expires: int = 3600) -> str:
        """A presigned URL. Its query string is a credential: never log it."""
        params = {"Bucket": self.bucket, "Key": key}
        try:
            url: str = self.client.generate_presigned_url(method, Params=params, ExpiresIn=expires)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from None
        return url

