"""The agent as a process, as a pod or a person runs it: `python -m agent ARGS` in a clean environment.

`clean_env` is this process's environment with nothing in it that would configure the agent, the Hub
client or an AWS SDK behind the test's back; `hub_agent_env` is the same for a process that may fall back
to a fake Hub. `run_agent` waits for the command, `start_agent` starts it in its own process group (so a
test can signal the agent alone, or kill it with its workers, as a pod dies). A `launcher` is a script run
with `python -c` in place of `-m agent`: it patches the one thing a test needs, then calls the CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.fake_hub import FakeHub
from tests.support.hf_cache import hub_env

ROOT = Path(__file__).resolve().parents[2]
OWN_PREFIXES = ("HF_", "HUGGINGFACE_", "MINIO_", "AWS_")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def clean_env(*, proxies: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment without the agent's, the Hub client's and AWS's variables (and, with
    `proxies=False`, without proxy variables), the checkout on PYTHONPATH, telemetry off; then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(OWN_PREFIXES) and (proxies or k.lower() not in PROXY_VARIABLES)}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def hub_agent_env(hub: FakeHub, hf_home: Path, storage: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for `hub` with HF_HOME=hf_home, and the MINIO_* settings of `storage`
    (None: object storage off)."""
    env = hub_env(hub, hf_home)
    env.update({k: v for k, v in (storage or {}).items() if k.startswith("MINIO_")})
    env["PYTHONPATH"] = str(ROOT)
    return env


def agent_argv(*args: str, launcher: str | None = None) -> list[str]:
    return [sys.executable, *(["-c", launcher] if launcher is not None else ["-m", "agent"]), *args]


def run_agent(*args: str, env: Mapping[str, str], launcher: str | None = None, timeout: float = 120,
              cwd: Path = ROOT, **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end; output captured as text."""
    return subprocess.run(agent_argv(*args, launcher=launcher), env=dict(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False, **popen)


def start_agent(*args: str, env: Mapping[str, str], launcher: str | None = None,
                stdout: int = subprocess.PIPE, **popen: Any) -> subprocess.Popen[str]:
    """Start the CLI in a process group of its own (its pid is the group's id); stderr piped, as text."""
    return subprocess.Popen(agent_argv(*args, launcher=launcher), env=dict(env), cwd=ROOT, stdout=stdout,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the agent's whole process group (the pod vanishes) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def live_group_members(pgid: int) -> list[str]:
    """The command lines of the group's processes that could still write. Zombies do not count (this
    container's init does not reap them at once), nor does a process with no command line: it is past
    releasing its memory on the way out (multiprocessing's forkserver and resource tracker end once the
    agent has, and may be caught there a moment after it), so it can write nothing more."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            exiting = process.info["status"] == psutil.STATUS_ZOMBIE or not process.info["cmdline"]
            if os.getpgid(process.pid) == pgid and not exiting:
                found.append(" ".join(process.info["cmdline"] or []))
        except (ProcessLookupError, psutil.Error):
            continue
    return found
