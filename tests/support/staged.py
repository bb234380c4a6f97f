"""A model staged in a bucket, and what a test checks after pulling it.

`quiet()` is an `Output` that keeps the agent's events to itself (JSON lines into a string); `stage` puts a
hub cache's model into a bucket as `simswarm-agent stage` does; `bucket_manifest` reads it back;
`assert_no_bad_final_blob` is the promise every failure test checks: whatever carries a final blob
name holds exactly that blob's bytes. `s5cmd_upload` makes a legacy bucket, as start.sh once did.
The engine checks say which engines this machine has.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from agent.cache import BLOB_RE, RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.manifest import Manifest
from agent.output import Output
from agent.remote import RemoteRepo
from agent.s3read import ObjectStore
from agent.settings import MODELS_PREFIX, Settings
from agent.stage import StageResult, stage_from_cache
from agent.store import Store
from agent.verify import check_content
from tests.support.cli import clean_env

PART = 1 << 16  # sidecar parts of 64 KiB: each ~256 KiB shard of the tiny model is several ranged GETs


def quiet() -> Output:
    return Output(io.StringIO(), json_mode=True)


def stage(settings: Settings, cache_dir: Path, repo_id: str, part_size: int = PART) -> StageResult:
    """Stage `repo_id`@main from the hub cache `cache_dir` into the bucket of `settings`."""
    return stage_from_cache(Store(settings), cache_dir, repo_id, "main", quiet(), part_size=part_size)


def s5cmd_upload(s3_server: SeaweedServer, cache_dir: Path, bucket: str) -> None:
    """What start.sh did before `stage`: `s5cmd cp` of a whole hub cache into the models prefix, links
    followed (a legacy bucket: blobs plus full snapshot copies)."""
    env = clean_env(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
                    AWS_REGION="us-east-1")
    done = subprocess.run(["s5cmd", "--endpoint-url", s3_server.endpoint_url, "cp", f"{cache_dir}/",
                           f"s3://{bucket}/{MODELS_PREFIX}"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def copy_legacy(store: ObjectStore, hub_cache: Path, repo_id: str, commit: str) -> None:
    """What `s5cmd cp` of a cache made before 1.0 leaves, written through the agent's own interface:
    blobs, a full copy of every snapshot file, refs/main; no trees/ and no sidecar."""
    remote = RemoteRepo(store, repo_id)
    cache = RepoCache(hub_cache, repo_id)
    for blob in cache.blobs.iterdir():
        store.put_bytes(remote.blob_key(blob.name), blob.read_bytes())
    for relpath, path in cache.snapshot_entries(commit):
        store.put_bytes(remote.key("snapshots", commit, relpath), path.read_bytes())
    store.put_bytes(remote.ref_key("main"), commit.encode())


def bucket_manifest(settings: Settings, repo_id: str, revision: str = "main") -> Manifest:
    return RemoteRepo(Store(settings), repo_id).load(revision).manifest


def assert_no_bad_final_blob(cache: RepoCache, manifest: Manifest) -> None:
    """Hash every file under a final blob name: each must be a blob of the manifest with its bytes."""
    if not cache.blobs.is_dir():
        return
    blobs = manifest.blobs()
    for path in cache.blobs.iterdir():
        if BLOB_RE.match(path.name):
            assert path.name in blobs, f"unexpected blob {path.name}"
            assert check_content(path, blobs[path.name]) is None, f"wrong bytes under {path.name}"


def native_available() -> bool:
    try:
        from agent.engines.native import NativeEngine

        return NativeEngine.available()
    except ImportError:
        return False


def s5cmd_available() -> bool:
    from agent.engines.s5cmd import S5cmdEngine

    return S5cmdEngine.available()


NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="no native ext"))
S5CMD = pytest.param("s5cmd", marks=pytest.mark.skipif(not s5cmd_available(), reason="no s5cmd"))
ENGINES = ["python", NATIVE, S5CMD]  # every engine, each skipped where this machine lacks it
