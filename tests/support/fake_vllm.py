"""A stand-in `vllm` for fast checks of serve's overlapped start: what vLLM would be handed, and the
plugin's protocol as vLLM's processes run it, in one process and in seconds.

`fake_vllm_env(folder)` makes a venv that sees this machine's packages (the agent and its
`vllm.general_plugins` entry point) plus a `vllm` distribution of a supported version, so the agent's
probe takes it for a vLLM with the plugin. Its `vllm` script records argv, environment and pid to
$VLLM_STUB_RECORD; then, as vLLM's main process does, it starts the plugin's watcher, and, as vLLM's
worker does, waits for each weight file the arrivals record lists and reads it, recording the sha256 of
what it read. It proves nothing about serving (the real vLLM tests do); `VLLM_STUB_HOLD=1` keeps it
running afterwards until it is signalled, as a serving vLLM would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

VERSION = "0.32.0"
SCRIPT = """#!{python}
import hashlib, json, os, sys, time
from agent.serving import plugin
from agent.serving.arrivals import ENV_ARRIVALS, read_arrivals

record_path = os.environ["VLLM_STUB_RECORD"]
seen = {{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid(), "loaded": []}}

def save():
    with open(record_path + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(record_path + ".tmp", record_path)

save()
plugin.register_in_main_process()
arrivals = read_arrivals(os.environ[ENV_ARRIVALS]) if os.environ.get(ENV_ARRIVALS) else None
if arrivals is not None:
    for relpath in arrivals.weights:
        plugin.wait_for(relpath)
        with open(arrivals.path_of(relpath), "rb") as f:
            seen["loaded"].append([relpath, hashlib.sha256(f.read()).hexdigest()])
        save()
    plugin.wait_for(None)
seen["served"] = True
save()
while os.environ.get("VLLM_STUB_HOLD") == "1":
    time.sleep(1)
"""


def fake_vllm_env(folder: Path) -> Path:
    """A venv at `folder` whose `bin/vllm` is the stand-in; returns that executable."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
                   check=True, timeout=120)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    dist = Path(site) / f"vllm-{VERSION}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n")
    vllm = folder / "bin" / "vllm"
    vllm.write_text(SCRIPT.format(python=python))
    vllm.chmod(0o755)
    return vllm


def read_record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
