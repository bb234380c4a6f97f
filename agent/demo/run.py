"""The demo's run: an embedded SeaweedFS S3 server on loopback, a small real safetensors model,
`stage`, `pull` (with a progress bar on a terminal), proof by huggingface_hub offline and safetensors in
a separate process, and the vLLM command `serve` would exec. Everything lives in a temporary folder
removed at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.demo.model import generate_model
from agent.demo.seaweed import SeaweedServer
from agent.demo.seed import fake_commit, seed_cache
from agent.errors import VerificationError
from agent.launch import vllm_argv
from agent.output import Output, Spinner, human_bytes
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store

DEMO_REPO = "simswarm-demo/tiny-llama"

# Runs in a fresh interpreter with HF_HUB_OFFLINE=1, as vLLM would resolve the model.
CHECK_SCRIPT = """
import json, sys, warnings
from huggingface_hub import scan_cache_dir, snapshot_download
from safetensors import safe_open
repo, cache = sys.argv[1], sys.argv[2]
path = snapshot_download(repo, local_files_only=True, cache_dir=cache)
info = scan_cache_dir(cache)
shards = {}
import pathlib
for shard in sorted(pathlib.Path(path).glob("*.safetensors")):
    with safe_open(str(shard), framework="numpy") as f:
        shards[shard.name] = len(list(f.keys()))
print(json.dumps({"snapshot": path, "warnings": [str(w) for w in info.warnings], "shards": shards}))
"""


def check_offline(repo_id: str, hub_cache: Path) -> dict[str, object]:
    """Resolve the snapshot with huggingface_hub offline and open every shard, in a child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    proc = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, repo_id, str(hub_cache)], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VerificationError(f"huggingface_hub could not resolve the pulled cache offline: {last}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["warnings"]:
        raise VerificationError(f"scan_cache_dir() warned: {result['warnings']}")
    return result


def vllm_command(repo_id: str, hub_cache: Path) -> str:
    argv = vllm_argv(repo_id, [])
    return f"HF_HUB_OFFLINE=1 HF_HUB_CACHE={shlex.quote(str(hub_cache))} {shlex.join(argv)}"


def run_demo(out: Output, *, shards: int = 4, shard_bytes: int = 8 << 20, engine: str = "auto",
             keep: bool = False) -> PullResult:
    work = Path(tempfile.mkdtemp(prefix="simswarm-demo-"))
    server = SeaweedServer(work / "s3")
    try:
        with Spinner(out, "demo.server", "starting an embedded SeaweedFS S3 server on loopback (about 10 s)"):
            server.start()
        server.create_bucket("simswarm")
        settings = Settings.from_env({**server.env(), "HF_HOME": str(work / "pod-hf-home")})

        model_dir = work / "model"
        generate_model(model_dir, shards=shards, shard_bytes=shard_bytes)
        commit = fake_commit(f"{DEMO_REPO}:{shards}:{shard_bytes}")
        seed_cache(model_dir, work / "dev-cache", DEMO_REPO, commit)
        out.event("demo.model", f"generated {DEMO_REPO}: {shards} safetensors shards of "
                  f"~{human_bytes(shard_bytes)} plus config and tokenizer")

        stage_from_cache(Store(settings), work / "dev-cache", DEMO_REPO, "main", out)
        result = pull_from_store(settings, PullOptions(DEMO_REPO, engine=engine), out)
        out.event("demo.pull", f"pulled {human_bytes(result.bytes_downloaded)} in {result.seconds:.2f}s "
                  f"with the {result.engine} engine into {result.snapshot_path}")

        checked = check_offline(DEMO_REPO, settings.hub_cache)
        opened = checked["shards"]
        assert isinstance(opened, dict)
        out.event("demo.verify", f"huggingface_hub resolved the snapshot offline, scan_cache_dir() "
                  f"has no warnings, safetensors opened {len(opened)} shards")
        out.event("demo.serve", "serve would now exec: " + vllm_command(DEMO_REPO, settings.hub_cache))
        return result
    finally:
        server.stop()
        if keep:
            out.event("demo.keep", f"kept the demo folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            out.event("demo.cleanup", f"removed the demo folder {work} (--keep keeps it)", folder=str(work))
