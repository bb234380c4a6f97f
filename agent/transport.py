"""The HTTP side the Python code shares: proxies from the environment, TLS trust, and the deadlines on
every byte.

Three jobs, used by the python engine's ranged GETs and by the metadata requests (listing, HEAD, ref,
manifest and sidecar GETs) that boto3 signs:

- **Proxies.** `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY`, either case, read the way
  boto3 and requests read them (`urllib.request.getproxies`, `proxy_bypass`), so a pod can
  pull through a node-local caching proxy or Dragonfly's dfdaemon. Loopback is proxied like any host
  unless NO_PROXY lists it (as curl does; Go programs such as s5cmd never proxy loopback).
- **Trust** (`agent.settings.Trust`). Every pool verifies an https server against the CAs the settings
  resolved (`ca_certs` / `ca_cert_dir`, else the system store), and a certificate it refuses is the
  agent's `UntrustedCertificateError` (exit 2), at once: retrying cannot make a certificate valid.
- **Deadlines** (`agent.settings.Deadlines`). urllib3 bounds the connect and each socket read, but a
  server that sends one byte every few seconds restarts every read timeout; `Pace` adds the minimum
  rate over a window, checked after every chunk read with `read1` (which returns what one socket read
  brought, instead of waiting for a full chunk).

`DeadlineSender` sends botocore's already-signed GET and HEAD requests (the listing, HEAD, ref, manifest
and sidecar GETs) through this layer, so they obey the same deadlines and proxies as the bytes; uploads
stay with botocore's own sender. It takes the place of the client's HTTP session, behind botocore's
`before-send` hook, so a stub on that hook (moto) still answers first.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3
from botocore.awsrequest import AWSPreparedRequest, AWSResponse, HTTPHeaders
from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError
from botocore.exceptions import ReadTimeoutError as BotoReadTimeout
from botocore.exceptions import SSLError as BotoSSLError

from agent.errors import StorageUnavailableError, UntrustedCertificateError, is_certificate_failure
from agent.errors import untrusted_certificate as _untrusted
from agent.settings import Deadlines, Trust

CHUNK = 1 << 20
# What reads metadata (small bodies, held whole): every GET and HEAD the agent's boto3 client sends.
METADATA_METHODS = ("GET", "HEAD")


class TooSlow(Exception):
    """A body arrived slower than the minimum rate over a whole window."""


def is_stall(exc: BaseException) -> bool:
    """No usable answer: the connection failed (refused, DNS; urllib3 2 derives these from its connect
    timeout) or timed out, no head within the first-byte deadline, a silence, a body too slow. These
    get `stall_retries`; an answer asking to retry (503, 5xx) or a broken body gets `retries`."""
    return isinstance(exc, (urllib3.exceptions.TimeoutError, TooSlow))


def proxy_for(url: str) -> str | None:
    """The proxy URL for `url` from the environment, or None (none set, or NO_PROXY matches the host).
    `urllib.request`'s reading, which boto3 and requests share: lower-case names win, and in a CGI
    process HTTP_PROXY is ignored (httpoxy)."""
    proxies = urllib.request.getproxies()
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or not parts.hostname:
        return None
    if urllib.request.proxy_bypass(parts.netloc.rsplit("@", 1)[-1]):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def timeout_for(connect: float, first_byte: float) -> urllib3.Timeout:
    """Connect within `connect`; the head, and every later read, within `first_byte`."""
    return urllib3.Timeout(connect=min(connect, first_byte), read=first_byte)


def trust_kwargs(trust: Trust) -> dict[str, Any]:
    """urllib3's verification arguments for `trust`; none for the system store (urllib3's default context
    then loads OpenSSL's default paths)."""
    kwargs: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    if trust.ca_file is not None:
        kwargs["ca_certs"] = str(trust.ca_file)
    if trust.ca_dir is not None:
        kwargs["ca_cert_dir"] = str(trust.ca_dir)
    return kwargs


def untrusted_certificate(exc: BaseException, where: str, trust: Trust) -> UntrustedCertificateError | None:
    """The agent's error when `exc` (urllib3's, or a cause of it) is a refused server certificate, else
    None. urllib3 (and botocore) raise SSLError for every handshake failure; only a failed verification
    is the trust's."""
    seen: BaseException | None = exc
    for _ in range(5):  # urllib3 wraps: MaxRetryError.reason, SSLError(SSLCertVerificationError)
        if seen is None:
            break
        if isinstance(seen, (urllib3.exceptions.SSLError, urllib3.exceptions.MaxRetryError, BotoSSLError)) \
                and is_certificate_failure(str(seen)):
            return _untrusted(where, str(seen), trust.source)
        seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
    return None


def pool_for(url: str, *, connect: float, first_byte: float, maxsize: int = 4,
             trust: Trust | None = None) -> urllib3.PoolManager:
    """A pool for requests to `url`'s server: direct, or through the environment's proxy; an https
    server's certificate is checked against `trust` (None: the system store)."""
    kwargs: dict[str, Any] = {"num_pools": 4, "maxsize": maxsize, "timeout": timeout_for(connect, first_byte),
                              "retries": False, **trust_kwargs(trust or Trust())}
    proxy = proxy_for(url)
    if proxy is None:
        return urllib3.PoolManager(**kwargs)
    parts = urlsplit(proxy)
    headers = None
    if parts.username is not None:
        auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers = urllib3.make_headers(proxy_basic_auth=auth)
        proxy = proxy.replace(f"{parts.netloc.rsplit('@', 1)[0]}@", "", 1)
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **kwargs)


