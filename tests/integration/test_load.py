"""Eight agents at once against one S3 server: every pull succeeds with identical content.

Eight `python -m agent pull --engine auto` processes (separate caches, as eight pods on one node would
have) fetch one model of 4 shards x 2 MiB from one SeaweedFS. Printed (run with `-s`): the aggregate
throughput and the retries each agent's `--report` records. No timing is asserted: this 2-core machine is
shared, and the figure is for the README, not a gate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.manifest import parse_manifest
from agent.output import Output
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from agent.testbed.model import generate_model
from agent.testbed.seaweed import SeaweedServer
from agent.verify import audit_cache
from tests.support.fake_hub import FakeHub, read_tree
from tests.support.hf_cache import assert_clean_cache, build_hf_cache

ROOT = Path(__file__).resolve().parents[2]
REPO = "simswarm-test/load-llama"
AGENTS = 8


@pytest.fixture(scope="module")
def load_bucket(s3_server: SeaweedServer, fake_hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> str:
    source = tmp_path_factory.mktemp("load-model")
    generate_model(source, shards=4, shard_bytes=2 << 20, seed=11)
    fake_hub.add_repo(REPO, read_tree(source))
    cache_dir = tmp_path_factory.mktemp("load-hf-home") / "hub"
    build_hf_cache(fake_hub, REPO, cache_dir)
    bucket = s3_server.create_bucket("t-load")
    stage_from_cache(Store(Settings.from_env(s3_server.env(bucket))), cache_dir, REPO, "main",
                     Output(io.StringIO(), json_mode=True), part_size=1 << 20)
    return bucket


def snapshot_digest(snapshot: Path) -> dict[str, str]:
    return {p.relative_to(snapshot).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(snapshot.rglob("*")) if p.is_file()}


def test_eight_agents_pulling_one_model_at_once_all_succeed_with_identical_content(
        s3_server: SeaweedServer, load_bucket: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MINIO_", "AWS_"))}
    env.update(s3_server.env(load_bucket), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    homes = [tmp_path / f"pod-{i}" for i in range(AGENTS)]
    reports = [tmp_path / f"report-{i}.json" for i in range(AGENTS)]
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "agent", "--log-format", "json", "pull", REPO,
                               "--engine", "auto", "--hf-home", str(home), "--no-fallback",
                               "--report", str(report)],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for home, report in zip(homes, reports, strict=True)]
    errors = []
    try:
        for proc in procs:
            errors.append(proc.communicate(timeout=120)[1])
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    wall = time.monotonic() - started
    for proc, stderr in zip(procs, errors, strict=True):
        assert proc.returncode == 0, stderr[-2000:]

    results = [json.loads(r.read_text()) for r in reports]
    assert {r["source"] for r in results} == {"minio"}
    total = sum(int(r["bytes_downloaded"]) for r in results)
    model = int(results[0]["bytes_downloaded"])
    assert total == AGENTS * model
    digests = []
    for home, result in zip(homes, results, strict=True):
        cache = RepoCache(home / "hub", REPO)
        commit = result["commit"]
        manifest = parse_manifest(cache.tree_path(commit).read_bytes())
        assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
        digests.append(snapshot_digest(Path(result["snapshot_path"])))
    assert_clean_cache(homes[0] / "hub")
    assert all(d == digests[0] for d in digests)
    seconds = [float(r["seconds"]) for r in results]
    print(f"\nload: {AGENTS} agents x {model / 2**20:.1f} MiB ({results[0]['engine']} engine), "
          f"wall {wall:.1f} s including process start; aggregate {total / wall / 2**20:.1f} MiB/s "
          f"(wall), {total / max(seconds) / 2**20:.1f} MiB/s (slowest pull's own timer); per-agent seconds "
          f"{[round(s, 2) for s in seconds]}; retries {[r['retries'] for r in results]}")
