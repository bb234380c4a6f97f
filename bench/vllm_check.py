"""Proof with the real consumer: `pull --files vllm` fetches exactly the bytes vLLM reads, and vLLM's own
code accepts each selected cache offline.

    python bench/vllm_check.py --vllm-python /work/vllm-venv/bin/python [--json FILE] [--keep]

Runs with the agent's Python; vLLM runs in its own venv (it brings torch; TESTING.md "vLLM"). For each
repo shape of `agent.demo.shapes` (Llama 3.x with original/, .bin beside .safetensors, Mistral's
consolidated beside HF shards, .bin only):
1. the shape is generated with the vLLM venv's Python (so .bin and .pth are real torch.save files),
   laid out as a cache and staged into a SeaweedFS bucket;
2. `simswarm-agent pull ID --files vllm` runs as a process against a counting proxy in front of the
   server (tests/support/fault_server.py): the bytes it sends for blob GETs are the bytes downloaded;
3. huggingface_hub resolves the snapshot offline (`snapshot_download(local_files_only=True)`, no
   IncompleteSnapshotError) and `scan_cache_dir()` has no warnings;
4. `bench/vllm_reads.py`, under the vLLM venv with HF_HUB_OFFLINE=1, builds the ModelConfig, loads the
   tokenizer, runs `DefaultModelLoader._prepare_weights` and iterates every tensor;
5. the weight files vLLM loaded must be exactly the weight files pulled, and the bytes through the
   proxy exactly the selected files' bytes (weights vLLM loads plus the small files it reads by name);
6. `pull --files all` then adds exactly the skipped bytes.
Prints one line per shape and a summary; exit 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cache import RepoCache  # noqa: E402
from agent.demo.seaweed import SeaweedServer  # noqa: E402
from agent.demo.seed import fake_commit, seed_cache  # noqa: E402
from agent.demo.shapes import SHAPES  # noqa: E402
from agent.output import Output, human_bytes  # noqa: E402
from agent.selection import VLLM_VERSION, is_top_level, is_weight_file  # noqa: E402
from agent.settings import Settings  # noqa: E402
from agent.stage import stage_from_cache  # noqa: E402
from agent.store import Store  # noqa: E402
from tests.support.fault_server import FaultProxy  # noqa: E402
from tests.support.hf_cache import assert_clean_cache, resolve_offline  # noqa: E402

BUCKET = "vllm-check"
GENERATE = """
import sys
from agent.demo.shapes import generate_shape
generate_shape(sys.argv[1], sys.argv[2], shard_bytes=int(sys.argv[3]))
"""


def repo_id(shape: str) -> str:
    return f"simswarm-vllm-check/{shape}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "MINIO_", "AWS_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def generate(vllm_python: str, dest: Path, shape: str, shard_bytes: int) -> None:
    subprocess.run([vllm_python, "-c", GENERATE, str(dest), shape, str(shard_bytes)], env=clean_env(),
                   check=True, timeout=300)


def agent_pull(env: dict[str, str], model: str, files: str, report: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "agent", "--log-format", "json", "pull", model, "--files", files,
            "--report", str(report), "--no-fallback"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pull {model} --files {files} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def vllm_reads(vllm_python: str, hf_home: Path, models: list[str]) -> dict[str, dict[str, Any]]:
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
                    HF_ENDPOINT="http://127.0.0.1:9", VLLM_LOGGING_LEVEL="WARNING")
    done = subprocess.run([vllm_python, str(ROOT / "bench" / "vllm_reads.py"), *models], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["model"]] = row
    if not rows:
        raise RuntimeError(f"vllm_reads.py printed nothing ({done.returncode}): {done.stderr[-3000:]}")
    return rows


def snapshot_sizes(hub: Path, model: str) -> dict[str, int]:
    """Each placed file's size; a blob shared by two paths counts once (at its first path)."""
    cache = RepoCache(hub, model)
    commit = cache.read_ref("main")
    assert commit is not None
    sizes, seen = {}, set()
    for rel, path in sorted(cache.snapshot_entries(commit)):
        blob = os.path.realpath(path)
        sizes[rel] = 0 if blob in seen else path.stat().st_size
        seen.add(blob)
    return sizes


def blob_bytes(hub: Path, model: str) -> int:
    return sum(p.stat().st_size for p in RepoCache(hub, model).blobs.iterdir())


