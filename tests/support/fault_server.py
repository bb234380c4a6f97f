"""A fault-injecting HTTP/1.1 reverse proxy for the test S3 server.

It forwards every request to the upstream S3 server (same method, path, query and headers) and can
break chosen responses the way real networks and servers do, so any engine's retry logic is tested
against a real server's bytes:

    with FaultProxy(server.endpoint_url) as proxy:
        proxy.add_fault("reset")                       # the next request: connection reset mid-body
        proxy.add_fault("slowdown", count=2, match="/blobs/")
        url = proxy.url_for(presigned_url)             # same signed URL, pointed at the proxy
        ... fetch url ...
        assert proxy.count(fault="reset") == 1
        assert len(proxy.requests(method="GET")) == 3

SigV4 signs the Host header. Two ways to address the proxy, chosen by `preserve_host`:
- `False` (default): URLs are presigned against the upstream and rewritten with `url_for`; the proxy
  forwards with the upstream's Host, which is what was signed.
- `True`: the client signs against the proxy itself (boto3 or s5cmd with `endpoint_url=proxy.endpoint_url`);
  the proxy forwards the client's Host unchanged.

It also acts as a forward proxy (HTTP_PROXY=proxy.endpoint_url): a request in absolute form
(`GET http://any-host:port/path`) goes to the same upstream with its Host unchanged, and is logged with
`absolute=True`, so a test can prove a client sent its bytes through a proxy. Any host name works,
including one that does not resolve, which no client could reach without the proxy.

A response the proxy breaks is read whole from the upstream first (test-sized objects); one it leaves
alone is relayed as it streams, so the proxy can also carry a benchmark's gigabytes.
The log never holds a query string (presigned URLs carry their signature there).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from tests.support.loopback import HOST, LoopbackServer

FaultKind = Literal[
    "reset",         # send the headers and half the body, then reset the connection (RST)
    "truncate",      # send the headers and half the body, then close cleanly (short body)
    "stall",         # send the headers and half the body, wait `stall_seconds`, then the rest
    "stall_head",    # wait `stall_seconds` before answering at all, then answer normally
    "trickle",       # send the headers, then the body one byte every `stall_seconds` (a dying link)
    "flip",          # flip every bit of the body's middle byte (same length, wrong bytes)
    "halve",         # send the first half of the body with a Content-Length saying so: well framed, cut short
    "flip_third",    # flip every bit of the byte at one third of the body (with `every`: a faulty middlebox)
    "slowdown",      # answer 503 SlowDown with Retry-After: 1, without asking the upstream
    "error500",      # answer 500 InternalError, without asking the upstream
    "range_as_200",  # a ranged answer sent as 200, keeping its Content-Range (as rclone serve s3 does)
    "full_200",      # forward without the Range header: 200 with the whole object, no Content-Range
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}


class _QuietServer(ThreadingHTTPServer):
    """A `reset` fault closes the socket under the handler on purpose: its error is expected, not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw and answered it."""

    method: str
    path: str  # without the query string
    range: str | None
    status: int  # the status sent to the client; 0 for `stall_head` (logged before any answer)
    fault: str | None  # the fault applied, if any
    connection: int  # client connection number: equal numbers mean a kept-alive connection was reused
    body_bytes: int = 0  # response body bytes sent to the client
    absolute: bool = False  # sent in absolute form, as to a forward proxy
    host: str = ""  # the Host the client asked for
    size: int = 0  # body bytes the proxy answered with (before any fault cut them short)


Matcher = Callable[[str, str, "str | None"], bool]  # (method, path, range) -> applies?


@dataclass
class Rule:
    """Apply `kind` to the next `count` requests that `match` accepts (None: any request); with `every`
    N, only to every Nth of them (the Nth, the 2Nth, ...): a deterministic fault, as a middlebox's is."""

    kind: str
    count: int = 1
    match: str | Matcher | None = None
    stall_seconds: float | None = None
    every: int = 1
    applied: int = field(default=0)
    seen: int = field(default=0)

    def accepts(self, method: str, path: str, range_: str | None) -> bool:
        if self.applied >= self.count or not self._matches(method, path, range_):
            return False
        self.seen += 1
        return self.seen % self.every == 0

    def _matches(self, method: str, path: str, range_: str | None) -> bool:
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return self.match in path
        return self.match(method, path, range_)


