"""`demo`, the README's main-job command, run as a person would (small model to stay quick)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.cli import run_agent


def bare_env(home: Path) -> dict[str, str]:
    """A person's shell with nothing configured: PATH, and a home and temporary folder of the test's."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home)}


def test_demo_stages_pulls_and_proves_a_model_then_cleans_up(tmp_path: Path) -> None:
    proc = run_agent("--log-format", "json", "demo", "--shards", "2", "--shard-mib", "1",
                     env=bare_env(tmp_path), timeout=240)

    assert proc.returncode == 0, proc.stderr[-2000:]
    events = {json.loads(line)["event"]: json.loads(line) for line in proc.stderr.splitlines()}
    assert {"stage.done", "demo.pull", "demo.verify", "demo.serve", "demo.done"} <= set(events)
    assert "no warnings" in events["demo.verify"]["message"]
    assert "--served-model-name simswarm-demo/tiny-llama" in events["demo.serve"]["message"]
    assert not any(p.name.startswith("simswarm-demo-") for p in tmp_path.iterdir())  # cleaned up
    # ... and it says so, how to keep it, and how long the whole run took
    cleanup = events["demo.cleanup"]
    assert cleanup["message"] == f"removed the demo folder {cleanup['folder']} (--keep keeps it)"
    assert Path(str(cleanup["folder"])).parent == tmp_path
    done = events["demo.done"]
    assert done["message"].startswith(f"demo finished in {done['seconds']:.1f}s")
    assert 0 < done["seconds"] < 240
    assert "\r" not in proc.stderr  # no spinner frames off a terminal: one plain line for the server start
    assert events["demo.server"]["message"].startswith("starting an embedded SeaweedFS S3 server")


@pytest.mark.parametrize("flags", [["--shards", "0"], ["--shard-mib", "0"], ["--shards", "-3"],
                                   ["--shard-mib", "100000"]])
def test_demo_sizes_out_of_range_are_one_line_and_exit_2(flags: list[str], tmp_path: Path) -> None:
    proc = run_agent("--log-format", "text", "demo", *flags, env=bare_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: {flags[0]} must be between 1 and ") and flags[1] in line
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing generated
