#!/usr/bin/env python3
"""The regimes `bench.py` does not show: fixed cost, many files, a capped link, and resume after a kill.

One invocation starts one loopback SeaweedFS and runs, each with its own staged model:

  fixed     a 1 MB model (config, tokenizer, one shard): `agent pull` against `s5cmd cp` of its blobs,
            as processes; what is left is the per-pull cost, not bandwidth
  files     N small files (default 20,000) under `ulimit -n 1024` (a container default): every engine
            against `s5cmd cp`, and the per-file cost (median seconds / files)
  capped    loopback shaped with `tc ... tbf` (root; a pod's regime: CPU plentiful, the link the limit):
            the link measured by parallel curl in the same run, then the agent (compact and legacy
            bucket) and `s5cmd cp`, as fractions of the link
  resume    one 200 MiB shard, on the capped link (slow enough to strike mid-transfer): the native pull
            is SIGKILLed (and, separately, SIGTERMed) once its checkpoint shows half the shard; the rerun's
            `bytes_downloaded` over the model size is the figure (compact and legacy buckets)

Usage: see bench/README.md. Results go to bench/out/regimes.json; the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from agent.cache import STATE_SUFFIX  # noqa: E402
from agent.demo.seed import seed_cache  # noqa: E402
from agent.output import Output  # noqa: E402
from agent.settings import MODELS_PREFIX  # noqa: E402
from agent.stage import stage_from_cache  # noqa: E402
from agent.store import Store  # noqa: E402
from bench import (  # noqa: E402
    COMPACT_BUCKET,
    LEGACY_BUCKET,
    MIB,
    BenchError,
    Testbed,
    curl_method,
    machine_info,
    run_main,
    s5cmd_binary,
    write_results,
)

DEFAULT_OUT = ROOT / "bench" / "out" / "regimes.json"
NOFILE = 1024
TIMEOUT = 1800


def nofile_1024() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def timed(argv: list[str], env: dict[str, str], *, limit_files: bool = False) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=nofile_1024 if limit_files else None, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])} ... exited {proc.returncode}: {proc.stderr[-1200:]}")
    return seconds


def agent_argv(repo_id: str, dest: Path, engine: str = "native", *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent", "--log-format", "json", "pull", repo_id, "--hf-home", str(dest),
            "--engine", engine, "--no-fallback", *extra]


def s5cmd_argv(bed: Testbed, bucket: str, repo_id: str, dest: Path) -> list[str]:
    folder = f"{MODELS_PREFIX}models--{repo_id.replace('/', '--')}/blobs/*"
    return [s5cmd_binary(), "--endpoint-url", bed.server.endpoint_url, "cp", f"s3://{bucket}/{folder}",
            f"{dest}/"]


def median_of(rounds: int, scratch: Path, run: Callable[[Path], float]) -> dict[str, Any]:
    samples = []
    for _ in range(rounds):
        dest = scratch / "run"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        os.sync()
        samples.append(run(dest))
        shutil.rmtree(dest, ignore_errors=True)
    return {"median_s": round(statistics.median(samples), 4), "samples_s": [round(s, 4) for s in samples]}


def env_for(bed: Testbed, bucket: str) -> dict[str, str]:
    return {**bed.agent_env(), "MINIO_BUCKET": bucket}


def stage_dir(bed: Testbed, model: Path, repo_id: str, bucket: str, commit: str) -> None:
    hub = model.parent / f"{model.name}-hub"
    seed_cache(model, hub, repo_id, commit)
    bed.server.create_bucket(bucket)
    stage_from_cache(Store(bed.settings(bucket)), hub, repo_id, "main", Output(io.StringIO(), json_mode=True))
    shutil.rmtree(hub)


# -- fixed cost -------------------------------------------------------------------------------------

def fixed_cost(bed: Testbed, rounds: int, scratch: Path) -> dict[str, Any]:
    from agent.demo.model import generate_model

    model = bed.work / "tiny-model"
    generate_model(model, shards=1, shard_bytes=1_000_000)
    stage_dir(bed, model, "bench/tiny", "tiny", "1" * 40)
    env = env_for(bed, "tiny")
    rows = {
        "agent-native": median_of(rounds, scratch, lambda d: timed(agent_argv("bench/tiny", d), env)),
        "s5cmd-blobs": median_of(rounds, scratch, lambda d: timed(s5cmd_argv(bed, "tiny", "bench/tiny", d),
                                                                  bed.aws_env())),
        "python-startup": median_of(rounds, scratch, lambda d: timed([sys.executable, "-c", "pass"], env)),
    }
    return {"model_bytes": sum(p.stat().st_size for p in model.rglob("*") if p.is_file()), "rows": rows}


# -- many files -------------------------------------------------------------------------------------

def many_files(bed: Testbed, files: int, rounds: int, scratch: Path) -> dict[str, Any]:
    model = bed.work / "files-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    for i in range(files):
        sub = model / "chunks" / f"{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.bin").write_bytes(i.to_bytes(4, "big") * 128)  # 512 B, all distinct
    started = time.perf_counter()
    stage_dir(bed, model, "bench/many-files", "files", "2" * 40)
    staged_s = time.perf_counter() - started
    shutil.rmtree(model)
    env = env_for(bed, "files")
    rows = {}

    def agent_run(engine: str) -> Callable[[Path], float]:
        return lambda d: timed(agent_argv("bench/many-files", d, engine), env, limit_files=True)

    for engine in ("native", "python", "s5cmd"):
        rows[f"agent-{engine}"] = median_of(rounds, scratch, agent_run(engine))
    rows["s5cmd-blobs"] = median_of(rounds, scratch, lambda d: timed(
        s5cmd_argv(bed, "files", "bench/many-files", d), bed.aws_env(), limit_files=True))
    for row in rows.values():
        row["ms_per_file"] = round(row["median_s"] / (files + 1) * 1000, 3)
    return {"files": files + 1, "stage_s": round(staged_s, 1), "nofile": NOFILE, "rows": rows}


# -- capped link and resume -------------------------------------------------------------------------

@contextlib.contextmanager
def capped_loopback(rate: str) -> Iterator[None]:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "4mb",
                    "latency", "50ms"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)


def capped(bed: Testbed, rounds: int, scratch: Path) -> dict[str, Any]:
    link = curl_method(bed, 8)
    compact, legacy = env_for(bed, COMPACT_BUCKET), env_for(bed, LEGACY_BUCKET)
    rows = {
        "curl-8 (link)": median_of(rounds, scratch, lambda d: link.run(d).seconds),
        "agent-native": median_of(rounds, scratch, lambda d: timed(agent_argv("simswarm-bench/llama", d),
                                                                   compact)),
        "agent-native-legacy": median_of(rounds, scratch, lambda d: timed(
            agent_argv("simswarm-bench/llama", d), legacy)),
        "s5cmd-blobs": median_of(rounds, scratch, lambda d: timed(
            s5cmd_argv(bed, COMPACT_BUCKET, "simswarm-bench/llama", d), bed.aws_env())),
    }
    link_s = rows["curl-8 (link)"]["median_s"]
    for row in rows.values():
        row["x_link"] = round(link_s / row["median_s"], 4)
        row["gb_per_s"] = round(bed.model_bytes / row["median_s"] / 1e9, 4)
    return {"model_bytes": bed.model_bytes, "rows": rows}


def checkpointed(hf_home: Path) -> int:
    total = 0
    for state in hf_home.glob(f"hub/*/blobs/*{STATE_SUFFIX}"):
        with contextlib.suppress(OSError, ValueError):
            total += sum(e - s for s, e in json.loads(state.read_text()).get("have", []))
    return total


def resume_once(bed: Testbed, bucket: str, repo_id: str, shard: int, sig: int, dest: Path) -> dict[str, Any]:
    env = env_for(bed, bucket)
    proc = subprocess.Popen(agent_argv(repo_id, dest), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while checkpointed(dest) < shard // 2:
        if proc.poll() is not None:
            raise BenchError("the pull finished before half the shard was checkpointed; cap the link lower")
        if time.monotonic() > deadline:
            raise BenchError("no checkpoint of half the shard within 300 s")
        time.sleep(0.005)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    kept = checkpointed(dest)
    report = dest / "report.json"
    timed([*agent_argv(repo_id, dest), "--report", str(report)], env)
    downloaded = json.loads(report.read_text())["bytes_downloaded"]
    return {"kept_bytes": kept, "rerun_bytes": downloaded}


def resume(bed: Testbed, size_mib: int, scratch: Path) -> dict[str, Any]:
    from agent.demo.model import generate_model

    model = bed.work / "resume-model"
    generate_model(model, shards=1, shard_bytes=size_mib * MIB)
    model_bytes = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    shard = max(p.stat().st_size for p in model.glob("*.safetensors"))
    stage_dir(bed, model, "bench/resume", "resume", "3" * 40)
    legacy_hub = bed.work / "resume-legacy-hub"
    seed_cache(model, legacy_hub / "hub", "bench/resume", "3" * 40)
    bed.server.create_bucket("resume-legacy")
    argv = [s5cmd_binary(), "--endpoint-url", bed.server.endpoint_url, "cp", f"{legacy_hub / 'hub'}/",
            f"s3://resume-legacy/{MODELS_PREFIX}"]
    subprocess.run(argv, env=bed.aws_env(), check=True, capture_output=True)
    shutil.rmtree(legacy_hub)
    rows = {}
    for bucket in ("resume", "resume-legacy"):
        for sig in (signal.SIGKILL, signal.SIGTERM):
            dest = scratch / f"resume-{bucket}-{sig}"
            shutil.rmtree(dest, ignore_errors=True)
            row = resume_once(bed, bucket, "bench/resume", shard, sig, dest)
            row["rerun_fraction"] = round(row["rerun_bytes"] / model_bytes, 4)
            rows[f"{bucket}/{signal.Signals(sig).name}"] = row
            shutil.rmtree(dest, ignore_errors=True)
    return {"model_bytes": model_bytes, "shard_bytes": shard, "rows": rows}


# -- command line ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", default="fixed,files,capped,resume",
                        help="comma-separated sections (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--files-rounds", type=int, default=1)
    parser.add_argument("--capped-mib", type=int, default=1024, help="model size for the capped link")
    parser.add_argument("--rate", default="4000mbit", help="tc tbf rate for the capped link")
    parser.add_argument("--resume-mib", type=int, default=200)
    parser.add_argument("--resume-rate", default="800mbit", help="tc tbf rate while striking mid-shard")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def format_rows(title: str, rows: dict[str, dict[str, Any]], keys: list[str]) -> str:
    lines = [title, f"  {'method':<24}" + "".join(f"{k:>16}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"  {name:<24}" + "".join(f"{row.get(k, '-')!s:>16}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = set(args.only.split(","))
    results: dict[str, Any] = {"machine": {"before": machine_info()}, "config": vars(args) | {
        "workdir": str(args.workdir), "out": str(args.out)}}
    tables = []
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="simswarm-regimes-", dir=args.workdir))
    quiet = Output(io.StringIO(), json_mode=True)
    bed = Testbed(work, args.capped_mib if "capped" in sections else 4, 4, quiet)
    try:
        bed.start()
        scratch = work / "runs"
        if "fixed" in sections:
            results["fixed"] = fixed_cost(bed, max(5, args.rounds), scratch)
            tables.append(format_rows(f"fixed cost, a {results['fixed']['model_bytes']} B model",
                                      results["fixed"]["rows"], ["median_s"]))
        if "files" in sections:
            results["files"] = many_files(bed, args.files, args.files_rounds, scratch)
            tables.append(format_rows(f"{results['files']['files']} files, ulimit -n {NOFILE}",
                                      results["files"]["rows"], ["median_s", "ms_per_file"]))
        if "capped" in sections:
            with capped_loopback(args.rate):
                results["capped"] = capped(bed, args.rounds, scratch)
            tables.append(format_rows(f"capped link (tc tbf {args.rate}), {bed.model_bytes} B",
                                      results["capped"]["rows"], ["median_s", "gb_per_s", "x_link"]))
        if "resume" in sections:
            with capped_loopback(args.resume_rate):
                results["resume"] = resume(bed, args.resume_mib, scratch)
            tables.append(format_rows(f"resume after a stop at half of a {results['resume']['shard_bytes']} "
                                      "B shard (native)", results["resume"]["rows"],
                                      ["kept_bytes", "rerun_bytes", "rerun_fraction"]))
    finally:
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["after"] = machine_info()
    table = "\n\n".join(tables)
    results["table"] = table
    print(table)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    run_main(main, "regimes")
