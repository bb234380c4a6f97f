"""Every engine pulls through an HTTP forward proxy named by HTTP_PROXY, and NO_PROXY is honoured.

The proxy is the fault proxy acting as a forward proxy on loopback (it logs each request it carried,
absolute-form or not, with the bytes it answered). The agent's MINIO_ENDPOINT names a host that does not
resolve (`s3.simswarm.test`, RFC 6761's reserved `.test`): without the proxy no byte could arrive, so a
valid cache, plus the proxy's log of every blob's bytes, shows the whole pull went through it. A name,
not 127.0.0.1, also because Go's ProxyFromEnvironment (s5cmd) never proxies a loopback address: the
last test pins that down.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent.output import Output
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from agent.testbed.seaweed import SeaweedServer
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache

ROOT = Path(__file__).resolve().parents[2]
UNRESOLVABLE = "s3.simswarm.test"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _native_available() -> bool:
    from agent.engines.native import NativeEngine

    return NativeEngine.available()


def _s5cmd_available() -> bool:
    from agent.engines.s5cmd import S5cmdEngine

    return S5cmdEngine.available()


NATIVE = pytest.param("native", marks=pytest.mark.skipif(not _native_available(), reason="no native ext"))
S5CMD = pytest.param("s5cmd", marks=pytest.mark.skipif(not _s5cmd_available(), reason="no s5cmd"))


@pytest.fixture(scope="module")
def staged(s3_server: SeaweedServer, hf_cache_ro: Path, model_repo: tuple[str, str]) -> str:
    bucket = s3_server.create_bucket("t-proxy")
    stage_from_cache(Store(Settings.from_env(s3_server.env(bucket))), hf_cache_ro, model_repo[0], "main",
                     Output(io.StringIO(), json_mode=True), part_size=1 << 16)
    return bucket


@pytest.fixture
def forward_proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as p:
        yield p


def pull(s3_server: SeaweedServer, bucket: str, repo_id: str, engine: str, home: Path, endpoint: str,
         **proxy_env: str) -> subprocess.CompletedProcess[str]:
    own = ("HF_", "HUGGINGFACE_", "MINIO_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own) and k.lower() not in PROXY_VARIABLES}
    env.update(s3_server.env(bucket), MINIO_ENDPOINT=endpoint, PYTHONPATH=str(ROOT),
               HF_HUB_DISABLE_TELEMETRY="1", **proxy_env)
    argv = [sys.executable, "-m", "agent", "--log-format", "json", "pull", repo_id, "--engine", engine,
            "--hf-home", str(home), "--no-fallback", "--report", str(home / "report.json")]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def blob_bytes(proxy: FaultProxy, *, absolute: bool) -> int:
    return sum(r.size for r in proxy.requests("GET") if "/blobs/" in r.path and r.absolute == absolute)


@pytest.mark.parametrize("engine", ["python", NATIVE, S5CMD])
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_every_engine_pulls_through_the_http_proxy(
        engine: str, variable: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    port = urlsplit(s3_server.endpoint_url).port
    done = pull(s3_server, staged, model_repo[0], engine, tmp_path, f"http://{UNRESOLVABLE}:{port}",
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
        engine: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    done = pull(s3_server, staged, model_repo[0], engine, tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url, NO_PROXY="localhost,127.0.0.1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert forward_proxy.count() == 0


@pytest.mark.parametrize("engine", ["python", NATIVE])
def test_loopback_is_proxied_like_any_host_without_no_proxy(
        engine: str, forward_proxy: FaultProxy, s3_server: SeaweedServer, staged: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """As curl and boto3 do: a node-local proxy in front of a loopback port-forward still sees it."""
    done = pull(s3_server, staged, model_repo[0], engine, tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert blob_bytes(forward_proxy, absolute=True) > 0 and blob_bytes(forward_proxy, absolute=False) == 0


@pytest.mark.skipif(not _s5cmd_available(), reason="no s5cmd")
def test_s5cmd_never_proxies_a_loopback_endpoint(
        forward_proxy: FaultProxy, s3_server: SeaweedServer, staged: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    """Go's ProxyFromEnvironment skips localhost and loopback IPs whatever NO_PROXY says: the s5cmd
    engine's bytes go direct while boto3's listing goes through the proxy. Documented in the README."""
    done = pull(s3_server, staged, model_repo[0], "s5cmd", tmp_path, s3_server.endpoint_url,
                HTTP_PROXY=forward_proxy.endpoint_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert forward_proxy.count("GET") > 0  # the listing and manifest (boto3)
    assert blob_bytes(forward_proxy, absolute=True) == 0
