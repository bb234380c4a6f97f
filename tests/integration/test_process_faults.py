"""The agent's process dying at the worst moments, and two agents racing for one cache.

`python -m agent pull` runs as a subprocess behind a throttled fault proxy, is killed (SIGKILL: the pod
vanishes) or stopped (SIGTERM: the kubelet) at one stage of the pull, found by polling the filesystem or
the proxy's log: during the listing, mid-blob, between a blob's final name and its link, before the ref.
Then the same command runs again: the cache ends valid and only the missing bytes are fetched. Two
agents started at once on one cache both succeed, and the model is downloaded about once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cache import BLOB_RE, STATE_SUFFIX, RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.manifest import Manifest
from agent.verify import audit_cache
from tests.support.cli import clean_env, kill_group, live_group_members, run_agent, start_agent
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache, resolve_offline
from tests.support.staged import assert_no_bad_final_blob

# Runs the real CLI; with SLOW_AT=ref the ref write first drops a marker file and sleeps, so a test can
# strike in the instant between the last link and the ref (too short to hit by polling otherwise).
LAUNCHER = """
import os, sys, time
if os.environ.get("SLOW_AT") == "ref":
    import agent.cache
    _write_ref = agent.cache.RepoCache.write_ref
    def write_ref(self, revision, commit):
        open(os.environ["SLOW_MARKER"], "w").close()
        time.sleep(30)
        _write_ref(self, revision, commit)
    agent.cache.RepoCache.write_ref = write_ref
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def slow_proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    """Every blob GET pauses mid-body: with one stream a pull of the tiny model takes a few seconds."""
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("stall", count=10_000, match="/blobs/", stall_seconds=0.25)
        yield proxy


def start(env: dict[str, str], hf_home: Path, repo_id: str, *extra: str, engine: str = "python",
          concurrency: str = "1") -> subprocess.Popen[str]:
    return start_agent("--log-format", "json", "pull", repo_id, "--engine", engine, "--concurrency",
                       concurrency, "--hf-home", str(hf_home), "--no-fallback", *extra, env=env,
                       launcher=LAUNCHER)


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str,
               timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, stderr = proc.communicate()
            raise AssertionError(f"pull ended ({proc.returncode}) before {what}: {stderr[-1500:]}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.01)


def final_blobs(cache: RepoCache) -> dict[str, int]:
    if not cache.blobs.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in cache.blobs.iterdir() if BLOB_RE.match(p.name)}


def parts_done(cache: RepoCache) -> int:
    """Bytes that a checkpoint records as landed, over all partial blobs."""
    done = 0
    if cache.blobs.is_dir():
        for path in cache.blobs.glob("*" + STATE_SUFFIX):
            with contextlib.suppress(OSError, ValueError):
                done += sum(end - start for start, end in json.loads(path.read_text()).get("have", []))
    return done


