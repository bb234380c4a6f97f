#!/usr/bin/env python3
"""Many pods at once: N agents pull one model from one S3 server, each into its own cache.

One loopback SeaweedFS, one generated safetensors model staged compact. Two phases, each preceded by
the serving limit measured in the same run (N parallel `curl -o /dev/null` of every blob's presigned
URL, through the same path the agents use):

  clean      N `python -m agent pull` processes started together, straight to the server;
  slowdown   the same through a fault proxy that answers `503 SlowDown` (Retry-After: 1) to one request
             in `--slowdown-every` (default 3) for the first `--slowdown-seconds` (default 10) of the
             phase, then relays everything (the limit of this phase is measured through the proxy).

Every pod must exit 0 with `source: minio` and a snapshot whose files hash equal to every other pod's.
Reported per phase: aggregate model bytes per second (N x model / wall from the first start to the last
exit) against the limit, pod-ready times (process start to exit, interpreter included: when a pod would
exec vLLM) as p50 / p99 / max, and the retries each agent's `--report` records, plus the 503s served.
Figures drift with the machine's load: run it alone, and read ratios measured in one run.

    python bench/many_pods.py                       # 16 pods x 256 MiB (the issue's size)
    python bench/many_pods.py --pods 8 --size-mib 16 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.model import generate_model  # noqa: E402
from agent.demo.seaweed import SeaweedServer  # noqa: E402
from agent.demo.seed import fake_commit, seed_cache  # noqa: E402
from agent.output import Output  # noqa: E402
from agent.remote import RemoteRepo  # noqa: E402
from agent.settings import Settings  # noqa: E402
from agent.stage import stage_from_cache  # noqa: E402
from agent.store import Store  # noqa: E402
from tests.support.cli import clean_env  # noqa: E402
from tests.support.fault_server import FaultProxy  # noqa: E402

REPO_ID = "simswarm-bench/many-pods"
MIB = 1 << 20


@dataclass
class Pod:
    index: int
    returncode: int
    ready_s: float  # process start to exit
    retries: int = 0
    bytes_downloaded: int = 0
    source: str = ""
    digest: str = ""  # sha256 over the snapshot's files, in path order
    error: str = ""


@dataclass
class Phase:
    name: str
    pods: list[Pod]
    wall_s: float
    model_bytes: int
    limit_bps: float  # the serving limit of this phase's path, measured just before it
    slowdowns: int = 0  # 503s the proxy served
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        digests = {p.digest for p in self.pods}
        return all(p.returncode == 0 and p.source == "minio" for p in self.pods) and len(digests) == 1

    def summary(self) -> dict[str, Any]:
        ready = sorted(p.ready_s for p in self.pods)
        aggregate = len(self.pods) * self.model_bytes / self.wall_s
        return {"phase": self.name, "pods": len(self.pods), "ok": self.ok,
                "model_mib": round(self.model_bytes / MIB, 1), "wall_s": round(self.wall_s, 2),
                "aggregate_mb_s": round(aggregate / 1e6, 1), "limit_mb_s": round(self.limit_bps / 1e6, 1),
                "x_limit": round(aggregate / self.limit_bps, 2) if self.limit_bps else None,
                "ready_p50_s": round(quantile(ready, 0.50), 2),
                "ready_p99_s": round(quantile(ready, 0.99), 2),
                "ready_max_s": round(ready[-1], 2), "ready_min_s": round(ready[0], 2),
                "retries": [p.retries for p in self.pods], "retries_total": sum(p.retries for p in self.pods),
                "slowdowns_served": self.slowdowns}


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), for a small sample."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def snapshot_digest(snapshot: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        digest.update(path.relative_to(snapshot).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(8 * MIB):
                digest.update(chunk)
    return digest.hexdigest()


def stage_model(server: SeaweedServer, bucket: str, workdir: Path, size_mib: int, shards: int) -> int:
    """Generate and stage the model (compact, default 16 MiB part digests); its size in bytes."""
    source, cache = workdir / "model", workdir / "stage-cache" / "hub"
    generate_model(source, shards=shards, shard_bytes=max(1, size_mib * MIB // shards), seed=5)
    seed_cache(source, cache, REPO_ID, fake_commit(REPO_ID))
    shutil.rmtree(source)  # the cache holds the bytes now
    store = Store(Settings.from_env(server.env(bucket)))
    stage_from_cache(store, cache, REPO_ID, "main", Output(io.StringIO(), json_mode=True))
    shutil.rmtree(cache.parent)
    return RemoteRepo(store, REPO_ID).load("main").manifest.total_size


def pod_env(server: SeaweedServer, bucket: str, endpoint: str | None = None) -> dict[str, str]:
    env = clean_env(**server.env(bucket))
    if endpoint is not None:
        env["MINIO_ENDPOINT"] = endpoint
    return env


def run_pods(env: dict[str, str], workdir: Path, pods: int, *, engine: str = "auto",
             timeout: float = 900) -> tuple[list[Pod], float]:
    """Start `pods` agents together, each with its own HF_HOME; wait for all. (pods, wall seconds)."""
    homes = [workdir / f"pod-{i}" for i in range(pods)]
    argv = [sys.executable, "-m", "agent", "--log-format", "json", "pull", REPO_ID, "--engine", engine,
            "--no-fallback"]
    started = time.monotonic()
    procs = []
    for home in homes:
        procs.append((time.monotonic(), subprocess.Popen(
            [*argv, "--hf-home", str(home), "--report", str(home / "report.json")], env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)))
    ended: dict[int, float] = {}
    errors: dict[int, str] = {}

    def wait_one(i: int) -> None:
        errors[i] = procs[i][1].communicate(timeout=timeout)[1]
        ended[i] = time.monotonic()

    try:
        with ThreadPoolExecutor(pods) as pool:
            list(pool.map(wait_one, range(pods)))
    finally:
        for _, proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    wall = max(ended.values()) - started
    return [read_pod(i, home, procs[i][1].returncode, ended[i] - procs[i][0], errors.get(i, ""))
            for i, home in enumerate(homes)], wall


def read_pod(index: int, home: Path, returncode: int, ready: float, stderr: str) -> Pod:
    pod = Pod(index, returncode, ready, error=stderr.strip().splitlines()[-1][:300] if returncode else "")
    report = home / "report.json"
    if report.exists():
        result = json.loads(report.read_text())
        pod.retries = int(result.get("retries", 0))
        pod.bytes_downloaded = int(result.get("bytes_downloaded", 0))
        pod.source = str(result.get("source", ""))
        if returncode == 0:
            pod.digest = snapshot_digest(Path(result["snapshot_path"]))
    return pod


def serving_limit(store: Store, keys: list[str], parallel: int) -> float:
    """Bytes/s of `parallel` concurrent `curl -o /dev/null`, each fetching every blob once, signed for
    `store`'s endpoint (the server, or the proxy in front of it)."""
    urls = [store.presign(key, expires=3600) for key in keys]
    jobs = [url for _ in range(parallel) for url in urls]

    def fetch(url: str) -> int:
        done = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:  # never print the URL: its query is a signature
            raise RuntimeError(f"curl of {url.split('?', 1)[0]} failed with exit {done.returncode}")
        return int(done.stdout or 0)

    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        total = sum(pool.map(fetch, jobs))
    return total / (time.monotonic() - started)


