"""`demo`, the README's main-job command, run as a person would (small model to stay quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_stages_pulls_and_proves_a_model_then_cleans_up(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "agent", "--log-format", "json", "demo", "--shards", "2",
                           "--shard-mib", "1"], env=env, capture_output=True, text=True, timeout=240)

    assert proc.returncode == 0, proc.stderr[-2000:]
    events = {json.loads(line)["event"]: json.loads(line) for line in proc.stderr.splitlines()}
    assert {"stage.done", "demo.pull", "demo.verify", "demo.serve", "demo.done"} <= set(events)
    assert "no warnings" in events["demo.verify"]["message"]
    assert "--served-model-name simswarm-demo/tiny-llama" in events["demo.serve"]["message"]
    assert not any(p.name.startswith("simswarm-demo-") for p in tmp_path.iterdir())  # cleaned up
