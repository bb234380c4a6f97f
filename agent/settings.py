"""Every environment variable the agent reads (README "Configuration"), read once into a frozen, checked
object.

Tests redirect everything by building `Settings.from_env({...})` with their own mapping. The TLS trust
(`AWS_CA_BUNDLE`, `SSL_CERT_FILE`, `SSL_CERT_DIR`) is resolved here once, into `Trust`, and every client
is built from it, so no library reads those variables behind the agent's back. Read by the
libraries, not here: the proxy variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, through
`urllib.request.getproxies` in agent/transport.py) and `PATH` (where `vllm` and `s5cmd` are found).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import ConfigError, UntrustedCertificateError

DEFAULT_BUCKET = "simswarm"
MODELS_PREFIX = "models/hf-cache/"
SIM_DATA_PREFIX = "sim-data/"
DEFAULT_REGION = "us-east-1"
KIB = 1 << 10
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})  # huggingface_hub's ENV_VARS_TRUE_VALUES, any case
# huggingface_hub's order: HF_HUB_OFFLINE when it is set, else TRANSFORMERS_OFFLINE decides.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
VLLM_BIN_ENV = "SIMSWARM_VLLM_BIN"
OVERLAP_ENV = "SIMSWARM_OVERLAP"  # false: `serve` pulls every file before vLLM starts
FALSE_VALUES = frozenset({"0", "false", "no", "off"})
# The object-storage keys, in our spelling and the AWS SDKs': no child process starts with them (vLLM
# needs none; s5cmd is handed the agent's own keys explicitly), so they cannot outlive the pull.
STORAGE_SECRETS = ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUE_VALUES


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _as_float(env: Mapping[str, str], name: str, default: float, *, positive: bool = False) -> float:
    value = _clean(env.get(name))
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} is not a number: {value!r}") from None
    if not number >= 0 or number == float("inf") or (positive and number == 0):  # also refuses NaN
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return number


@dataclass(frozen=True)
class Deadlines:
    """How long any request may take, the one definition every engine and metadata request obeys.

    Sized for a pod next to its object store, where a healthy stream moves tens of MB/s: a connect takes
    milliseconds, an overloaded MinIO answers `503 SlowDown` within its own 10 s request deadline, and a
    stream below 64 KiB/s for 20 s is broken, not slow. A request that runs into one of these limits, or
    cannot connect at all, is aborted and retried at most `stall_retries` times (an answer asking to
    retry, such as 503, gets `retries`), so a server that is down fails at once, one that accepts
    connections and never answers costs about
    (stall_retries + 1) x first_byte seconds and one that trickles (stall_retries + 1) x rate_window.
    `retries` is generous on purpose: a 503 is the server asking a crowd of pods to slow down, and
    ten jittered backoffs (0.2 s doubling to a 10 s cap, Retry-After honoured) ride out a storm of
    half a minute or more before the pull gives up and falls back.
    """

    connect: float = 5.0  # TCP (and TLS) connect
    first_byte: float = 10.0  # from sending a request to its response head; also the longest silence
    min_rate: float = 64 * KIB  # bytes/s a body must average over each window; 0 turns the rule off
    rate_window: float = 20.0  # seconds over which `min_rate` is judged
    stall_retries: int = 1  # retries of a request with no usable answer: down, timed out, slow, bad bytes
    retries: int = 10  # retries of any other transient failure: 503 SlowDown, 5xx, a reset, a short body

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "rate_window"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"deadline {name} must be > 0 seconds, got {getattr(self, name)}")
        if self.min_rate < 0 or self.stall_retries < 0 or self.retries < 0:
            raise ConfigError("the minimum rate and the retries must be >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Deadlines:
        base = cls()
        return cls(
            connect=_as_float(env, "SIMSWARM_CONNECT_TIMEOUT", base.connect, positive=True),
            first_byte=_as_float(env, "SIMSWARM_FIRST_BYTE_TIMEOUT", base.first_byte, positive=True),
            min_rate=_as_float(env, "SIMSWARM_MIN_RATE_KIB", base.min_rate / KIB) * KIB,
            rate_window=_as_float(env, "SIMSWARM_RATE_WINDOW", base.rate_window, positive=True),
            stall_retries=int(_as_float(env, "SIMSWARM_STALL_RETRIES", base.stall_retries)),
            retries=int(_as_float(env, "SIMSWARM_RETRIES", base.retries)),
        )


# The trust variables, strongest first: AWS_CA_BUNDLE (boto3's and the AWS CLI's, what a MinIO operator
# most likely set) wins; else OpenSSL's pair, as OpenSSL, Go and rustls read it; else the system store.
TRUST_ENV = ("AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Trust:
    """Which certificate authorities an https endpoint's certificate must chain to: one rule for every
    client (boto3, the urllib3 readers, the native engine, s5cmd), resolved once by `trust_from_env`.

    `ca_file` (PEM, one or more CAs) and `ca_dir` (a folder of PEM files) replace the system store: only
    they are trusted. Both None: the system store (the OpenSSL default file and folder). `source` names
    where the trust came from, for the line an untrusted certificate prints."""

    ca_file: Path | None = None
    ca_dir: Path | None = None
    source: str = "the system store"

    @property
    def is_system(self) -> bool:
        return self.ca_file is None and self.ca_dir is None

    def boto_verify(self) -> str | bool:
        """botocore's `verify=`: a PEM file. Without one, the system store's file (botocore's own default
        would be certifi's bundle, a different store from every other client's); True where the system
        has none. A folder alone is given to botocore's sessions separately (`agent.store`)."""
        if self.ca_file is not None:
            return str(self.ca_file)
        if self.ca_dir is None:
            system = ssl.get_default_verify_paths().openssl_cafile
            if system and os.path.isfile(system):
                return system
        return True

    def check(self) -> None:
        """A named file that is missing or holds no PEM certificate is a setting to fix (exit 2), found
        before any request rather than as a failed handshake."""
        if self.ca_file is not None:
            try:
                with open(self.ca_file, "rb") as handle:
                    pem = handle.read(8 << 20)
            except OSError as exc:
                raise ConfigError(f"{self.source}: cannot read it ({exc.strerror or exc})",
                                  hint=TRUST_HINT) from None
            if PEM_CERTIFICATE not in pem:
                raise ConfigError(f"{self.source}: no PEM certificate in it", hint=TRUST_HINT)
        if self.ca_dir is not None and not self.ca_dir.is_dir():
            raise ConfigError(f"{self.source}: not a folder", hint=TRUST_HINT)


