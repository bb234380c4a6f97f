"""An engine failing for a reason nobody listed: the pod's open-file limit (EMFILE), for real.

`python -m agent pull` runs through a launcher that lowers RLIMIT_NOFILE's soft limit to the files
already open, just for the engine's transfer (as a container with `ulimit -n` too low for the model
would): every new socket, pipe, thread runtime or file then fails with EMFILE inside the real engine.
The limit is restored afterwards, so what follows (the Hub fallback) runs as it would in a pod whose
bucket path failed. Before this, the native engine ended with a Python traceback and exit 1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import hub_agent_env, run_agent
from tests.support.fake_hub import FakeHub
from tests.support.hf_cache import resolve_offline

LAUNCHER = """
import functools, os, resource, sys
from agent.engines.native import NativeEngine
from agent.engines.python import PythonEngine
from agent.engines.s5cmd import S5cmdEngine

def starved(fetch):
    @functools.wraps(fetch)
    def run(self, *args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            return fetch(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return run

for engine in (NativeEngine, PythonEngine, S5cmdEngine):
    engine.fetch = starved(engine.fetch)
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_starved(hub: FakeHub, hf_home: Path, storage: dict[str, str],
                *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent("--log-format", "text", "pull", *args, env=hub_agent_env(hub, hf_home, storage),
                     launcher=LAUNCHER)


@pytest.mark.parametrize("engine", ["native", "python", "s5cmd"])
def test_out_of_open_files_is_exit_3_in_one_line_with_a_true_hint(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], tmp_path: Path,
        engine: str) -> None:
    proc = run_starved(fake_hub, tmp_path / "home", settings_env, staged[0], "--engine", engine,
                       "--no-fallback")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "ulimit -n" in line and "open files" in line.lower(), line
    assert "MINIO_ENDPOINT" not in line  # the server is fine: the hint must not send a person there


def test_out_of_open_files_on_the_bucket_path_falls_back_to_the_hub(
        fake_hub: FakeHub, staged: tuple[str, str], settings_env: dict[str, str], tmp_path: Path) -> None:
    repo_id, commit = staged
    fake_hub.clear_requests()
    report = tmp_path / "report.json"
    proc = run_starved(fake_hub, tmp_path / "home", settings_env, repo_id, "--engine", "native",
                       "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert (data["source"], data["commit"]) == ("hub", commit)
    assert "open files" in str(data["fallback_reason"]).lower()
    assert fake_hub.downloads()
    assert resolve_offline(tmp_path / "home" / "hub", repo_id) == Path(str(data["snapshot_path"]))
