"""The SimSwarm API's artifact presigning module (README "Artifact presigning"): `SimDataStorage` and
`SIM_DATA_FILES`.

Each simulation job owns the prefix `sim-data/<job_id>/` of the bucket. At job creation the API hands the
GPU pod one presigned PUT URL per artifact (14 hours, long enough for the longest run); the browser gets
presigned GET URLs (1 hour) once the job's `sim_data_available` flag is set; the off-pod report task reads
artifacts and writes `report.md` with the SDK. With `MINIO_ENDPOINT` unset the whole module is a no-op:
the URL generators return None and the API answers `storage_not_configured()`.

Reverse proxy and the Host header
---------------------------------
SigV4 signs the Host header and the path, so a presigned URL only verifies when the server sees the same
Host and path that were signed. We **sign against the internal endpoint** (`MINIO_ENDPOINT`) and then
rewrite the URL's origin to `MINIO_PROXY_BASE`; the proxy must forward with

    location / {                                  # or a prefix, see below
        proxy_pass http://<internal host:port>;   # no URI part: the request URI is passed byte for byte
        proxy_set_header Host <proxy_host_header(settings)>;   # e.g. minio:9000, exactly as signed
    }

and must not add X-Forwarded-Host / X-Forwarded-Port (SeaweedFS, for one, verifies against them).

Why this way round rather than signing for the public host and passing `Host $http_host` through:
- the proxy is a pure transport: the server verifies exactly the request the SDK signed, whatever the
  public name, scheme or port (an https proxy in front of plain-http MinIO, the mixed-content case);
- it works when the proxy base carries a path prefix (`https://app.example.com/minio`), which a signature
  over the public host cannot survive (the prefix would be in the signed path but stripped by the proxy);
- one signing client serves both the pod's upload URLs (direct, internal) and the browser's download URLs,
  and the rewrite is a pure string function (`rewrite_to_proxy`) that unit tests can pin down;
- it does not depend on how a given S3 server treats X-Forwarded-* headers.
The cost: the proxy's configuration names the internal host:port (botocore leaves out :80 / :443).
With a prefix, strip it from the *raw* URI so percent-encoded keys are not re-encoded:

    map $request_uri $s3_uri { "~^/minio(?<rest>/.*)$" $rest; default /; }
    location /minio/ { proxy_pass http://minio:9000$s3_uri; proxy_set_header Host minio:9000; }

Also: `client_max_body_size 0` if upload URLs go through the proxy (`via_proxy=True`), and an access-log
format without the query string (`$request` holds the signature). Both forms, and the `$http_host`
mistake (403 SignatureDoesNotMatch), are proven with a real nginx in
tests/integration/test_artifacts_proxy.py.

A presigned URL's query string is a credential: this module logs only `redact_url(url)`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from agent.errors import ConfigError, NotFoundError, UsageError, VerificationError
from agent.redact import redact_signing_logs, redact_url

if TYPE_CHECKING:
    from agent.store import Store
from agent.settings import SIM_DATA_PREFIX, Settings

log = logging.getLogger(__name__)

# The one list of per-job artifacts the GPU pod uploads (the storage page's table, in its order).
SIM_DATA_FILES: Final[tuple[str, ...]] = (
    "market_curves.json",
    "agent_trajectories.json",
    "engagement_summary.json",
    "top_posts.json",
    "posts.json",
    "trades.json",
    "social_graph.json",
    "profiles.json",
    "chat_log.json",
    "relations.json",
)
REPORT_FILE: Final = "report.md"  # written after the sim by the report task (`put_report_md`)
ARTIFACT_NAMES: Final[frozenset[str]] = frozenset((*SIM_DATA_FILES, REPORT_FILE))
REPORT_CONTENT_TYPE: Final = "text/markdown; charset=utf-8"

UPLOAD_EXPIRES: Final = 14 * 3600  # the pod uploads at the end of a long run
DOWNLOAD_EXPIRES: Final = 3600
MIN_EXPIRES: Final = 1
MAX_EXPIRES: Final = 7 * 24 * 3600  # SigV4's limit for presigned URLs
MAX_NAME_LENGTH: Final = 128
ARTIFACT_MAX_BYTES: Final = 1 << 30  # fetch_artifact reads into memory; refuse anything absurd

NOT_CONFIGURED_STATUS: Final = 404
NOT_CONFIGURED_DETAIL: Final = "Object storage not configured"


class InvalidArtifactRequest(UsageError, ValueError):
    """A job id, artifact name or expiry that is refused before anything is signed or fetched."""

    hint = "job ids and artifact names are plain names: no '/', '\\', '..' or control characters"


class ArtifactDecodeError(VerificationError, ValueError):
    """A `.json` artifact whose bytes are not UTF-8 JSON."""

    hint = "the pod uploaded a malformed artifact; re-run the job or inspect the object"


def storage_not_configured() -> tuple[int, dict[str, str]]:
    """The API's answer when object storage is off: (404, {"detail": "Object storage not configured"})."""
    return NOT_CONFIGURED_STATUS, {"detail": NOT_CONFIGURED_DETAIL}


