"""The benchmark runs end to end on a small model and reports every method. No timing is asserted:
figures on a shared CI machine mean nothing; what matters is that the harness still works."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_METHODS = ["agent-python", "s5cmd-blobs", "s5cmd-legacy", "boto3-download_file", "curl-8", "curl-16"]

pytestmark = pytest.mark.skipif(shutil.which("s5cmd") is None or shutil.which("curl") is None,
                                reason="the benchmark needs s5cmd and curl")


def expected_methods() -> list[str]:
    from agent.engines.native import NativeEngine

    engines = (["native"] if NativeEngine.available() else []) + ["python", "s5cmd"]
    return [*BASE_METHODS, "agent-s5cmd", *(["agent-native"] if "native" in engines else []),
            f"agent-{engines[0]}-size", f"agent-{engines[0]}-sha256parts", f"agent-{engines[0]}-legacy",
            f"agent-{engines[0]}-rehash"]


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_bench_smoke_prints_a_table_with_every_method(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    proc = run_bench("bench.py", "--preset", "smoke", "--rounds", "1", "--size-mib", "32", "--workdir",
                     str(tmp_path / "work"), "--out", str(results))

    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for method in expected_methods():
        assert any(line.split()[:1] == [method] for line in table.splitlines()), (method, table)
    assert "serving limit:" in table and "verification share" in table

    data = json.loads(results.read_text())
    assert {row["method"] for row in data["rows"]} == set(expected_methods())
    assert all(row["median_s"] > 0 for row in data["rows"])
    assert data["config"]["size_mib"] == 32 and data["config"]["rounds"] == 1
    assert not list((tmp_path / "work").iterdir())  # the work folder is removed


def test_regimes_smoke_reports_fixed_cost_and_many_files(tmp_path: Path) -> None:
    """The capped-link and resume sections need `tc` on loopback (root, whole machine): not in CI."""
    results = tmp_path / "regimes.json"
    proc = run_bench("regimes.py", "--only", "fixed,files", "--rounds", "1", "--files", "300", "--workdir",
                     str(tmp_path / "work"), "--out", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert set(data["fixed"]["rows"]) == {"agent-native", "s5cmd-blobs", "python-startup"}
    assert set(data["files"]["rows"]) == {"agent-native", "agent-python", "agent-s5cmd", "s5cmd-blobs"}
    assert data["files"]["files"] == 301 and "fixed cost" in proc.stdout
    assert not list((tmp_path / "work").iterdir())