def check_shape(shape: str, pulled: dict[str, Any], proxy_bytes: int, sizes: dict[str, int],
                full_size: int, vllm: dict[str, Any], widened: dict[str, Any], widen_bytes: int,
                hub_ok: str) -> dict[str, Any]:
    serve = vllm.get("serve_path", {})
    weights_pulled = sorted(p for p in sizes if is_top_level(p) and is_weight_file(p))
    checks = {
        "huggingface_hub offline + scan_cache_dir clean": hub_ok == "",
        "vLLM accepted the cache (config, tokenizer, weights)":
            "error" not in vllm and serve.get("tensors", 0) > 0,
        "vLLM's weight files == weight files pulled": serve.get("weight_files") == weights_pulled,
        "proxy bytes == report bytes_downloaded": proxy_bytes == pulled["bytes_downloaded"],
        "bytes downloaded == bytes of the selected files": proxy_bytes == sum(sizes.values()),
        "widening pull fetched exactly the skipped bytes": widen_bytes == widened["bytes_downloaded"]
        == pulled["bytes_skipped"] == full_size - proxy_bytes,
    }
    saved = full_size - proxy_bytes
    shown = ("architectures", "tokenizer", "tokenizer_mode", "use_safetensors", "index", "weight_files",
             "tensors", "tensor_bytes", "opened_by_python")
    return {"shape": shape, "model": vllm.get("model"), "full_bytes": full_size, "downloaded": proxy_bytes,
            "saved": saved, "saved_pct": round(100 * saved / full_size, 1), "skipped": pulled["skipped"],
            "resolved_load_format": pulled["selection"].get("resolved_load_format"),
            "vllm": {k: serve.get(k) for k in shown},
            "vllm_error": vllm.get("error"), "bare_id": vllm.get("bare_id"), "hub_error": hub_ok,
            "checks": checks, "ok": all(checks.values())}


def run(vllm_python: str, work: Path, shard_bytes: int) -> list[dict[str, Any]]:
    quiet = Output(io.StringIO(), json_mode=True)
    seed_hub, hf_home = work / "seed" / "hub", work / "hf-home"
    sizes_full: dict[str, int] = {}
    for shape in SHAPES:
        source = work / "shapes" / shape
        generate(vllm_python, source, shape, shard_bytes)
        seed_cache(source, seed_hub, repo_id(shape), fake_commit(shape))
        sizes_full[shape] = blob_bytes(seed_hub, repo_id(shape))
    with SeaweedServer(work / "seaweed") as server:
        server.create_bucket(BUCKET)
        store = Store(Settings.from_env(server.env(BUCKET)))
        for shape in SHAPES:
            stage_from_cache(store, seed_hub, repo_id(shape), "main", quiet)
        with FaultProxy(server.endpoint_url, preserve_host=True) as proxy:
            env = clean_env(**{**server.env(BUCKET), "MINIO_ENDPOINT": proxy.endpoint_url},
                            HF_HOME=str(hf_home))
            pulled, proxy_bytes, hub_ok = {}, {}, {}
            for shape in SHAPES:
                proxy.clear()
                pulled[shape] = agent_pull(env, repo_id(shape), "vllm", work / f"{shape}-vllm.json")
                proxy_bytes[shape] = proxy.body_bytes("GET", "/blobs/")
                try:
                    assert_clean_cache(hf_home / "hub")
                    resolve_offline(hf_home / "hub", repo_id(shape))
                    hub_ok[shape] = ""
                except (AssertionError, RuntimeError) as exc:
                    hub_ok[shape] = str(exc)[-500:]
            sizes = {shape: snapshot_sizes(hf_home / "hub", repo_id(shape)) for shape in SHAPES}
            reads = vllm_reads(vllm_python, hf_home, [repo_id(s) for s in SHAPES])
            rows = []
            for shape in SHAPES:
                proxy.clear()
                widened = agent_pull(env, repo_id(shape), "all", work / f"{shape}-all.json")
                rows.append(check_shape(shape, pulled[shape], proxy_bytes[shape], sizes[shape],
                                        sizes_full[shape], reads.get(repo_id(shape), {"error": "no output"}),
                                        widened, proxy.body_bytes("GET", "/blobs/"), hub_ok[shape]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", default=os.environ.get("SIMSWARM_VLLM_PYTHON", sys.executable),
                        help="a Python with vllm installed (default: $SIMSWARM_VLLM_PYTHON, else this one)")
    parser.add_argument("--shard-bytes", type=int, default=128 * 1024, help="bytes per weight shard")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    try:
        rows = run(args.vllm_python, work, args.shard_bytes)
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"vLLM {VLLM_VERSION} rules; work folder {work}{'' if args.keep else ' (removed)'}")
    for row in rows:
        failed = [name for name, ok in row["checks"].items() if not ok]
        print(f"{row['shape']:<20} {row['resolved_load_format']:<8} "
              f"downloaded {human_bytes(row['downloaded']):>10} of {human_bytes(row['full_bytes']):>10}, "
              f"saved {human_bytes(row['saved']):>10} "
              f"({row['saved_pct']:5.1f} %); vLLM loaded {row['vllm']['weight_files']} "
              f"({row['vllm']['tensors']} tensors, {row['vllm']['tokenizer']}): "
              f"{'ok' if row['ok'] else 'FAILED: ' + '; '.join(failed)}")
        if row["vllm_error"]:
            print(f"    vLLM error: {row['vllm_error']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