class FaultProxy(LoopbackServer):
    """A threaded reverse proxy on a free loopback port in front of `upstream` (`http://host:port`)."""

    thread_name = "fault-proxy"
    poll_interval = 0.05
    not_started = "the fault proxy is not started"

    def __init__(self, upstream: str, *, preserve_host: bool = False, stall_seconds: float = 5.0,
                 upstream_timeout: float = 30.0) -> None:
        super().__init__()
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_netloc = parts.netloc
        self.preserve_host = preserve_host
        self.stall_seconds = stall_seconds
        self.upstream_timeout = upstream_timeout
        self._rules: list[Rule] = []
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections = 0
        self._in_flight = 0
        self._max_in_flight = 0

    # -- lifecycle (start, stop, `with`: tests.support.loopback) ---------------------------------------

    def _make_server(self) -> ThreadingHTTPServer:
        server = _QuietServer((HOST, 0), _handler_class(self))
        server.daemon_threads = True
        return server

    def _on_start(self) -> None:
        self._stopping.clear()

    def _on_stop(self) -> None:
        self._stopping.set()  # stalls end at once

    # -- addressing -----------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url_for(self, url: str) -> str:
        """`url` (presigned against the upstream) with only scheme and host:port changed to the proxy's."""
        parts = urlsplit(url)
        return urlunsplit(("http", f"{HOST}:{self.port}", parts.path, parts.query, parts.fragment))

    # -- faults and log -------------------------------------------------------------------------------

    def add_fault(self, kind: FaultKind, count: int = 1, match: str | Matcher | None = None, *,
                  stall_seconds: float | None = None, every: int = 1) -> Rule:
        """Break the next `count` requests that `match` accepts (a substring of the path, or a predicate
        on (method, path, range)), or with `every` N only each Nth of them. Rules apply in the order
        added, one per request (a request one rule counted without breaking it may meet the next)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        rule = Rule(kind, count, match, stall_seconds, every)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget every rule, the request log and the counters."""
        with self._lock:
            self._rules.clear()
            self._log.clear()
            self._connections = self._max_in_flight = 0

    def requests(self, method: str | None = None, fault: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._log
                    if (method is None or r.method == method) and (fault is None or r.fault == fault)]

    def count(self, method: str | None = None, fault: str | None = None) -> int:
        return len(self.requests(method, fault))

    def body_bytes(self, method: str = "GET", path_contains: str = "") -> int:
        """Response body bytes sent for matching requests: what a client downloaded through the proxy."""
        return sum(r.body_bytes for r in self.requests(method) if path_contains in r.path)

    @property
    def connections(self) -> int:
        """Client connections accepted so far."""
        return self._connections

    @property
    def max_in_flight(self) -> int:
        """The most requests the proxy was answering at one time."""
        return self._max_in_flight

    # -- used by the handler --------------------------------------------------------------------------

    def _next_connection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _take_rule(self, method: str, path: str, range_: str | None) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.accepts(method, path, range_):
                    rule.applied += 1
                    return rule
        return None

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record(self, entry: Request) -> None:
        with self._lock:
            self._log.append(entry)


@dataclass
class _Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def _handler_class(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_FaultHandler):
        owner = proxy

    return Handler


