"""Every environment variable the agent reads (DESIGN.md §6), read once into a frozen, checked object.

Tests redirect everything by building `Settings.from_env({...})` with their own mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import ConfigError

DEFAULT_BUCKET = "simswarm"
MODELS_PREFIX = "models/hf-cache/"
SIM_DATA_PREFIX = "sim-data/"
DEFAULT_REGION = "us-east-1"


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def normalize_endpoint(endpoint: str, secure: bool) -> str:
    """`host:port` (MinIO SDK style, scheme from MINIO_SECURE) or a full URL -> a base URL."""
    if "://" not in endpoint:
        endpoint = f"{'https' if secure else 'http'}://{endpoint}"
    parts = urlsplit(endpoint)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"MINIO_ENDPOINT is not host:port or an http(s) URL: {endpoint!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError("MINIO_ENDPOINT must not carry a query, fragment or credentials")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"MINIO_ENDPOINT has a malformed port: {endpoint!r}") from exc
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def hf_home_from_env(env: Mapping[str, str]) -> Path:
    """HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (huggingface_hub's order)."""
    if _clean(env.get("HF_HOME")):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HOME"])))
    xdg = _clean(env.get("XDG_CACHE_HOME")) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def hub_cache_from_env(env: Mapping[str, str]) -> Path:
    """HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub (huggingface_hub's precedence)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = _clean(env.get(name))
        if value:
            return Path(os.path.expandvars(os.path.expanduser(value)))
    return hf_home_from_env(env) / "hub"


@dataclass(frozen=True)
class Settings:
    """The agent's whole configuration. `secret_key` and `hf_token` never appear in repr()."""

    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None = field(repr=False)
    bucket: str
    secure: bool
    proxy_base: str | None
    hf_home: Path
    hub_cache: Path
    hf_token: str | None = field(repr=False)
    hf_endpoint: str | None
    region: str = DEFAULT_REGION

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        secure = _is_true(env.get("MINIO_SECURE"))
        endpoint = _clean(env.get("MINIO_ENDPOINT"))
        proxy = _clean(env.get("MINIO_PROXY_BASE"))
        return cls(
            endpoint_url=normalize_endpoint(endpoint, secure) if endpoint else None,
            access_key=_clean(env.get("MINIO_ACCESS_KEY")),
            secret_key=_clean(env.get("MINIO_SECRET_KEY")),
            bucket=_clean(env.get("MINIO_BUCKET")) or DEFAULT_BUCKET,
            secure=secure,
            proxy_base=normalize_endpoint(proxy, secure) if proxy else None,
            hf_home=hf_home_from_env(env),
            hub_cache=hub_cache_from_env(env),
            hf_token=_clean(env.get("HF_TOKEN")),
            hf_endpoint=_clean(env.get("HF_ENDPOINT")),
            region=_clean(env.get("MINIO_REGION")) or DEFAULT_REGION,
        )

    @property
    def storage_enabled(self) -> bool:
        return self.endpoint_url is not None

    def with_hf_home(self, hf_home: str | Path | None) -> Settings:
        """`--hf-home DIR` wins over the environment: the cache becomes DIR/hub, as HF_HOME=DIR would."""
        if hf_home is None:
            return self
        home = Path(hf_home).expanduser()
        return replace(self, hf_home=home, hub_cache=home / "hub")

    def require_storage(self) -> str:
        if self.endpoint_url is None:
            raise ConfigError("object storage is off: MINIO_ENDPOINT is not set", hint="set MINIO_ENDPOINT")
        return self.endpoint_url
