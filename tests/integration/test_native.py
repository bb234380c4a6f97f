"""The native fast path (`agent._native.fetch`) and its engine wrapper against a real S3 server (SeaweedFS),
with faults injected by a reverse proxy in front of it: every fault must end in the right bytes after a
retry the proxy log shows, or in the named error, never a query string in a message."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.demo.seaweed import SeaweedServer
from agent.engines.base import BlobJob, Part, TransferConfig
from agent.errors import CredentialsError, NotFoundError, StorageUnavailableError, VerificationError
from agent.policy import RetryPolicy
from agent.settings import Deadlines
from tests.support.fault_server import FaultKind, FaultProxy

native = pytest.importorskip("agent._native")
from agent.engines.native import NativeEngine  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20
FILL = 0xAA  # what a preallocated file holds before any part lands
FAST = {"connect_timeout": 2.0, "read_timeout": 2.0, "backoff_base": 0.01, "backoff_max": 0.05}


@dataclass(frozen=True)
class Blob:
    key: str
    data: bytes
    url: str  # presigned against the S3 server itself

    def parts(self, part_size: int, *, digests: bool = True) -> list[tuple[int, int, int, str | None]]:
        out = []
        for index, offset in enumerate(range(0, len(self.data), part_size)):
            chunk = self.data[offset:offset + part_size]
            out.append((index, offset, len(chunk), hashlib.sha256(chunk).hexdigest() if digests else None))
        return out


@pytest.fixture(scope="module")
def blob_bucket(s3_server: SeaweedServer) -> str:
    return s3_server.create_bucket("native-engine-tests")


def upload(server: SeaweedServer, bucket: str, key: str, data: bytes) -> Blob:
    client = server.client()
    client.put_object(Bucket=bucket, Key=key, Body=data)
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900)
    return Blob(key, data, url)


@pytest.fixture(scope="module")
def blob(s3_server: SeaweedServer, blob_bucket: str) -> Blob:
    """3 MiB and a ragged tail of random bytes: parts of 512 KiB end with a short one."""
    return upload(s3_server, blob_bucket, "models/hf-cache/blobs/random", os.urandom(3 * MIB + 12345))


@pytest.fixture(scope="module")
def small_blob(s3_server: SeaweedServer, blob_bucket: str) -> Blob:
    """Two parts of 256 KiB: enough to put a fault on the second (offset > 0) and keep tests quick."""
    return upload(s3_server, blob_bucket, "models/hf-cache/blobs/small", os.urandom(512 * KIB))


@pytest.fixture
def proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, stall_seconds=10.0) as server:
        yield server


def preallocated(tmp_path: Path, size: int, name: str = "blob.incomplete") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes([FILL]) * size)
    return path


def job(url: str, path: Path, size: int, parts: list[tuple[int, int, int, str | None]]) -> dict[str, Any]:
    return {"url": url, "headers": None, "path": str(path), "size": size, "parts": parts}


def fetch(url: str, path: Path, size: int, parts: list[tuple[int, int, int, str | None]],
          **options: Any) -> dict[str, int]:
    stats: dict[str, int] = native.fetch([job(url, path, size, parts)], **{**FAST, **options})
    return stats


def assert_no_secret(text: str) -> None:
    assert "?" not in text and "X-Amz" not in text and "Signature" not in text, text


# -- bytes land where they belong ---------------------------------------------------------------------

def test_every_part_lands_at_its_offset_over_reused_connections(blob: Blob, proxy: FaultProxy,
                                                                tmp_path: Path) -> None:
    path = preallocated(tmp_path, len(blob.data))
    parts = blob.parts(512 * KIB)
    stats = fetch(proxy.url_for(blob.url), path, len(blob.data), parts, concurrency=3)
    assert path.read_bytes() == blob.data
    assert stats == {"bytes": len(blob.data), "retries": 0, "parts": len(parts)}
    assert proxy.count("GET") == len(parts)
    assert proxy.max_in_flight <= 3
    assert proxy.connections < len(parts)  # kept-alive connections were reused for later parts


def test_parts_not_listed_are_left_untouched(blob: Blob, tmp_path: Path) -> None:
    path = preallocated(tmp_path, len(blob.data))
    parts = blob.parts(1 * MIB)
    chosen = [parts[0], parts[2]]
    fetch(blob.url, path, len(blob.data), chosen)
    written = path.read_bytes()
    for _, offset, length, _ in chosen:
        assert written[offset:offset + length] == blob.data[offset:offset + length]
    for _, offset, length, _ in (parts[1], parts[3]):
        assert written[offset:offset + length] == bytes([FILL]) * length
    assert len(written) == len(blob.data)  # opened for writing, never truncated or extended


def test_wrong_expected_digest_raises_digest_mismatch_naming_file_and_range(blob: Blob,
                                                                            tmp_path: Path) -> None:
    path = preallocated(tmp_path, len(blob.data))
    index, offset, length, _ = blob.parts(1 * MIB)[1]
    with pytest.raises(native.DigestMismatchError) as caught:
        fetch(blob.url, path, len(blob.data), [(index, offset, length, "0" * 64)], max_retries=2)
    message = str(caught.value)
    assert str(path) in message and f"bytes {offset}-{offset + length - 1}" in message
    assert_no_secret(message)
    error = caught.value
    assert (error.offset, error.length, error.part_index, error.attempts) == (offset, length, index, 3)
    assert error.expected == "0" * 64
    assert error.actual == hashlib.sha256(blob.data[offset:offset + length]).hexdigest()


# -- every fault is survived, and the proxy log shows the retry ---------------------------------------

RETRIED: list[FaultKind] = ["reset", "truncate", "stall", "stall_head", "flip", "slowdown", "error500"]
ACCEPTED: list[FaultKind] = ["range_as_200", "full_200"]


@pytest.mark.parametrize("kind", RETRIED + ACCEPTED)
def test_fault_on_a_part_ends_with_correct_bytes(kind: FaultKind, small_blob: Blob, proxy: FaultProxy,
                                                 tmp_path: Path) -> None:
    size = len(small_blob.data)
    parts = small_blob.parts(256 * KIB)
    _, second_offset, second_length, _ = parts[1]
    second_range = f"bytes={second_offset}-{second_offset + second_length - 1}"
    proxy.add_fault(kind, match=lambda method, path, range_: range_ == second_range)
    path = preallocated(tmp_path, size)
    started = time.monotonic()
    stats = fetch(proxy.url_for(small_blob.url), path, size, parts, concurrency=1, connect_timeout=0.3,
                  read_timeout=0.3, backoff_max=2.0)
    elapsed = time.monotonic() - started

    assert path.read_bytes() == small_blob.data
    assert proxy.count(fault=kind) == 1
    gets = proxy.requests("GET")
    if kind in ACCEPTED:
        assert stats["retries"] == 0 and len(gets) == len(parts)
        return
    assert stats["retries"] == 1 and len(gets) == len(parts) + 1
    retry = gets[-1]
    assert retry.fault is None and retry.status == 206
    if kind in ("reset", "truncate", "stall"):
        # the first half of the part arrived: the retry asks only for what is missing
        assert retry.range is not None
        resumed_at = int(retry.range.removeprefix("bytes=").split("-")[0])
        assert second_offset < resumed_at < second_offset + second_length
    else:
        assert retry.range == second_range
    if kind == "slowdown":
        assert elapsed >= 0.9  # Retry-After: 1 was honoured (backoff alone would wait at most 0.01 s)


def test_retry_after_is_capped_by_backoff_max_and_retries_run_out(small_blob: Blob, proxy: FaultProxy,
                                                                   tmp_path: Path) -> None:
    proxy.add_fault("slowdown", count=100)
    path = preallocated(tmp_path, len(small_blob.data))
    started = time.monotonic()
    with pytest.raises(native.HttpStatusError) as caught:
        fetch(proxy.url_for(small_blob.url), path, len(small_blob.data), small_blob.parts(512 * KIB),
              max_retries=2, backoff_max=0.05)
    assert time.monotonic() - started < 1.5  # two honoured Retry-After: 1 waits would take 2 s; capped: 0.1 s
    assert caught.value.status == 503 and caught.value.attempts == 3
    assert proxy.count("GET") == 3
    assert_no_secret(str(caught.value))


def test_bad_signature_is_fatal_at_once(small_blob: Blob, proxy: FaultProxy, tmp_path: Path) -> None:
    url = small_blob.url
    at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    tampered = url[:at] + ("0" if url[at] != "0" else "1") + url[at + 1:]
    path = preallocated(tmp_path, len(small_blob.data))
    with pytest.raises(native.HttpStatusError) as caught:
        fetch(proxy.url_for(tampered), path, len(small_blob.data), small_blob.parts(512 * KIB), max_retries=5)
    assert caught.value.status == 403 and caught.value.attempts == 1
    assert proxy.count("GET") == 1
    assert_no_secret(str(caught.value))


def test_missing_object_is_fatal_at_once(s3_server: SeaweedServer, blob_bucket: str, proxy: FaultProxy,
                                         tmp_path: Path) -> None:
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": blob_bucket, "Key": "models/no-such-blob"}, ExpiresIn=900)
    path = preallocated(tmp_path, 10)
    with pytest.raises(native.HttpStatusError) as caught:
        fetch(proxy.url_for(url), path, 10, [(0, 0, 10, None)], max_retries=5)
    assert caught.value.status == 404
    assert proxy.count("GET") == 1


# -- cancellation -------------------------------------------------------------------------------------

class Cancelled(Exception):
    pass


def test_progress_callback_that_raises_stops_a_stalled_transfer(small_blob: Blob, proxy: FaultProxy,
                                                                 tmp_path: Path) -> None:
    proxy.add_fault("stall", count=100, stall_seconds=20.0)
    calls = 0

    def progress(delta: int, done: list[tuple[int, int]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise Cancelled("stop")

    path = preallocated(tmp_path, len(small_blob.data))
    started = time.monotonic()
    with pytest.raises(Cancelled):
        fetch(proxy.url_for(small_blob.url), path, len(small_blob.data), small_blob.parts(256 * KIB),
              read_timeout=30.0, progress=progress, progress_interval=0.05)
    assert time.monotonic() - started < 10.0  # the stalled requests would have taken 20 s


def test_progress_reports_every_byte_once_and_every_part_once(blob: Blob, proxy: FaultProxy,
                                                              tmp_path: Path) -> None:
    proxy.add_fault("reset", count=2)
    proxy.add_fault("flip")
    parts = blob.parts(512 * KIB)
    total = 0
    done: list[tuple[int, int]] = []

    def progress(delta: int, finished: list[tuple[int, int]]) -> None:
        nonlocal total
        total += delta
        done.extend(finished)

    path = preallocated(tmp_path, len(blob.data))
    stats = fetch(proxy.url_for(blob.url), path, len(blob.data), parts, concurrency=4, progress=progress)
    assert path.read_bytes() == blob.data
    assert total == len(blob.data) == stats["bytes"]  # resumed and re-fetched bytes are not counted twice
    assert sorted(done) == [(0, index) for index, *_ in parts]
    assert stats["retries"] == 3


SIGTERM_SCRIPT = textwrap.dedent("""
    import json, signal, sys
    from agent import _native

    class Terminated(Exception):
        pass

    def on_sigterm(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    spec = json.loads(sys.stdin.readline())
    spec["parts"] = [tuple(part) for part in spec["parts"]]
    first = True

    def progress(delta, done):
        global first
        if first:
            print("fetching", flush=True)
            first = False

    _native.fetch([spec], read_timeout=60.0, progress=progress, progress_interval=0.05)
""")


def test_sigterm_handler_that_raises_ends_the_transfer_promptly(small_blob: Blob, proxy: FaultProxy,
                                                                tmp_path: Path) -> None:
    proxy.add_fault("stall_head", count=100, stall_seconds=30.0)
    path = preallocated(tmp_path, len(small_blob.data))
    spec = job(proxy.url_for(small_blob.url), path, len(small_blob.data), small_blob.parts(256 * KIB))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(spec) + "\n")  # the presigned URL goes by pipe, not by argv
        child.stdin.flush()
        line = child.stdout.readline().strip()
        assert line == "fetching", child.communicate(timeout=10)[1]
        deadline = time.monotonic() + 10
        while proxy.max_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until the GETs are in the proxy's hands, stalled
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=10)
        assert time.monotonic() - sent < 5.0  # the stalled GETs would answer after 30 s
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 1
    assert "Terminated: signal 15" in stderr
    assert_no_secret(stderr)


# -- the engine wrapper -------------------------------------------------------------------------------

def blob_job(blob: Blob, url: str, path: Path, part_size: int) -> BlobJob:
    parts = tuple(Part(index, offset, length, sha) for index, offset, length, sha in blob.parts(part_size))
    return BlobJob(blob.key.rsplit("/", 1)[-1], blob.key, url, len(blob.data), path, parts)


LIMITS = TransferConfig(concurrency=4, deadlines=Deadlines(connect=2.0, first_byte=0.5),
                        retry=RetryPolicy(max_retries=3, base=0.01, cap=0.05))


def test_engine_reports_each_part_once_and_every_byte(blob: Blob, small_blob: Blob, proxy: FaultProxy,
                                                      tmp_path: Path) -> None:
    proxy.add_fault("truncate", count=2)
    jobs = [blob_job(blob, proxy.url_for(blob.url), preallocated(tmp_path, len(blob.data), "a"), 512 * KIB),
            blob_job(small_blob, proxy.url_for(small_blob.url),
                     preallocated(tmp_path, len(small_blob.data), "b"), 128 * KIB)]
    finished: Counter[tuple[str, int]] = Counter()
    progressed = 0
    lock = threading.Lock()

    def progress(n: int) -> None:
        nonlocal progressed
        progressed += n

    def on_part_done(done_job: BlobJob, part: Part) -> None:
        with lock:
            finished[(done_job.blob_name, part.index)] += 1

    engine = NativeEngine()
    engine.fetch(jobs, LIMITS, progress, on_part_done)
    assert jobs[0].temp_path.read_bytes() == blob.data
    assert jobs[1].temp_path.read_bytes() == small_blob.data
    expected = {(j.blob_name, p.index) for j in jobs for p in j.parts}
    assert set(finished) == expected and set(finished.values()) == {1}
    assert progressed == len(blob.data) + len(small_blob.data)
    assert engine.retries == 2


def test_engine_maps_errors_to_the_agents(small_blob: Blob, s3_server: SeaweedServer, blob_bucket: str,
                                          proxy: FaultProxy, tmp_path: Path) -> None:
    path = preallocated(tmp_path, len(small_blob.data))
    engine = NativeEngine()

    limits = replace(LIMITS, deadlines=replace(LIMITS.deadlines, first_byte=0.2),
                     retry=replace(LIMITS.retry, max_retries=1))

    def run(url: str, *, sha: str | None = None) -> None:
        part = Part(0, 0, len(small_blob.data), sha)
        engine.fetch([BlobJob("b", small_blob.key, url, len(small_blob.data), path, (part,))], limits,
                     lambda n: None, lambda j, p: None)

    tampered = small_blob.url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(CredentialsError) as denied:
        run(tampered)
    missing = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": blob_bucket, "Key": "nothing-here"}, ExpiresIn=900)
    with pytest.raises(NotFoundError):
        run(missing)
    with pytest.raises(VerificationError):
        run(small_blob.url, sha="f" * 64)
    proxy.add_fault("stall", count=100)
    with pytest.raises(StorageUnavailableError) as stalled:
        run(proxy.url_for(small_blob.url))
    assert proxy.count(fault="stall") == limits.retry.max_retries + 1
    for error in (denied.value, stalled.value):
        assert_no_secret(str(error))
        assert str(path) in str(error)
