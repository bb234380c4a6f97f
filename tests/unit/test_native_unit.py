"""`agent._native.fetch` and the native engine without an S3 server: argument checks, local errors,
connection failures, the error mapping, and the typed stub against the build."""

from __future__ import annotations

import errno
import hashlib
import http.server
import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

import agent
from agent.engines import pick_engine
from agent.engines.base import BlobJob, Part, TransferConfig
from agent.errors import (
    DiskFullError,
    PermissionDeniedError,
    StorageUnavailableError,
    VerificationError,
)

native = pytest.importorskip("agent._native")
from agent.engines.native import NativeEngine, translate  # noqa: E402
from agent.policy import RETRYABLE_STATUSES, RetryPolicy  # noqa: E402
from agent.settings import Deadlines  # noqa: E402

SECRET_URL = "http://127.0.0.1:{port}/bucket/key?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def spec(path: Path, url: str, size: int, parts: list[tuple[int, int, int, str | None]]) -> dict[str, Any]:
    return {"url": url, "headers": None, "path": str(path), "size": size, "parts": parts}


def test_stub_matches_the_compiled_module() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "agent._native"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rust_failure_policy_is_the_python_one() -> None:
    """native/src/policy.rs mirrors agent/policy.py: the same retryable statuses, the same defaults."""
    assert set(native.retryable_statuses()) == RETRYABLE_STATUSES
    default = RetryPolicy()
    assert native.retry_defaults() == (default.max_retries, default.base, default.cap)


@pytest.mark.parametrize(("parts", "needle"), [
    ([(0, 8, 4, None)], "outside the blob"),
    ([(0, 0, 4, "abc")], "bad digest"),
])
def test_bad_parts_are_refused_before_any_request(tmp_path: Path, closed_port: int,
                                                  parts: list[tuple[int, int, int, str | None]],
                                                  needle: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=needle):
        native.fetch([spec(path, SECRET_URL.format(port=closed_port), 10, parts)])


def test_an_unknown_part_digest_is_refused(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 4)
    url = SECRET_URL.format(port=closed_port)
    job = {**spec(path, url, 4, [(0, 0, 4, EMPTY_SHA256)]), "part_digest": "md5"}
    with pytest.raises(ValueError, match="unknown part digest"):
        native.fetch([job])


def test_a_bad_url_is_refused_without_showing_its_query(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError) as caught:
        native.fetch([spec(path, "ftp://host/key?X-Amz-Signature=deadbeef", 1, [(0, 0, 1, None)])])
    assert "ftp://host/key" in str(caught.value) and "deadbeef" not in str(caught.value)


@pytest.mark.parametrize("options", [{"concurrency": 0}, {"read_timeout": 0.0}, {"backoff_max": -1.0},
                                     {"progress_interval": float("nan")}])
def test_bad_limits_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, OverflowError)):
        native.fetch([], **options)