# ---------------------------------------------------------------------------------------------- validation


def _show(value: str) -> str:
    """A short, printable rendering of a refused value for an error message."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def _check_component(value: object, what: str) -> str:
    """One path component that cannot escape its prefix, or InvalidArtifactRequest.

    Refused: non-strings, empty, longer than MAX_NAME_LENGTH, `.`, anything containing `..`, `/` or `\\`,
    any non-printable character (controls, format characters, non-ASCII spaces), leading/trailing space.
    """
    if not isinstance(value, str):
        raise InvalidArtifactRequest(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArtifactRequest(f"{what} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArtifactRequest(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if not value.isprintable():
        raise InvalidArtifactRequest(f"{what} contains a control or non-printable character: {value!a:.60}")
    if value == "." or ".." in value or "/" in value or "\\" in value:
        raise InvalidArtifactRequest(f"{what} could escape its prefix: {_show(value)}")
    if value != value.strip():
        raise InvalidArtifactRequest(f"{what} has leading or trailing whitespace: {_show(value)}")
    return value


def validate_job_id(job_id: object) -> str:
    return _check_component(job_id, "job id")


def validate_artifact_name(name: object) -> str:
    """A name from SIM_DATA_FILES or `report.md`."""
    checked = _check_component(name, "artifact name")
    if checked not in ARTIFACT_NAMES:
        raise InvalidArtifactRequest(f"unknown artifact {_show(checked)}",
                                     hint=f"expected one of {', '.join(SIM_DATA_FILES)} or {REPORT_FILE}")
    return checked


def validate_expires(seconds: object) -> int:
    """An expiry in whole seconds within SigV4's bounds (1 s .. 7 days)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidArtifactRequest(f"expiry must be whole seconds, not {type(seconds).__name__}")
    if not MIN_EXPIRES <= seconds <= MAX_EXPIRES:
        raise InvalidArtifactRequest(f"expiry {seconds}s is outside {MIN_EXPIRES}..{MAX_EXPIRES} seconds",
                                     hint="SigV4 presigned URLs live at most 7 days")
    return seconds


def artifact_key(job_id: str, name: str) -> str:
    """`sim-data/<job_id>/<name>`, after checking both parts."""
    return f"{SIM_DATA_PREFIX}{validate_job_id(job_id)}/{validate_artifact_name(name)}"


# ------------------------------------------------------------------------------------------------- proxying


def proxy_host_header(settings: Settings) -> str:
    """The exact Host value the reverse proxy must send upstream: the host botocore signed.

    Lowercase host of MINIO_ENDPOINT, with its port unless it is the scheme's default (80/443), which is how
    botocore's SigV4 signer writes it.
    """
    parts = urlsplit(settings.require_storage())
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}[parts.scheme]
    return host if parts.port in (None, default_port) else f"{host}:{parts.port}"


def rewrite_to_proxy(url: str, proxy_base: str) -> str:
    """The same presigned URL with its origin replaced by `proxy_base` (whose path becomes a prefix).

    The signed path and query are kept byte for byte; only scheme, host and port change, which the proxy
    undoes by setting Host to `proxy_host_header` (see the module docstring).
    """
    signed = urlsplit(url)
    proxy = urlsplit(proxy_base)
    return urlunsplit((proxy.scheme, proxy.netloc, proxy.path.rstrip("/") + signed.path, signed.query, ""))


# ------------------------------------------------------------------------------------------ log hygiene

# ---------------------------------------------------------------------------------------------- the module