class _FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 60
    owner: FaultProxy

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.owner._next_connection()

    def log_message(self, format: str, *args: object) -> None:  # no stderr noise, no query strings
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    # -- one request ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        self.owner._enter()
        try:
            self._serve_one()
        finally:
            self.owner._leave()

    def _serve_one(self) -> None:
        self.absolute = self.path.startswith("http://")
        if self.absolute:  # a forward-proxy request: the upstream gets the origin form
            rest = self.path[len("http://"):]
            self.path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        path = self.path.split("?", 1)[0]
        range_ = self.headers.get("Range")
        rule = self.owner._take_rule(self.command, path, range_)
        kind = rule.kind if rule else None
        stall = rule.stall_seconds if rule and rule.stall_seconds is not None else self.owner.stall_seconds
        request_body = self._read_request_body()
        record = self._record_as(path, range_, kind)
        if kind == "slowdown":
            record(503)
            self._answer_error(503, "SlowDown", "Please reduce your request rate.", [("Retry-After", "1")])
        elif kind == "error500":
            record(500)
            self._answer_error(500, "InternalError", "We encountered an internal error.")
        else:
            if kind == "stall_head":
                record(0)  # now, so a test can see the request while it hangs
                if self.owner._stopping.wait(stall):
                    return
            if kind is None:
                self._relay(request_body, record)
                return
            upstream = self._forward(request_body, drop_range=kind == "full_200")
            self._answer(upstream, kind, stall, None if kind == "stall_head" else record)

    def _record_as(self, path: str, range_: str | None, kind: str | None) -> Callable[..., None]:
        def record(status: int, size: int = 0, body_bytes: int | None = None) -> None:
            sent = size if body_bytes is None else body_bytes
            self.owner._record(Request(self.command, path, range_, status, kind, self.connection_number,
                                       sent, self.absolute, self.headers.get("Host", ""), size))
        return record

    def _read_request_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes, *, drop_range: bool) -> _Upstream:
        conn = self._send_upstream(body, drop_range=drop_range)
        try:
            response = conn.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return _Upstream(response.status, response.reason, headers, data)
        finally:
            conn.close()

    def _relay(self, body: bytes, record: Callable[..., None]) -> None:
        """Pass the upstream's answer through unchanged, streaming a body of known length."""
        conn = self._send_upstream(body, drop_range=False)
        try:
            response = conn.getresponse()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            length = response.getheader("Content-Length")
            if length is None or self.command == "HEAD":
                self._answer(_Upstream(response.status, response.reason, headers, response.read()),
                             None, 0.0, record)
                return
            record(response.status, int(length))
            self.send_response_only(response.status, response.reason)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", length)
            self.end_headers()
            while chunk := response.read(1 << 20):
                if not self._send(chunk):
                    return
        finally:
            conn.close()

    def _send_upstream(self, body: bytes, *, drop_range: bool) -> http.client.HTTPConnection:
        owner = self.owner
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port,
                                          timeout=owner.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                lower = name.lower()
                if lower in HOP_BY_HOP or lower == "host" or (drop_range and lower == "range"):
                    continue
                conn.putheader(name, value)
            conn.putheader("Host", self.headers.get("Host", "") if owner.preserve_host
                           else owner.upstream_netloc)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
        except BaseException:
            conn.close()
            raise
        return conn

    def _answer(self, upstream: _Upstream, kind: str | None, stall: float,
                record: Callable[..., None] | None) -> None:
        """Send the upstream's answer, broken as `kind` says. `record` is called before anything is sent, so
        the log holds a request by the time its client sees the answer (or the stall, or the reset)."""
        status, body = upstream.status, upstream.body
        if kind == "range_as_200" and status == 206:
            status = 200
        if kind == "flip" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        if kind == "flip_third" and body:
            third = len(body) // 3
            body = body[:third] + bytes([body[third] ^ 0xFF]) + body[third + 1:]
        if kind == "halve":
            body = body[:len(body) // 2]  # the client can only tell by what the bytes say
        if record is not None:
            cut = kind in ("reset", "truncate")
            size = 0 if self.command == "HEAD" else len(body)
            record(status, size, size // 2 if cut else size)
        self.send_response_only(status, upstream.reason)
        for name, value in upstream.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        half = len(body) // 2
        if kind == "trickle":
            for i in range(len(body)):
                if self.owner._stopping.wait(stall) or not self._send(body[i:i + 1]):
                    self.close_connection = True
                    return
            return
        if kind in ("reset", "truncate", "stall"):
            self._send(body[:half])
            if kind == "reset":
                self._reset()
                return
            if kind == "truncate":
                self.close_connection = True
                return
            if self.owner._stopping.wait(stall):
                self.close_connection = True
                return
            body = body[half:]
        self._send(body)

    def _answer_error(self, status: int, code: str, message: str,
                      extra: list[tuple[str, str]] | None = None) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        for name, value in extra or []:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self._send(body)

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (its read timeout, or it was cancelled)
            self.close_connection = True
            return False
        return True

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, the client sees 'connection reset by peer'."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.wfile.close()
            self.rfile.close()
            self.connection.close()
