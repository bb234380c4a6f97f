"""What a command loads before it does anything: the pull's path must not pay for an SDK it does not use
(botocore alone costs about 0.15 s of a pod's start)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("boto3", "botocore", "s3transfer", "urllib3", "psutil", "tqdm")


def loaded_after(module: str) -> list[str]:
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(done.stdout))


@pytest.mark.parametrize("module", ["agent.cli", "agent.pull", "agent.fallback", "agent.commands.pull",
                                    "agent.output", "agent.uploader"])
def test_the_pull_path_and_the_cli_load_no_sdk(module: str) -> None:
    assert loaded_after(module) == []