class SimDataStorage:
    """Presigned artifact URLs and server-side artifact access for one bucket.

    `SimDataStorage()` reads the settings from the environment, as the API builds it; tests may inject
    `settings` and/or a `store`. Without MINIO_ENDPOINT (and no injected store) it is a no-op.
    """

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None) -> None:
        if settings is None:
            settings = store.settings if store is not None else Settings.from_env()
        self.settings = settings
        redact_signing_logs()
        if store is None and settings.storage_enabled:
            from agent.store import Store  # boto3: loaded only by those who presign

            store = Store(settings)
        self._store = store

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def _require_store(self) -> Store:
        if self._store is None:
            raise ConfigError("object storage is off: MINIO_ENDPOINT is not set", hint="set MINIO_ENDPOINT")
        return self._store

    def _presign_all(self, store: Store, job_id: str, method: str, expires: int,
                     via_proxy: bool) -> dict[str, str]:
        urls = {name: store.presign(artifact_key(job_id, name), method=method, expires=expires)
                for name in SIM_DATA_FILES}
        if via_proxy and self.settings.proxy_base:
            urls = {name: rewrite_to_proxy(url, self.settings.proxy_base) for name, url in urls.items()}
        sample = redact_url(next(iter(urls.values())))
        log.info("presigned %d %s URLs for job %s, expiring in %ds (e.g. %s)",
                 len(urls), method, job_id, expires, sample)
        return urls

    def generate_upload_urls(self, job_id: str, *, expires: int = UPLOAD_EXPIRES,
                             via_proxy: bool = False) -> dict[str, str] | None:
        """{file: presigned PUT URL} for every file in SIM_DATA_FILES, or None when storage is off.

        Upload URLs go straight to the internal endpoint (the pod is inside); `via_proxy=True` rewrites
        them through MINIO_PROXY_BASE as well (the proxy must then accept large request bodies).
        """
        job_id = validate_job_id(job_id)
        expires = validate_expires(expires)
        if self._store is None:
            return None
        return self._presign_all(self._store, job_id, "put_object", expires, via_proxy)

    def generate_download_urls(self, job_id: str, sim_data_available: bool, *,
                               expires: int = DOWNLOAD_EXPIRES,
                               via_proxy: bool = True) -> dict[str, str] | None:
        """{file: presigned GET URL} for every file in SIM_DATA_FILES, rewritten through MINIO_PROXY_BASE
        when set; None when storage is off or the job's `sim_data_available` flag is not set."""
        job_id = validate_job_id(job_id)
        expires = validate_expires(expires)
        if self._store is None or not sim_data_available:
            return None
        return self._presign_all(self._store, job_id, "get_object", expires, via_proxy)

    def fetch_artifact(self, job_id: str, name: str) -> Any:
        """The artifact through the SDK: parsed JSON for `.json` names, bytes otherwise (report.md).

        Raises NotFoundError when the object does not exist, ArtifactDecodeError on malformed JSON.
        """
        key = artifact_key(job_id, name)
        store = self._require_store()
        try:
            data = store.get_bytes(key, limit=ARTIFACT_MAX_BYTES)
        except NotFoundError:
            raise NotFoundError(
                f"artifact {name} of job {job_id} not found (s3://{store.bucket}/{key})",
                hint="the job has not uploaded it (yet); check its sim_data_available flag",
            ) from None
        log.debug("fetched %s (%d bytes)", key, len(data))
        if not name.endswith(".json"):
            return data
        try:
            return json.loads(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            reason = type(exc).__name__
            raise ArtifactDecodeError(f"artifact {key} is not valid UTF-8 JSON: {reason}") from None

    def put_report_md(self, job_id: str, text: str) -> str:
        """Write `sim-data/<job_id>/report.md` (text/markdown; charset=utf-8); returns the key."""
        if not isinstance(text, str):
            raise InvalidArtifactRequest(f"report text must be str, not {type(text).__name__}")
        key = artifact_key(job_id, REPORT_FILE)
        store = self._require_store()
        store.put_bytes(key, text.encode("utf-8"), content_type=REPORT_CONTENT_TYPE)
        log.info("wrote %s (%d characters)", key, len(text))
        return key


__all__ = [
    "DOWNLOAD_EXPIRES",
    "MAX_EXPIRES",
    "REPORT_FILE",
    "SIM_DATA_FILES",
    "UPLOAD_EXPIRES",
    "ArtifactDecodeError",
    "InvalidArtifactRequest",
    "SimDataStorage",
    "artifact_key",
    "proxy_host_header",
    "redact_signing_logs",
    "rewrite_to_proxy",
    "storage_not_configured",
    "validate_artifact_name",
    "validate_expires",
    "validate_job_id",
]
