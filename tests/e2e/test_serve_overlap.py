"""`serve`'s overlapped start, with a stand-in vLLM that runs the plugin's protocol (tests/support/
fake_vllm.py): vLLM exec'd once the configs are in place, each weight read only once verified, the
background pull's end, its failure, and what SIGTERM and SIGKILL of the pod's main process leave.
The real vLLM serving from such a start is tests/e2e/test_vllm_serve.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.manifest import Manifest
from agent.serving.arrivals import ENV_ARRIVALS, ENV_BACKGROUND_PID, LOAD_FORMAT
from agent.settings import Settings
from tests.support.cli import hub_agent_env, live_group_members, run_agent, start_agent
from tests.support.fake_hub import FakeHub
from tests.support.fake_vllm import fake_vllm_env, read_record
from tests.support.fault_server import FaultProxy
from tests.support.staged import bucket_manifest
from tests.support.throttle import ThrottledLink

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the overlapped start needs fork")

WEIGHT_SUFFIX = ".safetensors"


@pytest.fixture(scope="module")
def fake_vllm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_vllm_env(tmp_path_factory.mktemp("fake-vllm") / "venv")


@pytest.fixture
def manifest(settings: Settings, staged: tuple[str, str]) -> Manifest:
    return bucket_manifest(settings, staged[0])


def weights_of(manifest: Manifest) -> dict[str, str]:
    """weight path -> its sha256 (the tiny model's shards are LFS files)."""
    return {p: e.lfs_sha256 or "" for p, e in manifest.files.items() if p.endswith(WEIGHT_SUFFIX)}


def pod_env(hub: FakeHub, home: Path, storage: dict[str, str], record: Path, **extra: str) -> dict[str, str]:
    env = hub_agent_env(hub, home, storage)
    env.update(VLLM_STUB_RECORD=str(record), SIMSWARM_MIN_RATE_KIB="0", **extra)
    return env


def serve_argv(repo_id: str, vllm: Path, *more: str) -> list[str]:
    return ["--log-format", "json", "serve", repo_id, "--no-fallback", "--vllm-bin", str(vllm), *more]


def events(stderr: str) -> list[dict[str, object]]:
    found = []
    for line in stderr.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def wait_until(check: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture
def slow_link(s3_server: SeaweedServer, settings_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The test's bucket behind a link of 200 kB/s: the tiny model's weights take a few seconds."""
    with ThrottledLink(("127.0.0.1", s3_server.s3_port), rate=200e3) as link:
        yield {**settings_env, "MINIO_ENDPOINT": link.endpoint}


def test_vllm_starts_before_the_weights_and_reads_each_only_once_verified(
        fake_hub: FakeHub, staged: tuple[str, str], manifest: Manifest, slow_link: dict[str, str],
        fake_vllm: Path, tmp_path: Path) -> None:
    repo_id, commit = staged
    record, report, home = tmp_path / "record.json", tmp_path / "report.json", tmp_path / "home"
    proc = run_agent(*serve_argv(repo_id, fake_vllm, "--report", str(report)),
                     env=pod_env(fake_hub, home, slow_link, record))
    assert proc.returncode == 0, proc.stderr
    seen = read_record(record)
    assert seen["argv"][:4] == [str(fake_vllm), "serve", repo_id, "--served-model-name"]
    assert seen["argv"][-2:] == ["--load-format", LOAD_FORMAT]
    assert seen["env"][ENV_ARRIVALS] and seen["env"][ENV_BACKGROUND_PID]
    assert "MINIO_SECRET_KEY" not in seen["env"]
    # vLLM read exactly the weights, in its order, each holding its true bytes.
    assert [p for p, _ in seen["loaded"]] == sorted(weights_of(manifest))
    assert dict(seen["loaded"]) == weights_of(manifest)
    assert seen["served"]
    # vLLM started while weights were still on their way: the handoff came before the last blob.
    names = [e["event"] for e in events(proc.stderr)]
    assert names.index("serve.exec") < names.index("pull.done")
    assert "every weight file has arrived" in proc.stderr
    # The background pull wrote its report at its end; the cache is what `pull` leaves.
    assert json.loads(report.read_text())["commit"] == commit
    verify = run_agent("verify", repo_id, "--hf-home", str(home), env=pod_env(fake_hub, home, {}, record))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not list((RepoCache(home / "hub", repo_id).state / "arrivals").glob("*.json"))


def test_a_warm_cache_execs_vllm_with_its_own_loader_and_leaves_nothing_running(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], fake_vllm: Path,
        tmp_path: Path) -> None:
    repo_id, _ = staged
    record, home = tmp_path / "record.json", tmp_path / "home"
    env = pod_env(fake_hub, home, settings_env, record)
    assert run_agent(*serve_argv(repo_id, fake_vllm), env=env).returncode == 0
    proc = run_agent(*serve_argv(repo_id, fake_vllm), env=env)  # the restart of a pod with its volume
    assert proc.returncode == 0, proc.stderr
    seen = read_record(record)
    assert "--load-format" not in seen["argv"] and ENV_ARRIVALS not in seen["env"]
    assert seen["loaded"] == [] and seen["served"]
    assert "serve.first" not in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env", "load-format"])
def test_the_users_choice_keeps_the_pull_before_vllm(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], fake_vllm: Path,
        tmp_path: Path, how: str) -> None:
    record = tmp_path / "record.json"
    extra = {"SIMSWARM_OVERLAP": "false"} if how == "env" else {}
    more = {"flag": ["--no-overlap"], "env": [], "load-format": ["--", "--load-format", "safetensors"]}[how]
    proc = run_agent(*serve_argv(staged[0], fake_vllm, *more),
                     env=pod_env(fake_hub, tmp_path / "home", settings_env, record, **extra))
    assert proc.returncode == 0, proc.stderr
    seen = read_record(record)
    assert ENV_ARRIVALS not in seen["env"] and LOAD_FORMAT not in seen["argv"]
    [order] = [e for e in events(proc.stderr) if e["event"] == "serve.order"]
    assert "before vLLM starts" in str(order["message"])
    names = [e["event"] for e in events(proc.stderr)]
    assert names.index("pull.done") < names.index("serve.exec")


def test_a_vllm_without_the_plugin_gets_the_whole_pull_first(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], tmp_path: Path) -> None:
    """The plain recording stub of test_serve.py: this interpreter has no vllm distribution."""
    from tests.e2e.test_serve import STUB

    vllm, record = tmp_path / "vllm", tmp_path / "record.json"
    vllm.write_text(STUB.format(python=sys.executable))
    vllm.chmod(0o755)
    env = pod_env(fake_hub, tmp_path / "home", settings_env, record)
    proc = run_agent(*serve_argv(staged[0], vllm), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "vllm distribution" in proc.stderr
    seen = json.loads(record.read_text())
    assert ENV_ARRIVALS not in seen["env"] and LOAD_FORMAT not in seen["argv"]


def test_weights_that_never_arrive_stop_vllm_with_the_agents_line_and_code(
        fake_hub: FakeHub, s3_server: SeaweedServer, staged: tuple[str, str], manifest: Manifest,
        settings_env: dict[str, str], fake_vllm: Path, tmp_path: Path) -> None:
    """Every GET of a weight blob stalls; the agent's deadlines end the pull with exit 3, and vLLM's main
    process (the watcher) ends vLLM with it."""
    blobs = {e.blob_name for p, e in manifest.files.items() if p.endswith(WEIGHT_SUFFIX)}
    record = tmp_path / "record.json"
    with FaultProxy(s3_server.endpoint_url, preserve_host=True, stall_seconds=60) as proxy:
        proxy.add_fault("stall_head", count=1000, match=lambda m, path, r: any(b in path for b in blobs))
        storage = {**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url}
        env = pod_env(fake_hub, tmp_path / "home", storage, record, SIMSWARM_FIRST_BYTE_TIMEOUT="1",
                      SIMSWARM_STALL_RETRIES="1")
        proc = run_agent(*serve_argv(staged[0], fake_vllm), env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    [error] = [e for e in events(proc.stderr) if e["event"] == "error"]
    assert error["exit_code"] == 3
    assert "stopping vLLM: the weights cannot be had" in proc.stderr
    seen = read_record(record)
    assert seen["loaded"] == [] and "served" not in seen


def lock_is_free(home: Path, repo_id: str) -> bool:
    with open(RepoCache(home / "hub", repo_id).lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_pods_main_process_ending_mid_download_ends_the_background_pull(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], fake_vllm: Path,
        tmp_path: Path, s3_server: SeaweedServer, sig: int) -> None:
    repo_id, commit = staged
    record, home = tmp_path / "record.json", tmp_path / "home"
    with ThrottledLink(("127.0.0.1", s3_server.s3_port), rate=20e3) as link:  # ~30 s for the weights
        storage = {**settings_env, "MINIO_ENDPOINT": link.endpoint}
        proc = start_agent(*serve_argv(repo_id, fake_vllm),
                           env=pod_env(fake_hub, home, storage, record, VLLM_STUB_HOLD="1"))
        try:
            wait_until(lambda: record.exists() and read_record(record)["env"].get(ENV_BACKGROUND_PID))
            background = int(read_record(record)["env"][ENV_BACKGROUND_PID])
            assert link.bytes_down < 400_000  # still downloading
            os.kill(proc.pid, sig)  # the pod's main process alone, as a runtime kills it
            proc.wait(timeout=30)
            wait_until(lambda: not live_group_members(proc.pid), timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not os.path.exists(f"/proc/{background}") or live_group_members(proc.pid) == []
        assert lock_is_free(home, repo_id)
    # The next start finishes the pull from what was written.
    resumed = run_agent("pull", repo_id, "--hf-home", str(home), "--no-fallback",
                        env=pod_env(fake_hub, home, settings_env, record))
    assert resumed.returncode == 0, resumed.stderr
    verify = run_agent("verify", repo_id, "--hf-home", str(home), env=pod_env(fake_hub, home, {}, record))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert RepoCache(home / "hub", repo_id).read_ref("main") == commit