def strike(proc: subprocess.Popen[str], sig: int) -> str:
    """SIGKILL the whole group (the pod vanishes) or SIGTERM the agent alone (the kubelet); returns stderr."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            return stderr
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=10)
        assert time.monotonic() - started < 8, f"SIGTERM took too long to stop the pull: {stderr[-2000:]}"
        assert proc.returncode == 143, stderr[-2000:]
        last = json.loads([line for line in stderr.splitlines() if line.strip()][-1])
        assert last["event"] == "error" and "interrupted" in last["message"] and "\n" not in last["message"]
        assert live_group_members(proc.pid) == []  # no worker left writing into the cache
        return stderr
    finally:
        kill_group(proc)


def rerun(env: dict[str, str], hf_home: Path, repo_id: str, report: Path) -> dict[str, object]:
    done = run_agent("--log-format", "json", "pull", repo_id, "--hf-home", str(hf_home), "--no-fallback",
                     "--report", str(report), env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(report.read_text())
    return result


def assert_valid(hub_cache: Path, repo_id: str, manifest: Manifest) -> None:
    cache = RepoCache(hub_cache, repo_id)
    commit = cache.read_ref("main")
    assert commit is not None
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
    assert_clean_cache(hub_cache)
    assert resolve_offline(hub_cache, repo_id) == cache.snapshot_dir(commit)


def list_request(bucket: str) -> Callable[[str, str, str | None], bool]:
    return lambda method, path, _range: method == "GET" and path.rstrip("/") == f"/{bucket}"


STAGES = ["listing", "mid-blob", "blob-before-link", "before-ref"]


CASES = [pytest.param(stage, sig, "python", id=f"{stage}-{name}-python")
         for stage in STAGES for sig, name in ((signal.SIGKILL, "sigkill"), (signal.SIGTERM, "sigterm"))]
CASES += [pytest.param("mid-blob", sig, "native", id=f"mid-blob-{name}-native")
          for sig, name in ((signal.SIGKILL, "sigkill"), (signal.SIGTERM, "sigterm"))]


@pytest.mark.parametrize(("stage", "sig", "engine"), CASES)
def test_a_pull_stopped_at_any_stage_resumes_to_a_valid_cache_fetching_only_what_is_missing(
        stage: str, sig: int, engine: str, slow_proxy: FaultProxy, s3_server: SeaweedServer,
        staged_bucket: str, manifest: Manifest, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id = model_repo[0]
    hf_home = tmp_path / "hf-home"
    cache = RepoCache(hf_home / "hub", repo_id)
    marker = tmp_path / "at-ref"
    env = clean_env(**{**s3_server.env(staged_bucket), "MINIO_ENDPOINT": slow_proxy.endpoint_url})
    if stage == "listing":
        slow_proxy.add_fault("stall_head", count=1, match=list_request(staged_bucket), stall_seconds=30)
        ready: Callable[[], bool] = lambda: slow_proxy.count(fault="stall_head") > 0  # noqa: E731
    elif stage == "mid-blob":
        ready = lambda: parts_done(cache) > 0  # noqa: E731
    elif stage == "blob-before-link":
        ready = lambda: bool(final_blobs(cache)) and not cache.snapshot_dir(model_repo[1]).exists()  # noqa: E731
    else:  # the launcher holds the pull at the ref: no throttling needed to get there
        env.update(SLOW_AT="ref", SLOW_MARKER=str(marker), MINIO_ENDPOINT=s3_server.endpoint_url)
        ready = marker.exists
    proc = start(env, hf_home, repo_id, engine=engine)
    wait_until(proc, ready, stage)
    strike(proc, sig)

    # what the stop left: never a bad blob under its final name, never a ref huggingface_hub would trust
    assert_no_bad_final_blob(cache, manifest)
    assert cache.read_ref("main") is None
    with pytest.raises(RuntimeError):
        resolve_offline(hf_home / "hub", repo_id)
    kept = sum(final_blobs(cache).values())
    partial = parts_done(cache)
    if stage == "listing":
        assert not cache.blobs.exists() or kept == partial == 0
    elif stage == "before-ref":
        assert kept == manifest.total_size

    result = rerun(clean_env(**s3_server.env(staged_bucket)), hf_home, repo_id, tmp_path / "report.json")
    assert_valid(hf_home / "hub", repo_id, manifest)
    downloaded = int(str(result["bytes_downloaded"]))
    print(f"\n{stage}/{signal.Signals(sig).name}/{engine}: kept {kept} B in final blobs + {partial} B; "
          f"rerun downloaded {downloaded} of {manifest.total_size} B")
    assert downloaded <= manifest.total_size - kept
    if stage == "listing":
        assert downloaded == manifest.total_size
    elif stage == "before-ref":
        assert (result["source"], downloaded) == ("cache", 0)
    else:
        assert downloaded < manifest.total_size  # the parts and blobs that landed were not fetched again


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_two_agents_pulling_one_model_into_one_cache_both_succeed_and_download_it_once(
        engine: str, slow_proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id = model_repo[0]
    hf_home = tmp_path / "shared-hf-home"
    env = clean_env(**{**s3_server.env(staged_bucket), "MINIO_ENDPOINT": slow_proxy.endpoint_url})
    reports = [tmp_path / f"report-{i}.json" for i in range(2)]
    procs = [start(env, hf_home, repo_id, "--report", str(r), engine=engine, concurrency="2")
             for r in reports]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60))
    finally:
        for proc in procs:
            kill_group(proc)
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-2000:]
    results = [json.loads(r.read_text()) for r in reports]
    total = sum(int(r["bytes_downloaded"]) for r in results)
    print(f"\ntwo agents ({engine}): bytes_downloaded {[r['bytes_downloaded'] for r in results]}, "
          f"sources {[r['source'] for r in results]}, model {manifest.total_size} B")
    assert total == manifest.total_size  # one downloads, the other waits on the lock and finds it done
    assert sorted(r["source"] for r in results) == ["cache", "minio"]
    waited = [e for _, err in outputs for e in map(json.loads, filter(str.strip, err.splitlines()))
              if e["event"] == "pull.wait"]
    assert len(waited) == 1
    assert (hf_home / "hub" / ".locks" / cache_folder(repo_id) / "simswarm-agent.lock").exists()
    assert_valid(hf_home / "hub", repo_id, manifest)


def cache_folder(repo_id: str) -> str:
    return RepoCache(Path("/"), repo_id).folder
