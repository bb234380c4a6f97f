"""`start.sh`, the container's ENTRYPOINT, run as a process with the pod's environment.

`simswarm-agent` on PATH is a two-line wrapper around this interpreter's `python -m agent`, and `vllm` is
the recording stub: the chain start.sh -> agent -> vLLM is exec all the way, so the stub must run with
the very pid that start.sh was started with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ROOT, hub_agent_env
from tests.support.fake_hub import FakeHub

START_SH = ROOT / "start.sh"

VLLM_STUB = """#!{python}
import json, os, sys
with open(os.environ["VLLM_STUB_RECORD"], "w") as record:
    json.dump({{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid()}}, record)
"""
AGENT_WRAPPER = """#!/bin/sh
exec "{python}" -m agent "$@"
"""


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("vllm", VLLM_STUB), ("simswarm-agent", AGENT_WRAPPER)):
        (folder / name).write_text(text.format(python=sys.executable))
        (folder / name).chmod(0o755)
    return folder


def pod_env(hub: FakeHub, tmp_path: Path, bin_dir: Path, storage: dict[str, str],
            **pod: str) -> dict[str, str]:
    env = hub_agent_env(hub, tmp_path / "pod-home", storage)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["VLLM_STUB_RECORD"] = str(tmp_path / "record.json")
    for name in ("MODEL_ID", "MODEL_REVISION", "VLLM_ARGS", "SIMSWARM_ENGINE", "SIMSWARM_NO_FALLBACK",
                 "SIMSWARM_FILES"):
        env.pop(name, None)
    env.update(pod)
    return env


def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(["bash", str(START_SH), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr


def recorded(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "record.json").read_text())
    return data


def test_start_sh_maps_the_pod_env_and_execs_down_to_vllm(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], bin_dir: Path,
        tmp_path: Path) -> None:
    repo_id, commit = staged
    env = pod_env(fake_hub, tmp_path, bin_dir, settings_env, MODEL_ID=repo_id, MODEL_REVISION=commit,
                  VLLM_ARGS="  --max-model-len 64\t--served-model-name=sim --glob * ",
                  SIMSWARM_ENGINE="python", SIMSWARM_REPORT=str(tmp_path / "report.json"))
    proc, stderr = start(env, "--port", "8001")
    assert proc.returncode == 0, stderr
    seen = recorded(tmp_path)
    assert seen["argv"] == [str(bin_dir / "vllm"), "serve", repo_id, "--revision", commit, "--max-model-len",
                            "64", "--served-model-name=sim", "--glob", "*", "--port", "8001"]
    assert seen["pid"] == proc.pid  # exec all the way: vLLM is the process the container started
    assert seen["env"]["HF_HUB_OFFLINE"] == "1"
    assert seen["env"]["HF_HUB_CACHE"] == str(tmp_path / "pod-home" / "hub")
    assert "MINIO_SECRET_KEY" not in seen["env"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["source"], report["engine"], report["commit"]) == ("minio", "python", commit)
    assert report["skipped"] == ["original/params.json"]  # serve pulls only what vLLM reads by default


def test_start_sh_files_all_pulls_the_whole_snapshot(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], bin_dir: Path,
        tmp_path: Path) -> None:
    env = pod_env(fake_hub, tmp_path, bin_dir, settings_env, MODEL_ID=staged[0], SIMSWARM_FILES="all",
                  SIMSWARM_ENGINE="python", SIMSWARM_REPORT=str(tmp_path / "report.json"))
    proc, stderr = start(env)
    assert proc.returncode == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["files_skipped"], report["selection"]["files"]) == (0, "all")


def test_start_sh_without_model_id_says_so_and_exits_2(fake_hub: FakeHub, bin_dir: Path,
                                                      tmp_path: Path) -> None:
    proc, stderr = start(pod_env(fake_hub, tmp_path, bin_dir, {}))
    assert proc.returncode == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: MODEL_ID is not set")
    assert not (tmp_path / "record.json").exists()


def test_start_sh_no_fallback_with_nothing_staged_exits_3(fake_hub: FakeHub, model_repo: tuple[str, str],
                                                         settings_env: dict[str, str], bin_dir: Path,
                                                         tmp_path: Path) -> None:
    fake_hub.clear_requests()
    env = pod_env(fake_hub, tmp_path, bin_dir, settings_env, MODEL_ID=model_repo[0],
                  SIMSWARM_NO_FALLBACK="TRUE")
    proc, stderr = start(env)
    assert proc.returncode == 3, stderr
    assert "not staged" in stderr and "Traceback" not in stderr
    assert fake_hub.requests == [] and not (tmp_path / "record.json").exists()


def test_start_sh_is_shellcheck_clean() -> None:
    shellcheck = subprocess.run(["which", "shellcheck"], capture_output=True, text=True, check=False)
    if shellcheck.returncode != 0:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(START_SH)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
    assert os.access(START_SH, os.X_OK), "start.sh must be executable: it is the image's ENTRYPOINT"
