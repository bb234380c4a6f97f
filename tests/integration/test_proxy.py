"""Every engine pulls through an HTTP forward proxy named by HTTP_PROXY, and NO_PROXY is honoured.

The proxy is the fault proxy acting as a forward proxy on loopback (it logs each request it carried,
absolute-form or not, with the bytes it answered). The agent's MINIO_ENDPOINT names a host that does not
resolve (`s3.simswarm.test`, RFC 6761's reserved `.test`): without the proxy no byte could arrive, so a
valid cache, plus the proxy's log of every blob's bytes, shows the whole pull went through it. A name,
not 127.0.0.1, also because Go's ProxyFromEnvironment (s5cmd) never proxies a loopback address: the
last test pins that down.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent.demo.seaweed import SeaweedServer
from tests.support.cli import clean_env, run_agent
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache
from tests.support.staged import NATIVE, S5CMD, s5cmd_available

UNRESOLVABLE = "s3.simswarm.test"


@pytest.fixture
def forward_proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as p:
        yield p


def pull(s3_server: SeaweedServer, bucket: str, repo_id: str, engine: str, home: Path, endpoint: str,
         **proxy_env: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(proxies=False, **{**s3_server.env(bucket), "MINIO_ENDPOINT": endpoint}, **proxy_env)
    return run_agent("--log-format", "json", "pull", repo_id, "--engine", engine, "--hf-home", str(home),
                     "--no-fallback", "--report", str(home / "report.json"), env=env)


def blob_bytes(proxy: FaultProxy, *, absolute: bool) -> int:
    return sum(r.size for r in proxy.requests("GET") if "/blobs/" in r.path and r.absolute == absolute)


@pytest.mark.parametrize("engine", ["python", NATIVE, S5CMD])
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_every_engine_pulls_through_the_http_proxy(
        engine: str, variable: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    port = urlsplit(s3_server.endpoint_url).port
    done = pull(s3_server, staged_bucket, model_repo[0], engine, tmp_path, f"http://{UNRESOLVABLE}:{port}",
                **{variable: forward_proxy.endpoint_url})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == "minio" and report["engine"] == engine
    assert_clean_cache(tmp_path / "hub")
    carried = forward_proxy.requests()
    assert carried and all(r.absolute and r.host == f"{UNRESOLVABLE}:{port}" for r in carried)
    assert any(r.method == "GET" and "/blobs/" not in r.path for r in carried)  # boto3's listing too
    through = blob_bytes(forward_proxy, absolute=True)
    print(f"\n{engine} via {variable}: {len(carried)} requests, {through} blob bytes through the proxy")
    assert through >= int(report["bytes_downloaded"]) > 0


@pytest.mark.parametrize("engine", ["python", NATIVE])
def test_no_proxy_sends_the_pull_past_the_proxy(
        engine: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    done = pull(s3_server, staged_bucket, model_repo[0], engine, tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url, NO_PROXY="localhost,127.0.0.1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert forward_proxy.count() == 0


@pytest.mark.parametrize("engine", ["python", NATIVE])
def test_loopback_is_proxied_like_any_host_without_no_proxy(
        engine: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """As curl and boto3 do: a node-local proxy in front of a loopback port-forward still sees it."""
    done = pull(s3_server, staged_bucket, model_repo[0], engine, tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert blob_bytes(forward_proxy, absolute=True) > 0 and blob_bytes(forward_proxy, absolute=False) == 0


@pytest.mark.skipif(not s5cmd_available(), reason="no s5cmd")
def test_s5cmd_never_proxies_a_loopback_endpoint(
        forward_proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    """Go's ProxyFromEnvironment skips localhost and loopback IPs whatever NO_PROXY says: the s5cmd
    engine's bytes go direct while boto3's listing goes through the proxy. Documented in the README."""
    done = pull(s3_server, staged_bucket, model_repo[0], "s5cmd", tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert forward_proxy.count("GET") > 0  # the listing and manifest (boto3)
    assert blob_bytes(forward_proxy, absolute=True) == 0
