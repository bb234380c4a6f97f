"""Many pods at once against one S3 server: every pull succeeds with identical content, in calm and in a
storm of `503 SlowDown`.

Sixteen `python -m agent pull --engine auto` processes (separate caches, as sixteen pods would have)
fetch one model of 4 shards x 4 MiB from one SeaweedFS, through `bench/many_pods.py`'s harness (the same
code as the large run, 16 x 256 MiB, whose figures are in the README). Sized for CI: 16 MiB, not 256,
because on a 2-core box the sixteen interpreter starts alone take several seconds. The second test
puts a fault proxy in front that answers `503 SlowDown` (Retry-After: 1) to one request in three for
the first 10 s. Printed (run with `-s`): aggregate throughput against the serving limit measured in the
same run (parallel curl), p50/p99/max pod-ready times, retries. No timing is asserted: the machine is
shared, and the figures are for the README, not a gate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.demo.model import generate_model
from agent.demo.seaweed import SeaweedServer
from agent.demo.seed import fake_commit, seed_cache
from agent.remote import RemoteRepo
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from bench.many_pods import REPO_ID, Phase, pod_env, run_phase
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache
from tests.support.staged import quiet

PODS = 16
SHARDS, SHARD_MIB = 4, 4


@pytest.fixture(scope="module")
def load_bucket(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    source = tmp_path_factory.mktemp("load-model")
    generate_model(source, shards=SHARDS, shard_bytes=SHARD_MIB << 20, seed=11)
    cache = tmp_path_factory.mktemp("load-hf-home") / "hub"
    seed_cache(source, cache, REPO_ID, fake_commit(REPO_ID))
    bucket = s3_server.create_bucket("t-load")
    stage_from_cache(Store(Settings.from_env(s3_server.env(bucket))), cache, REPO_ID, "main",
                     quiet(), part_size=1 << 20)
    return bucket


@pytest.fixture(scope="module")
def blob_keys(s3_server: SeaweedServer, load_bucket: str) -> list[str]:
    snap = RemoteRepo(Store(Settings.from_env(s3_server.env(load_bucket))), REPO_ID).load("main")
    return sorted(set(snap.sources.values()))


@pytest.fixture
def slow_down_proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        yield proxy


def model_bytes(s3_server: SeaweedServer, bucket: str) -> int:
    store = Store(Settings.from_env(s3_server.env(bucket)))
    return RemoteRepo(store, REPO_ID).load("main").manifest.total_size


def assert_every_pod_ready_with_identical_content(phase: Phase) -> None:
    for pod in phase.pods:
        assert pod.returncode == 0, pod.error
        assert pod.source == "minio" and pod.bytes_downloaded == phase.model_bytes
    assert len({pod.digest for pod in phase.pods}) == 1
    assert phase.ok


def report(phase: Phase) -> None:
    s = phase.summary()
    print(f"\nload ({s['phase']}): {s['pods']} pods x {s['model_mib']} MiB: wall {s['wall_s']} s, aggregate "
          f"{s['aggregate_mb_s']} MB/s against a serving limit of {s['limit_mb_s']} MB/s ({s['x_limit']}x); "
          f"ready p50/p99/max {s['ready_p50_s']}/{s['ready_p99_s']}/{s['ready_max_s']} s "
          f"(min {s['ready_min_s']}); retries {s['retries']}; 503s served {s['slowdowns_served']}")


def test_sixteen_pods_pulling_one_model_at_once_all_succeed_with_identical_content(
        s3_server: SeaweedServer, load_bucket: str, blob_keys: list[str], tmp_path: Path) -> None:
    size = model_bytes(s3_server, load_bucket)
    phase = run_phase("clean", pod_env(s3_server, load_bucket), blob_keys, size, tmp_path, PODS, "auto",
                      keep=True)
    report(phase)
    assert_every_pod_ready_with_identical_content(phase)
    assert_clean_cache(tmp_path / "pod-0" / "hub")


def test_sixteen_pods_all_succeed_through_ten_seconds_of_slowdown_on_a_third_of_requests(
        s3_server: SeaweedServer, load_bucket: str, blob_keys: list[str], slow_down_proxy: FaultProxy,
        tmp_path: Path) -> None:
    size = model_bytes(s3_server, load_bucket)
    env = pod_env(s3_server, load_bucket, slow_down_proxy.endpoint_url)
    phase = run_phase("slowdown", env, blob_keys, size, tmp_path, PODS, "auto", slow_down_proxy, (3, 10.0),
                      keep=True)
    report(phase)
    assert_every_pod_ready_with_identical_content(phase)
    assert phase.slowdowns > 0, "the storm never reached a request"
    assert sum(pod.retries for pod in phase.pods) > 0  # the engines met 503s and retried them