def slowdown_storm(every: int, seconds: float) -> Callable[[str, str, str | None], bool]:
    """A fault matcher: one request in `every` for the first `seconds` after the first request."""
    counter = itertools.count()
    first: list[float] = []

    def matches(_method: str, _path: str, _range: str | None) -> bool:
        now = time.monotonic()
        if not first:
            first.append(now)
        return now - first[0] < seconds and next(counter) % every == 0

    return matches


def clean_homes(workdir: Path) -> None:
    for home in workdir.glob("pod-*"):
        shutil.rmtree(home, ignore_errors=True)


def run_phase(name: str, env: dict[str, str], keys: list[str], model_bytes: int, workdir: Path,
              pods: int, engine: str, proxy: FaultProxy | None = None,
              storm: tuple[int, float] | None = None, *, keep: bool = False) -> Phase:
    """Measure the path's serving limit, then run the pods (through `proxy` with a 503 `storm` of
    (one in N requests, for S seconds) when given). The pods' caches are removed unless `keep`."""
    limit = serving_limit(Store(Settings.from_env(env)), keys, pods)
    if proxy is not None:
        proxy.clear()
        if storm is not None:
            proxy.add_fault("slowdown", count=10**9, match=slowdown_storm(*storm))
    results, wall = run_pods(env, workdir, pods, engine=engine)
    phase = Phase(name, results, wall, model_bytes, limit,
                  slowdowns=proxy.count(fault="slowdown") if proxy is not None else 0)
    if not keep:
        clean_homes(workdir)
    return phase


@contextlib.contextmanager
def testbed(workdir: Path) -> Iterator[SeaweedServer]:
    with SeaweedServer(workdir / "seaweed") as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=16)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--slowdown-every", type=int, default=3)
    parser.add_argument("--slowdown-seconds", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the phases' summaries here")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="many-pods-")))
        workdir.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(testbed(workdir))
        bucket = server.create_bucket("many-pods")
        model_bytes = stage_model(server, bucket, workdir, args.size_mib, args.shards)
        store = Store(Settings.from_env(server.env(bucket)))
        snap = RemoteRepo(store, REPO_ID).load("main")
        keys = sorted(set(snap.sources.values()))
        load_before = os.getloadavg()[0]
        clean = run_phase("clean", pod_env(server, bucket), keys, model_bytes, workdir, args.pods,
                          args.engine)
        proxy = stack.enter_context(FaultProxy(server.endpoint_url, preserve_host=True))
        storm = run_phase("slowdown", pod_env(server, bucket, proxy.endpoint_url), keys,
                          model_bytes, workdir, args.pods, args.engine, proxy,
                          (args.slowdown_every, args.slowdown_seconds))
        summaries = [clean.summary(), storm.summary()]
        for phase, summary in zip((clean, storm), summaries, strict=True):
            summary["failures"] = [asdict(p) for p in phase.pods if p.returncode != 0]
        summaries[0]["load_before"] = round(load_before, 2)
        summaries[1]["load_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(summaries, indent=2))
        if args.json is not None:
            args.json.write_text(json.dumps(summaries, indent=2))
        return 0 if clean.ok and storm.ok else 1


if __name__ == "__main__":
    sys.exit(main())
