"""`serve` as a process: pull from a real S3 server (or the fake Hub), then exec a recording stub `vllm`.

The stub writes its argv, environment and pid to the file named by $VLLM_STUB_RECORD and exits 0, so the
assertions are on exactly what the real vLLM would receive. Because `serve` execs, the stub runs in the
agent's own process (same pid) and its exit status is the command's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cache import RepoCache
from tests.support.cli import hub_agent_env, run_agent, start_agent
from tests.support.fake_hub import FakeHub

STUB = """#!{python}
import json, os, sys
with open(os.environ["VLLM_STUB_RECORD"], "w") as record:
    json.dump({{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid()}}, record)
"""

RESOLVE = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], revision=sys.argv[2], local_files_only=True))
"""


@pytest.fixture
def stub_dir(tmp_path: Path) -> Path:
    """A folder holding the recording `vllm`, meant to go first on PATH."""
    folder = tmp_path / "stub-bin"
    folder.mkdir()
    vllm = folder / "vllm"
    vllm.write_text(STUB.format(python=sys.executable))
    vllm.chmod(0o755)
    return folder


def serve_env(hub: FakeHub, hf_home: Path, storage: dict[str, str] | None, stub_dir: Path,
              record: Path) -> dict[str, str]:
    env = hub_agent_env(hub, hf_home, storage)
    env["PATH"] = f"{stub_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["VLLM_STUB_RECORD"] = str(record)
    return env


def run_serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent("--log-format", "text", "serve", *args, env=env)


def recorded(record: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(record.read_text())
    return data


def test_serve_pulls_then_execs_vllm_offline_on_the_filled_cache(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], stub_dir: Path,
        tmp_path: Path) -> None:
    repo_id, commit = staged
    hf_home, record = tmp_path / "pod-home", tmp_path / "record.json"
    env = serve_env(fake_hub, hf_home, settings_env, stub_dir, record)
    proc = run_serve(env, repo_id, "--report", str(tmp_path / "report.json"), "--",
                     "--max-model-len", "64", "--port", "8001")
    assert proc.returncode == 0, proc.stderr
    seen = recorded(record)
    assert seen["argv"] == [str(stub_dir / "vllm"), "serve", repo_id, "--served-model-name", repo_id,
                            "--max-model-len", "64", "--port", "8001"]
    assert seen["env"]["HF_HUB_OFFLINE"] == "1"
    assert seen["env"]["HF_HOME"] == str(hf_home)
    assert seen["env"]["HF_HUB_CACHE"] == str(hf_home / "hub")
    assert not {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"} & set(seen["env"])
    assert settings_env["MINIO_SECRET_KEY"] not in json.dumps(seen)
    assert json.loads((tmp_path / "report.json").read_text())["source"] == "minio"

    # vLLM's own lookup, in a process given exactly the environment vLLM got.
    resolved = subprocess.run([sys.executable, "-c", RESOLVE, repo_id, "main"], env=seen["env"],
                              capture_output=True, text=True, timeout=60, check=False)
    assert resolved.returncode == 0, resolved.stderr
    snapshot = RepoCache(hf_home / "hub", repo_id).snapshot_dir(commit)
    assert resolved.stdout.strip().splitlines()[-1] == str(snapshot)


def test_serve_pulls_for_the_load_format_it_passes_vllm(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], stub_dir: Path,
        tmp_path: Path) -> None:
    repo_id, commit = staged
    hf_home, record, report = tmp_path / "pod-home", tmp_path / "record.json", tmp_path / "report.json"
    proc = run_serve(serve_env(fake_hub, hf_home, settings_env, stub_dir, record), repo_id,
                     "--load-format", "safetensors", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert recorded(record)["argv"][-2:] == ["--load-format", "safetensors"]
    pulled = json.loads(report.read_text())
    assert pulled["skipped"] == ["original/params.json"]
    assert pulled["selection"]["resolved_load_format"] == "safetensors"
    assert "skipped 1 files" in proc.stderr
    snapshot = RepoCache(hf_home / "hub", repo_id).snapshot_dir(commit)
    assert not (snapshot / "original").exists() and (snapshot / "config.json").is_file()


def test_serve_refuses_a_load_format_that_contradicts_vllms(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], stub_dir: Path,
        tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    proc = run_serve(serve_env(fake_hub, tmp_path / "home", settings_env, stub_dir, record), staged[0],
                     "--load-format", "pt", "--", "--load-format", "safetensors")
    assert proc.returncode == 2
    assert "disagrees" in proc.stderr and not record.exists()


@pytest.mark.parametrize("theirs", [["--served-model-name", "sim"], ["--served-model-name=sim"]])
def test_the_users_served_model_name_wins(fake_hub: FakeHub, staged: tuple[str, str],
                                          settings_env: dict[str, str], stub_dir: Path, tmp_path: Path,
                                          theirs: list[str]) -> None:
    record = tmp_path / "record.json"
    proc = run_serve(serve_env(fake_hub, tmp_path / "home", settings_env, stub_dir, record),
                     staged[0], "--", *theirs)
    assert proc.returncode == 0, proc.stderr
    assert recorded(record)["argv"][2:] == [staged[0], *theirs]


def test_only_vllm_sees_hub_offline_so_the_agent_can_still_fall_back(
        fake_hub: FakeHub, model_repo: tuple[str, str], settings_env: dict[str, str], stub_dir: Path,
        tmp_path: Path) -> None:
    repo_id, _ = model_repo
    record, report = tmp_path / "record.json", tmp_path / "report.json"
    proc = run_serve(serve_env(fake_hub, tmp_path / "home", settings_env, stub_dir, record),
                     repo_id, "--report", str(report))  # the bucket is empty: only the Hub can deliver
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["source"] == "hub"
    assert recorded(record)["env"]["HF_HUB_OFFLINE"] == "1"


def test_missing_vllm_fails_in_one_line_before_pulling(fake_hub: FakeHub, model_repo: tuple[str, str],
                                                       tmp_path: Path) -> None:
    env = hub_agent_env(fake_hub, tmp_path / "home")
    env["PATH"] = str(Path(sys.executable).parent)  # python, but no vllm
    fake_hub.clear_requests()
    proc = run_serve(env, model_repo[0])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: the vLLM executable 'vllm' is not on PATH")
    assert fake_hub.requests == [] and not (tmp_path / "home" / "hub").exists()


def test_sigterm_during_the_pull_exits_143(fake_hub: FakeHub, model_repo: tuple[str, str], stub_dir: Path,
                                           tmp_path: Path) -> None:
    """An S3 endpoint that accepts connections and never answers: the pull hangs until SIGTERM."""
    record = tmp_path / "record.json"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(30)
        storage = {"MINIO_ENDPOINT": f"127.0.0.1:{silent.getsockname()[1]}", "MINIO_ACCESS_KEY": "k",
                   "MINIO_SECRET_KEY": "s"}
        env = serve_env(fake_hub, tmp_path / "home", storage, stub_dir, record)
        proc = start_agent("--log-format", "text", "serve", model_repo[0], env=env)
        try:
            conn, _ = silent.accept()  # the agent is inside the pull, waiting for the listing
            with conn:
                proc.send_signal(signal.SIGTERM)
                _, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143, stderr
    assert "interrupted by signal 15" in stderr and "Traceback" not in stderr
    assert not record.exists()
