"""No hang: a server that trickles or never answers ends the pull with exit 3 or the Hub fallback.

The agent runs as a process (`python -m agent pull`), its MINIO_ENDPOINT a fault proxy in front of
SeaweedFS that sends a chosen response at one byte every 2 s ("trickle", each byte restarting any read
timeout) or accepts the connection and never answers ("stall_head" for 300 s). The deadlines come from
the environment (`SIMSWARM_*`, agent.settings.Deadlines) with small values, so each case takes seconds;
the only time bound is the test's own process timeout, the issue's limits: 60 s for a trickle, 30 s for
a silent server. Without the deadlines (before issue 12) the listing trickled for ever and a silent
server cost 121 s (listing) or 214 s (blob GET): these tests time out there.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.demo.seaweed import SeaweedServer
from tests.support.cli import clean_env, run_agent
from tests.support.fake_hub import FakeHub
from tests.support.fault_server import FaultProxy
from tests.support.staged import ENGINES

TRICKLE_LIMIT = 60  # seconds: the bound for a server sending a byte every 2 s
SILENT_LIMIT = 30  # seconds: the bound for a server that accepts and never answers
# A first-byte (and silence) limit longer than the trickle's 2 s gaps, so the minimum rate is what trips.
DEADLINES = {"SIMSWARM_CONNECT_TIMEOUT": "1", "SIMSWARM_FIRST_BYTE_TIMEOUT": "3",
             "SIMSWARM_MIN_RATE_KIB": "1", "SIMSWARM_RATE_WINDOW": "3", "SIMSWARM_STALL_RETRIES": "1"}
Matcher = Callable[[str, str, "str | None"], bool]


@pytest.fixture
def proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True, stall_seconds=2.0) as p:
        yield p


def listing(bucket: str) -> Matcher:
    return lambda method, path, _range: method == "GET" and path.rstrip("/") == f"/{bucket}"


def blob_get(method: str, path: str, _range: str | None) -> bool:
    return method == "GET" and "/blobs/" in path and path.endswith(tuple("0123456789abcdef"))


Outcome = tuple[subprocess.CompletedProcess[str], "dict[str, object] | None"]


def run_pull(proxy: FaultProxy, s3_server: SeaweedServer, bucket: str, repo_id: str, engine: str,
             home: Path, limit: int, *, fallback: FakeHub | None = None) -> Outcome:
    env = clean_env(**{**s3_server.env(bucket), "MINIO_ENDPOINT": proxy.endpoint_url},
                    HF_HUB_DISABLE_XET="1", **DEADLINES)
    argv = ["--log-format", "json", "pull", repo_id, "--engine", engine, "--hf-home", str(home), "--report",
            str(home / "report.json")]
    if fallback is None:
        argv.append("--no-fallback")
    else:
        env["HF_ENDPOINT"] = fallback.endpoint
    started = time.monotonic()
    done = run_agent(*argv, env=env, timeout=limit)
    print(f"\n{engine}: exit {done.returncode} after {time.monotonic() - started:.1f} s (limit {limit} s)")
    report = home / "report.json"
    return done, json.loads(report.read_text()) if report.exists() else None


def assert_exit_3_one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 3, done.stderr[-2000:]
    last = json.loads(done.stderr.strip().splitlines()[-1])
    assert last["event"] == "error" and "\n" not in last["message"]
    assert "Traceback" not in done.stderr and "X-Amz-Signature" not in done.stderr
    return str(last["message"])


def test_a_listing_sent_one_byte_every_2s_ends_in_exit_3(
        proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    proxy.add_fault("trickle", count=10_000, match=listing(staged_bucket))
    done, _ = run_pull(proxy, s3_server, staged_bucket, model_repo[0], "auto", tmp_path, TRICKLE_LIMIT)
    message = assert_exit_3_one_line(done)
    assert "stalled" in message, message
    assert proxy.count(fault="trickle") == 2  # stall_retries=1: one retry, then it gives up


def test_a_listing_that_never_answers_ends_in_exit_3(
        proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    proxy.add_fault("stall_head", count=10_000, match=listing(staged_bucket), stall_seconds=300)
    done, _ = run_pull(proxy, s3_server, staged_bucket, model_repo[0], "auto", tmp_path, SILENT_LIMIT)
    assert "first-byte" in assert_exit_3_one_line(done)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_blob_sent_one_byte_every_2s_ends_in_exit_3(
        engine: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    proxy.add_fault("trickle", count=10_000, match=blob_get)
    done, _ = run_pull(proxy, s3_server, staged_bucket, model_repo[0], engine, tmp_path, TRICKLE_LIMIT)
    message = assert_exit_3_one_line(done)
    print(f"\ntrickled blob ({engine}): {message}")
    assert proxy.count(fault="trickle") >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_blob_get_that_never_answers_ends_in_exit_3(
        engine: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    proxy.add_fault("stall_head", count=10_000, match=blob_get, stall_seconds=300)
    done, _ = run_pull(proxy, s3_server, staged_bucket, model_repo[0], engine, tmp_path, SILENT_LIMIT)
    print(f"\nsilent blob GET ({engine}): {assert_exit_3_one_line(done)[:200]}")


def test_a_trickling_bucket_falls_back_to_the_hub(
        proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str],
        fake_hub: FakeHub, tmp_path: Path) -> None:
    proxy.add_fault("trickle", count=10_000, match=blob_get)
    done, report = run_pull(proxy, s3_server, staged_bucket, model_repo[0], "auto", tmp_path, TRICKLE_LIMIT,
                            fallback=fake_hub)
    assert done.returncode == 0, done.stderr[-2000:]
    assert report is not None and report["source"] == "hub"
    reason = str(report["fallback_reason"])
    # the rate rule, or on a loaded machine a gap past the silence limit: either is the deadline working
    assert "below the minimum" in reason or "no data for" in reason, reason
