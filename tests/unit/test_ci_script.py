"""`.ci/run` with every tool it calls replaced by a stub that records its arguments: the same commands in
the same order as before (everything installed, lint, exactly `python3 -m pytest -q`), each step announced
by one `ci:` line, so the minutes of quiet installs are not silent."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUB = """#!/bin/sh
case "$*" in *sysconfig*) dirname "$0"; exit 0 ;; esac  # the scripts folder .ci/run puts on PATH
echo "RAN: $(basename "$0") $*"
"""
TOOLS = ("python3", "apt-get", "ruff", "mypy", "cargo", "shellcheck")


def run_ci(tmp_path: Path) -> list[str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in TOOLS:
        (stubs / tool).write_text(STUB)
        (stubs / tool).chmod(0o755)
    # vLLM's venv as a finished install (.ci/vllm-cpu reuses it) whose python is a stub too.
    venv = tmp_path / "vllm-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".simswarm-installed").touch()
    (venv / "bin" / "python").write_text(STUB)
    (venv / "bin" / "python").chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")],
                          env={"PATH": f"{stubs}:/usr/bin:/bin", "SIMSWARM_VLLM_VENV": str(venv)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith(("RAN: ", "ci: "))]


def test_ci_announces_every_step_and_runs_the_same_commands(tmp_path: Path) -> None:
    lines = run_ci(tmp_path)
    ran = [line.removeprefix("RAN: ") for line in lines if line.startswith("RAN: ")]
    apt = ["apt-get update -qq", "apt-get install -y -qq nginx shellcheck"]
    assert [r for r in ran if not r.startswith("apt-get")] == [
        "python3 -m pip install -q maturin",
        "python3 -m pip install -q -e .[test,demo]",
        "python3 -c import agent._native as n; print('agent._native', n.version())",
        "python -m pip install -q --no-deps -e .",
        "ruff check agent tests bench",
        "mypy agent",
        "cargo fmt --check",
        "cargo clippy --all-targets -q -- -D warnings",
        "shellcheck start.sh " + " ".join(sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("bench/*.sh"))),
        "python3 -m pytest -q",
    ]
    assert [r for r in ran if r.startswith("apt-get")] in ([], apt)  # apt only where nginx is missing
    # Every command but the two quick `python3 -c` probes comes after a `ci:` line of its own step.
    announced = 0
    for line in lines:
        if line.startswith("ci: "):
            announced += 1
        elif "python3 -c" not in line and "cargo clippy" not in line and "apt-get install" not in line:
            assert lines[lines.index(line) - 1].startswith("ci: "), line
    assert announced >= 7
    assert lines[-2:] == ["ci: tests: python3 -m pytest -q", "RAN: python3 -m pytest -q"]