class Pace:
    """The minimum-rate rule: within each window of `window` seconds (from the first byte of the body)
    at least `min_rate` bytes/s must arrive on average, else `TooSlow`. `min_rate` 0 turns it off."""

    def __init__(self, min_rate: float, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_rate = min_rate
        self.window = window
        self.clock = clock
        self.started = clock()
        self.bytes = 0

    def add(self, count: int) -> None:
        self.bytes += count
        now = self.clock()
        elapsed = now - self.started
        if self.min_rate <= 0 or elapsed < self.window:
            return
        if self.bytes < self.min_rate * elapsed:
            raise TooSlow(f"{self.bytes} bytes in {elapsed:.1f} s, below the minimum of "
                          f"{self.min_rate / 1024:g} KiB/s over {self.window:g} s")
        self.started, self.bytes = now, 0


def paced_chunks(response: urllib3.BaseHTTPResponse, pace: Pace, chunk: int = CHUNK) -> Iterator[bytes]:
    """The body as it arrives (the stored bytes, undecoded), each read checked against `pace`."""
    while True:
        data = response.read1(chunk, decode_content=False)
        if not data:
            return
        pace.add(len(data))
        yield data


class _Body(io.BytesIO):
    """A whole body, readable as botocore reads a response: `stream()` for parsed ones, `read()` for
    GetObject's StreamingBody."""

    def stream(self, amt: int = CHUNK, decode_content: bool = False) -> Iterator[bytes]:
        while data := self.read(amt):
            yield data


class DeadlineSender:
    """The HTTP session of the agent's boto3 client: sends its signed GET and HEAD requests itself.

    A timeout or a too-slow body is raised as botocore's own timeout, so botocore's retry policy
    retries it, until `stall_retries + 1` of them have come in a row: then `StorageUnavailableError`
    (exit 3), which botocore does not retry, so a server that never answers fails within the deadline
    instead of after every one of botocore's attempts. Any answer resets the count."""

    def __init__(self, endpoint_url: str, deadlines: Deadlines, inner: Any, *, maxsize: int = 4,
                 trust: Trust | None = None) -> None:
        self.deadlines = deadlines
        self.trust = trust or Trust()
        self.inner = inner  # botocore's own session, for everything else
        self.pool = pool_for(endpoint_url, connect=deadlines.connect, first_byte=deadlines.first_byte,
                             maxsize=maxsize, trust=self.trust)
        self.stalls = 0

    def send(self, request: AWSPreparedRequest) -> AWSResponse:
        if request.method not in METADATA_METHODS:
            try:
                sent: AWSResponse = self.inner.send(request)
            except BotoSSLError as exc:  # botocore would retry it, with backoff, about a minute
                untrusted = untrusted_certificate(exc, request.url.split("?", 1)[0], self.trust)
                if untrusted is None:
                    raise
                raise untrusted from None
            return sent
        url = request.url
        try:
            response = self.pool.urlopen(request.method, url, body=request.body,
                                         headers=dict(request.headers.items()), redirect=False,
                                         preload_content=False, decode_content=False)
            try:
                pace = Pace(self.deadlines.min_rate, self.deadlines.rate_window)
                body = b"".join(paced_chunks(response, pace)) if request.method != "HEAD" else b""
            except BaseException:
                response.close()  # a half-read body must not go back to the pool
                raise
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError, TooSlow) as exc:
            raise self._failed(url, exc) from None
        self.stalls = 0
        headers = HTTPHeaders()
        for name, value in response.headers.items():
            headers[name] = value
        return AWSResponse(url, response.status, headers, _Body(body))

    def _failed(self, url: str, exc: Exception) -> Exception:
        """botocore's own error for `exc` (so its retry policy applies), or ours once stalls run out."""
        where = url.split("?", 1)[0]
        untrusted = untrusted_certificate(exc, where, self.trust)
        if untrusted is not None:  # not botocore's: it would retry a certificate that cannot get better
            return untrusted
        if not is_stall(exc):
            self.stalls = 0
            return ConnectionClosedError(endpoint_url=where, error=exc)
        self.stalls += 1
        if self.stalls > self.deadlines.stall_retries:
            self.stalls = 0
            return StorageUnavailableError(f"{where}: {_why(exc)} on {self.deadlines.stall_retries + 1} "
                                           "tries in a row: the object storage stalled")
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            return EndpointConnectionError(endpoint_url=where, error=exc)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return ConnectTimeoutError(endpoint_url=where, error=exc)
        return BotoReadTimeout(endpoint_url=where, error=exc)

    def close(self) -> None:
        self.pool.clear()
        self.inner.close()

    @classmethod
    def install(cls, client: Any, endpoint_url: str, deadlines: Deadlines, *, maxsize: int = 4,
                trust: Trust | None = None) -> None:
        """Make this the client's HTTP session (botocore keeps it on the client's endpoint)."""
        endpoint = client._endpoint
        endpoint.http_session = cls(endpoint_url, deadlines, endpoint.http_session, maxsize=maxsize,
                                    trust=trust)


def _why(exc: Exception) -> str:
    if isinstance(exc, TooSlow):
        return f"too slow ({exc})"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "cannot connect"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "no connection within the connect deadline"
    return "no answer within the first-byte deadline"