def test_zero_length_part_needs_no_request_and_is_reported_done(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    done: list[tuple[int, int]] = []
    stats = native.fetch([spec(path, SECRET_URL.format(port=closed_port), 0, [(7, 0, 0, EMPTY_SHA256)])],
                         progress=lambda delta, finished: done.extend(finished))
    assert stats == {"bytes": 0, "retries": 0, "parts": 1}
    assert done == [(0, 7)]


def test_missing_file_raises_file_write_error_with_errno(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "never-preallocated"
    with pytest.raises(native.FileWriteError) as caught:
        native.fetch([spec(path, SECRET_URL.format(port=closed_port), 4, [(0, 0, 4, None)])])
    assert caught.value.errno == errno.ENOENT
    assert not path.exists()  # never created: preallocation is the caller's job
    assert "deadbeef" not in str(caught.value) and str(path) in str(caught.value)


def test_refused_connection_is_retried_then_raises_transfer_error(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(native.TransferError) as caught:
        native.fetch([spec(path, SECRET_URL.format(port=closed_port), 100, [(3, 50, 50, None)])],
                     max_retries=2, backoff_base=0.001, backoff_max=0.01, connect_timeout=1.0)
    error = caught.value
    assert (error.attempts, error.part_index, error.offset, error.length) == (3, 3, 50, 50)
    message = str(error)
    assert "bytes 50-99" in message and str(path) in message
    assert "?" not in message and "deadbeef" not in message and "AKIA" not in message


def test_engine_maps_native_errors_to_agent_errors() -> None:
    def made(cls: type[Exception], **attrs: Any) -> Any:
        error = cls("f: bytes 0-9: boom (GET http://h/b/k?X-Amz-Signature=x)")
        for name, value in attrs.items():
            setattr(error, name, value)
        return error

    assert isinstance(translate(made(native.HttpStatusError, status=503)), StorageUnavailableError)
    assert isinstance(translate(made(native.HttpStatusError, status=416)), VerificationError)
    assert isinstance(translate(made(native.DigestMismatchError)), VerificationError)
    assert isinstance(translate(made(native.TransferError)), StorageUnavailableError)
    assert isinstance(translate(made(native.FileWriteError, errno=errno.ENOSPC)), DiskFullError)
    other = translate(made(native.FileWriteError, errno=errno.EACCES))
    assert isinstance(other, PermissionDeniedError) and other.exit_code == 2
    assert "X-Amz" not in str(other) and "?" not in str(other)


def test_engine_raises_storage_unavailable_when_the_server_is_down(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 10)
    job = BlobJob("blob", "key", SECRET_URL.format(port=closed_port), 10, path, (Part(0, 0, 10),))
    limits = TransferConfig(deadlines=Deadlines(connect=1.0),
                            retry=RetryPolicy(max_retries=1, base=0.001, cap=0.01))
    with pytest.raises(StorageUnavailableError) as caught:
        NativeEngine().fetch([job], limits, lambda n: None, lambda j, p: None)
    assert "deadbeef" not in caught.value.one_line()


def test_engine_is_picked_when_the_extension_loads() -> None:
    assert NativeEngine.available()
    assert pick_engine("native").name == "native"


def test_engine_is_unavailable_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(agent, "_native", raising=False)
    monkeypatch.setitem(sys.modules, "agent._native", None)  # makes the import fail
    assert not NativeEngine.available()


HTTPS_CHILD = """
import json, sys
from agent import _native
spec = json.loads(sys.stdin.read())
spec["parts"] = [tuple(p) for p in spec["parts"]]
print(json.dumps(_native.fetch([spec], concurrency=2)))
"""


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True, timeout=60)
    return cert, key


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `DATA` with 206 for `Range: bytes=a-b`, as an S3 server does."""

    protocol_version = "HTTP/1.1"
    data = b""
    ranges: list[tuple[int, int]] = []  # every range asked for, in order (a per-server copy)
    cut_after: list[int] = []  # for each of the first responses, the bytes sent before hanging up

    def do_GET(self) -> None:
        first, last = (int(n) for n in self.headers["Range"].removeprefix("bytes=").split("-"))
        self.ranges.append((first, last))
        body = self.data[first:last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after:
            self.wfile.write(body[:self.cut_after.pop(0)])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_private_ca_from_ssl_cert_file(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    data = os.urandom(300_000)
    handler = type("Handler", (RangeHandler,), {"data": data})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        path = tmp_path / "blob"
        path.write_bytes(b"\0" * len(data))
        parts: list[tuple[int, int, int, str | None]] = []
        for index, offset in enumerate(range(0, len(data), 100_000)):
            chunk = data[offset:offset + 100_000]
            parts.append((index, offset, len(chunk), hashlib.sha256(chunk).hexdigest()))
        url = f"https://127.0.0.1:{server.server_address[1]}/bucket/key?X-Amz-Signature=x"
        # The trust store is read once per process: a child process sees this SSL_CERT_FILE from the start.
        env = {**os.environ, "SSL_CERT_FILE": str(cert), "PYTHONPATH": str(Path(agent.__file__).parents[1])}
        result = subprocess.run([sys.executable, "-c", HTTPS_CHILD],
                                input=json.dumps(spec(path, url, len(data), parts)),
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["parts"] == 3
        assert path.read_bytes() == data
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def range_handler() -> type[RangeHandler]:
    """The handler class of `range_server`: its `ranges` log and `cut_after` faults."""
    return type("Handler", (RangeHandler,), {"data": os.urandom(300_000), "ranges": [], "cut_after": []})


@pytest.fixture
def range_server(range_handler: type[RangeHandler]) -> Iterator[tuple[str, bytes]]:
    """A plain-HTTP range server of 300 kB of random bytes: (URL, bytes)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), range_handler)
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # a cut is the test
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bucket/key?X-Amz-Signature=x", range_handler.data
    finally:
        server.shutdown()
        server.server_close()


