"""The Hub fallback, end to end: `python -m agent pull` as a process, a real S3 server (SeaweedFS), the fake
Hub, and the real huggingface_hub doing the download.

Each case makes the bucket fail in one way (down, off, empty, a corrupt object) and checks where the bytes
came from (the fake Hub's request log), what the report says, and that vLLM's offline lookup resolves.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.remote import RemoteRepo
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from tests.support.cli import hub_agent_env, run_agent
from tests.support.fake_hub import FakeHub
from tests.support.hf_cache import assert_clean_cache, resolve_offline
from tests.support.staged import quiet

ABSENT_REPO = "simswarm-test/not-on-the-hub"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released: connecting is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_pull(env: dict[str, str], repo_id: str, report: Path,
             *flags: str) -> subprocess.CompletedProcess[str]:
    return run_agent("--log-format", "text", "pull", repo_id, "--report", str(report), *flags, env=env)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def hub(fake_hub: FakeHub, model_repo: tuple[str, str]) -> FakeHub:
    """The session's fake Hub with the tiny model published, request log emptied for this test."""
    fake_hub.clear_requests()
    fake_hub.available = True
    return fake_hub


def assert_served_from_hub(report: Path, hf_home: Path, repo_id: str, commit: str,
                           reason: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(report.read_text())
    assert data["source"] == "hub"
    assert re.search(reason, str(data["fallback_reason"])), data["fallback_reason"]
    assert data["commit"] == commit
    assert data["snapshot_path"] == str(RepoCache(hf_home / "hub", repo_id).snapshot_dir(commit))
    assert resolve_offline(hf_home / "hub", repo_id) == Path(str(data["snapshot_path"]))
    assert_clean_cache(hf_home / "hub")
    return data


def test_bucket_down_falls_back_to_the_hub(hub: FakeHub, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    storage = {"MINIO_ENDPOINT": f"127.0.0.1:{closed_port()}", "MINIO_ACCESS_KEY": "k",
               "MINIO_SECRET_KEY": "s"}
    hf_home = tmp_path / "hf-home"
    proc = run_pull(hub_agent_env(hub, hf_home, storage), repo_id, tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    data = assert_served_from_hub(tmp_path / "report.json", hf_home, repo_id, commit, "cannot connect")
    assert data["blobs_fetched"] == len(hub.downloads()) > 0
    assert data["bytes_downloaded"] == sum(len(f.data) for f in hub.files(repo_id).values())


def test_storage_off_falls_back_to_the_hub(hub: FakeHub, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    hf_home = tmp_path / "hf-home"
    proc = run_pull(hub_agent_env(hub, hf_home, None), repo_id, tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    assert_served_from_hub(tmp_path / "report.json", hf_home, repo_id, commit, "MINIO_ENDPOINT is not set")


def test_model_not_staged_falls_back_to_the_hub(hub: FakeHub, model_repo: tuple[str, str],
                                                 settings_env: dict[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    hf_home = tmp_path / "hf-home"
    proc = run_pull(hub_agent_env(hub, hf_home, settings_env), repo_id, tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    assert_served_from_hub(tmp_path / "report.json", hf_home, repo_id, commit, "not staged")


def corrupt_one_shard(settings: Settings, s3_server: SeaweedServer, repo_id: str, hf_cache: Path) -> str:
    """Overwrite the largest staged blob object with the same bytes, the first one flipped; its name."""
    biggest = max(RepoCache(hf_cache, repo_id).blobs.iterdir(), key=lambda p: p.stat().st_size)
    name = biggest.name
    data = bytearray(biggest.read_bytes())
    data[0] ^= 0xFF
    key = RemoteRepo(Store(settings), repo_id).blob_key(name)
    s3_server.client().put_object(Bucket=settings.bucket, Key=key, Body=bytes(data))
    return name


def test_corrupt_object_refetches_only_that_blob_from_the_hub(
        hub: FakeHub, model_repo: tuple[str, str], settings: Settings, settings_env: dict[str, str],
        s3_server: SeaweedServer, hf_cache: Path, tmp_path: Path) -> None:
    repo_id, commit = model_repo
    stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet())
    bad = corrupt_one_shard(settings, s3_server, repo_id, hf_cache)
    hf_home = tmp_path / "hf-home"
    proc = run_pull(hub_agent_env(hub, hf_home, settings_env), repo_id, tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    data = assert_served_from_hub(tmp_path / "report.json", hf_home, repo_id, commit,
                                  "does not match|fails its check")
    by_etag = {f.etag: path for path, f in hub.files(repo_id).items()}
    assert hub.downloads() == [f"/{repo_id}/resolve/{commit}/{by_etag[bad]}"]
    assert data["blobs_fetched"] == 1
    assert data["blobs_present"] == len(by_etag) - 1


def test_no_fallback_keeps_the_bucket_error(hub: FakeHub, model_repo: tuple[str, str],
                                            settings: Settings, settings_env: dict[str, str],
                                            s3_server: SeaweedServer, hf_cache: Path, tmp_path: Path) -> None:
    repo_id, _ = model_repo
    env = hub_agent_env(hub, tmp_path / "hf-home", settings_env)
    not_staged = run_pull(env, repo_id, tmp_path / "r1.json", "--no-fallback")
    assert not_staged.returncode == 3
    [line] = error_lines(not_staged)
    assert "not staged" in line and "--no-fallback" in line

    stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet())
    corrupt_one_shard(settings, s3_server, repo_id, hf_cache)
    corrupt = run_pull(env, repo_id, tmp_path / "r2.json", "--no-fallback")
    assert corrupt.returncode == 4
    assert len(error_lines(corrupt)) == 1
    assert hub.requests == []
    assert not (tmp_path / "r1.json").exists() and not (tmp_path / "r2.json").exists()


def test_storage_off_without_fallback_and_no_copy_in_the_cache_is_not_available_exit_3(
        hub: FakeHub, model_repo: tuple[str, str], tmp_path: Path) -> None:
    """Storage off and no fallback is a valid setup (a pre-filled model volume), so a cache without the
    model is "not available" (3, as the README's table says), not a configuration error (2)."""
    proc = run_pull(hub_agent_env(hub, tmp_path / "hf-home", None), model_repo[0], tmp_path / "r.json",
                    "--no-fallback")
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "MINIO_ENDPOINT is not set" in line and "--no-fallback" in line and "no complete copy" in line
    assert hub.requests == []


def test_hub_offline_in_the_agent_env_forbids_the_fallback(hub: FakeHub, model_repo: tuple[str, str],
                                                           settings_env: dict[str, str],
                                                           tmp_path: Path) -> None:
    env = {**hub_agent_env(hub, tmp_path / "hf-home", settings_env), "HF_HUB_OFFLINE": "1"}
    proc = run_pull(env, model_repo[0], tmp_path / "r.json")
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "not staged" in line and "HF_HUB_OFFLINE" in line
    assert hub.requests == []


def test_hub_failure_names_both_causes_in_one_line(hub: FakeHub, settings_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    proc = run_pull(hub_agent_env(hub, tmp_path / "hf-home", settings_env), ABSENT_REPO, tmp_path / "r.json")
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "bucket: " in line and "not staged" in line
    assert "Hub: " in line and "RepositoryNotFoundError" in line


def test_hub_outage_with_the_bucket_down_is_exit_3(hub: FakeHub, model_repo: tuple[str, str],
                                                   tmp_path: Path) -> None:
    hub.available = False
    try:
        storage = {"MINIO_ENDPOINT": f"127.0.0.1:{closed_port()}", "MINIO_ACCESS_KEY": "k",
                   "MINIO_SECRET_KEY": "s"}
        proc = run_pull(hub_agent_env(hub, tmp_path / "hf-home", storage), model_repo[0], tmp_path / "r.json")
    finally:
        hub.available = True
    assert proc.returncode == 3
    [line] = error_lines(proc)
    assert "cannot connect" in line and "Hub: " in line


def test_write_back_stages_the_hub_copy_for_the_next_pod(
        hub: FakeHub, model_repo: tuple[str, str], settings_env: dict[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    first = run_pull(hub_agent_env(hub, tmp_path / "pod1", settings_env), repo_id, tmp_path / "r1.json",
                     "--write-back")
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "r1.json").read_text())["source"] == "hub"

    hub.clear_requests()
    second = run_pull(hub_agent_env(hub, tmp_path / "pod2", settings_env), repo_id, tmp_path / "r2.json",
                      "--no-fallback")
    assert second.returncode == 0, second.stderr
    data = json.loads((tmp_path / "r2.json").read_text())
    assert data["source"] == "minio" and data["commit"] == commit
    assert hub.requests == []


def test_a_hub_fallback_keeps_the_pod_log_one_json_object_per_line(
        hub: FakeHub, model_repo: tuple[str, str], tmp_path: Path) -> None:
    env = hub_agent_env(hub, tmp_path / "hf-home", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # as in a pod: huggingface_hub would draw its bars
    proc = run_agent("--log-format", "json", "pull", model_repo[0], env=env)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # a tqdm bar would not parse
    names = [e["event"] for e in events]
    assert "pull.fallback" in names and names[-1] == "pull.done"
    assert events[-1]["source"] == "hub" and "MINIO_ENDPOINT" in events[-1]["fallback_reason"]


def test_a_complete_copy_in_the_cache_is_served_when_the_bucket_is_down(
        hub: FakeHub, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    hf_home = tmp_path / "hf-home"
    first = run_pull(hub_agent_env(hub, hf_home, None), repo_id, tmp_path / "r1.json")  # an earlier pod
    assert first.returncode == 0, first.stderr
    hub.clear_requests()
    storage = {"MINIO_ENDPOINT": f"127.0.0.1:{closed_port()}", "MINIO_ACCESS_KEY": "k",
               "MINIO_SECRET_KEY": "s"}
    env = hub_agent_env(hub, hf_home, storage)
    again = run_pull(env, repo_id, tmp_path / "r2.json", "--no-fallback")
    assert again.returncode == 0, again.stderr
    data = json.loads((tmp_path / "r2.json").read_text())
    assert (data["source"], data["commit"], data["bytes_downloaded"]) == ("cache", commit, 0)
    assert "cannot connect" in str(data["fallback_reason"])
    assert hub.requests == []

    # One flipped byte and the copy is no longer complete: no serving it, the bucket's error stands.
    blob = max(RepoCache(hf_home / "hub", repo_id).blobs.iterdir(), key=lambda p: p.stat().st_size)
    data_bytes = bytearray(blob.read_bytes())
    data_bytes[-1] ^= 0xFF
    blob.write_bytes(bytes(data_bytes))
    broken = run_pull(env, repo_id, tmp_path / "r3.json", "--no-fallback")
    assert broken.returncode == 3
    [line] = error_lines(broken)
    assert "cannot connect" in line and "--no-fallback" in line