TRUST_HINT = UntrustedCertificateError.hint


def trust_from_env(env: Mapping[str, str]) -> Trust:
    """AWS_CA_BUNDLE alone when set; else SSL_CERT_FILE and SSL_CERT_DIR, together, whichever are set;
    else the system store (README "Configuration", TLS)."""
    bundle = _clean(env.get("AWS_CA_BUNDLE"))
    if bundle is not None:
        return Trust(Path(bundle), None, f"AWS_CA_BUNDLE={bundle}")
    file, folder = _clean(env.get("SSL_CERT_FILE")), _clean(env.get("SSL_CERT_DIR"))
    if file is None and folder is None:
        return Trust()
    pairs = (("SSL_CERT_FILE", file), ("SSL_CERT_DIR", folder))
    named = [f"{name}={value}" for name, value in pairs if value]
    return Trust(Path(file) if file else None, Path(folder) if folder else None, " and ".join(named))


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


def offline_from_env(env: Mapping[str, str]) -> str | None:
    """The variable that takes the Hub offline (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE, as
    huggingface_hub reads them: the first one set decides), or None when the Hub may be used."""
    for name in OFFLINE_ENV:
        value = _clean(env.get(name))
        if value is not None:
            return name if _is_true(value) else None
    return None


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
    proxy_base: str | None
    hf_home: Path
    hub_cache: Path
    hf_token: str | None = field(repr=False)
    hf_endpoint: str | None
    region: str = DEFAULT_REGION
    deadlines: Deadlines = field(default_factory=Deadlines)
    hub_offline: str | None = None  # the variable that forbids the Hub (see `offline_from_env`), if any
    vllm_bin: str | None = None  # $SIMSWARM_VLLM_BIN: the vLLM executable `serve` runs
    overlap: bool = True  # $SIMSWARM_OVERLAP: `serve` starts vLLM while the weights arrive
    trust: Trust = field(default_factory=Trust)  # the CAs an https endpoint must chain to

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        secure = _is_true(env.get("MINIO_SECURE"))
        endpoint = _clean(env.get("MINIO_ENDPOINT"))
        proxy = _clean(env.get("MINIO_PROXY_BASE"))
        endpoint_url = normalize_endpoint(endpoint, secure) if endpoint else None
        trust = trust_from_env(env)
        if endpoint_url is not None and endpoint_url.startswith("https://"):
            trust.check()  # only where it will be used: a stale SSL_CERT_FILE cannot break a plain-http setup
        return cls(
            endpoint_url=endpoint_url,
            access_key=_clean(env.get("MINIO_ACCESS_KEY")),
            secret_key=_clean(env.get("MINIO_SECRET_KEY")),
            bucket=_clean(env.get("MINIO_BUCKET")) or DEFAULT_BUCKET,
            proxy_base=normalize_endpoint(proxy, secure) if proxy else None,
            hf_home=hf_home_from_env(env),
            hub_cache=hub_cache_from_env(env),
            hf_token=_clean(env.get("HF_TOKEN")),
            hf_endpoint=_clean(env.get("HF_ENDPOINT")),
            region=_clean(env.get("MINIO_REGION")) or DEFAULT_REGION,
            deadlines=Deadlines.from_env(env),
            hub_offline=offline_from_env(env),
            vllm_bin=_clean(env.get(VLLM_BIN_ENV)),
            overlap=(_clean(env.get(OVERLAP_ENV)) or "true").lower() not in FALSE_VALUES,
            trust=trust,
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
