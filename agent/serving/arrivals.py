"""The arrivals record: which weight files the background pull has verified and placed.

The background pull writes it (whole, by rename: `agent.cache.atomic_write`, world-readable, as vLLM may
run as another user) when the files vLLM reads first are in place and
again as each weight file gets its final name; vLLM's worker reads it before it opens a weight file.
It lives beside the cache's other state, `<repo>/.simswarm/arrivals/<commit>.json`:

    {"format_version": 1, "pid": 4242, "repo_id": "org/name", "commit": "<sha>",
     "snapshot": "/.../snapshots/<sha>", "weights": ["model-00001-of-00002.safetensors", ...],
     "ready": ["model-00001-of-00002.safetensors"], "done": false, "exit_code": null, "error": null}

`weights` are the files vLLM's default loader reads, in the order it reads them; `ready` those of them
that passed their check and are linked in the snapshot; `done` is set when the pull has ended well
(the record is then removed), `exit_code` and `error` (the agent's one line) when it has failed.

Standard library only: vLLM's processes import this module.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
LOAD_FORMAT = "simswarm"  # the load format the plugin registers with vLLM
# What the agent hands vLLM's processes in their environment.
ENV_ARRIVALS = "SIMSWARM_ARRIVALS"  # the record's path
ENV_BACKGROUND_PID = "SIMSWARM_BACKGROUND_PID"  # the background pull
ENV_STATUS_FD = "SIMSWARM_STATUS_FD"  # in vLLM's main process: the pipe the background pull reports on
ENV_MAIN_PID = "SIMSWARM_MAIN_PID"  # the pod's main process: the agent, then vLLM (same pid)


@dataclass
class Arrivals:
    pid: int
    repo_id: str
    commit: str
    snapshot: str
    weights: list[str]
    ready: list[str] = field(default_factory=list)
    done: bool = False
    exit_code: int | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.exit_code is not None and self.exit_code != 0

    def path_of(self, relpath: str) -> str:
        return os.path.join(self.snapshot, relpath)

    def to_json(self) -> bytes:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=1).encode()


def record_path(repo_state: Path, commit: str) -> Path:
    return repo_state / "arrivals" / f"{commit}.json"


def read_arrivals(path: str | Path) -> Arrivals | None:
    """The record, or None when there is none (the pull has ended well) or it is not one."""
    try:
        doc: Any = json.loads(Path(path).read_bytes())
        if doc.get("format_version") != FORMAT_VERSION:
            return None
        return Arrivals(int(doc["pid"]), str(doc["repo_id"]), str(doc["commit"]), str(doc["snapshot"]),
                        [str(w) for w in doc["weights"]], [str(r) for r in doc["ready"]], bool(doc["done"]),
                        None if doc["exit_code"] is None else int(doc["exit_code"]),
                        None if doc["error"] is None else str(doc["error"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def natural_key(path: str) -> list[Any]:
    """The order vLLM's safetensors iterator reads files in (`_natural_sort_key`): by base name, digits
    as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: its exit only waits to be collected)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
