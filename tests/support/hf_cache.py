"""A Hugging Face cache exactly as huggingface_hub writes it: the real `snapshot_download` against a FakeHub.

Why a subprocess: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and HF_HOME into
`huggingface_hub.constants` at import time, and some code paths read those constants rather than the
`endpoint=` argument (the agent-harness registry fetch, for one). A child `python -c` with its own
environment gets every setting from the start, cannot leak patched constants into the test process,
and is what a user's process does; it costs about a second.

What snapshot_download 2.4 writes (checked by `tests/integration/test_testbed.py`): `blobs/<etag>`,
`snapshots/<commit>/<path>` relative links, `refs/main` (no newline), and `trees/<commit>.json`, the
tree listing that it also reads to decide whether an offline snapshot is complete. Beside the repo
folder it leaves `.locks/` and a `CACHEDIR.TAG` in the cache root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.fake_hub import FakeHub

# Variables of the parent that would change what the child does; the child gets its own values.
_HUB_VARIABLES = (
    "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_XET_HIGH_PERFORMANCE", "HF_TOKEN_PATH",
)

_DOWNLOAD = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2], revision=sys.argv[3]))
"""

# What vLLM does with HF_HUB_OFFLINE=1: no cache_dir argument, the cache comes from HF_HUB_CACHE.
_RESOLVE_OFFLINE = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], revision=sys.argv[2], local_files_only=True))
"""


def _clean_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _HUB_VARIABLES}
    env.update(
        HF_HOME=str(hf_home),  # the registry cache and token lookups stay out of the user's home
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
    )
    return env


def hub_env(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    """The environment of a process that must talk to `hub` and to nothing else."""
    env = {**_clean_env(hf_home), "HF_ENDPOINT": hub.endpoint}
    if hub.token is not None:
        env["HF_TOKEN"] = hub.token
    return env


def _run_python(code: str, args: list[str], env: dict[str, str], what: str) -> Path:
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def build_hf_cache(hub: FakeHub, repo_id: str, cache_dir: Path, revision: str = "main") -> Path:
    """Download `repo_id` from `hub` into `cache_dir` (a hub cache dir, like $HF_HOME/hub) with the real
    `huggingface_hub.snapshot_download`; returns the snapshot path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf-home-") as hf_home:
        snapshot = _run_python(_DOWNLOAD, [repo_id, str(cache_dir), revision], hub_env(hub, Path(hf_home)),
                               f"snapshot_download of {repo_id}@{revision}")
    assert_clean_cache(cache_dir)
    return snapshot


def resolve_offline(cache_dir: Path, repo_id: str, revision: str = "main") -> Path:
    """The snapshot path that `snapshot_download(repo_id, local_files_only=True)` finds with
    HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache_dir, as vLLM resolves a model; RuntimeError if it cannot."""
    with tempfile.TemporaryDirectory(prefix="hf-home-") as hf_home:
        env = {**_clean_env(Path(hf_home)), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir),
               "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: any network attempt fails at once
        return _run_python(_RESOLVE_OFFLINE, [repo_id, revision], env, f"offline resolution of {repo_id}")


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (links not followed) with its size and mtime: to prove nothing changed."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            state[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return state


def assert_clean_cache(cache_dir: Path) -> None:
    """huggingface_hub's own reader must find nothing odd in the cache (AssertionError listing warnings)."""
    from huggingface_hub import scan_cache_dir

    report = scan_cache_dir(cache_dir)
    assert not report.warnings, f"scan_cache_dir({cache_dir}) warns: {report.warnings}"