def blake3_parts(data: bytes, size: int) -> list[tuple[int, int, int, str | None]]:
    chunks = [(offset, data[offset:offset + size]) for offset in range(0, len(data), size)]
    return [(i, offset, len(chunk), blake3.blake3(chunk).hexdigest())
            for i, (offset, chunk) in enumerate(chunks)]


LIE = blake3.blake3(b"not these bytes").hexdigest()


def blake3_job(tmp_path: Path, url: str, data: bytes, part_size: int,
               lie_at: int | None = None) -> tuple[Path, dict[str, Any]]:
    """A zeroed file for `data` and a job filling it, its parts of `part_size` checked by BLAKE3; the part
    at `lie_at` gets a wrong digest."""
    path = tmp_path / "blob"
    path.write_bytes(b"\0" * len(data))
    parts = blake3_parts(data, part_size)
    if lie_at is not None:
        parts[lie_at] = (*parts[lie_at][:3], LIE)
    return path, {**spec(path, url, len(data), parts), "part_digest": "blake3"}


FAST_RETRY = {"max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.01}


def test_parts_are_checked_by_blake3_when_the_job_says_so(tmp_path: Path,
                                                           range_server: tuple[str, bytes]) -> None:
    url, data = range_server
    path, job = blake3_job(tmp_path, url, data, 100_000)
    stats = native.fetch([job], concurrency=2)
    assert stats["parts"] == 3 and path.read_bytes() == data
    # The same BLAKE3 digests read as sha256 are wrong: the job's part_digest is what they are checked by.
    path.write_bytes(b"\0" * len(data))
    del job["part_digest"]
    with pytest.raises(native.DigestMismatchError, match="sha256"):
        native.fetch([job], max_retries=0)


def test_a_lying_blake3_part_digest_fails_the_fetch(tmp_path: Path, range_server: tuple[str, bytes]) -> None:
    url, data = range_server
    _, job = blake3_job(tmp_path, url, data, 100_000, lie_at=1)
    with pytest.raises(native.DigestMismatchError, match="BLAKE3") as caught:
        native.fetch([job], **FAST_RETRY)
    assert caught.value.expected == LIE


# -- runs: adjacent parts fetched with one request ----------------------------------------------------


def test_adjacent_parts_share_one_request_and_each_is_checked(
        tmp_path: Path, range_server: tuple[str, bytes], range_handler: type[RangeHandler]) -> None:
    """One stream, ten parts: runs of about a quarter of the bytes (here two or three parts) go in one
    ranged GET each, and every part is still checked by its own digest."""
    url, data = range_server
    path, job = blake3_job(tmp_path, url, data, 30_000)
    stats = native.fetch([job], concurrency=1)
    assert stats["parts"] == 10 and path.read_bytes() == data
    assert 2 <= len(range_handler.ranges) <= 5, range_handler.ranges
    assert range_handler.ranges[0][0] == 0 and range_handler.ranges[-1][1] == len(data) - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(range_handler.ranges))


def test_a_lying_digest_inside_a_run_refetches_from_that_part(
        tmp_path: Path, range_server: tuple[str, bytes], range_handler: type[RangeHandler]) -> None:
    url, data = range_server
    _, job = blake3_job(tmp_path, url, data, 30_000, lie_at=1)
    with pytest.raises(native.DigestMismatchError):
        native.fetch([job], concurrency=1, **FAST_RETRY)
    # the run's first request, then its retry from part 1 (the first part is not asked for again)
    assert range_handler.ranges[0][0] == 0 and range_handler.ranges[1][0] == 30_000


def test_a_run_cut_mid_part_resumes_at_the_first_missing_byte(
        tmp_path: Path, range_server: tuple[str, bytes], range_handler: type[RangeHandler]) -> None:
    url, data = range_server
    path, job = blake3_job(tmp_path, url, data, 30_000)
    range_handler.cut_after.append(45_000)  # half way through the run's second part
    stats = native.fetch([job], concurrency=1, **FAST_RETRY)
    assert stats["retries"] == 1 and path.read_bytes() == data
    assert range_handler.ranges[1][0] == 45_000  # neither part 0 nor the first half of part 1 again
