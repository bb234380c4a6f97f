"""`stage` and `list` against the real SeaweedFS, staging a cache that huggingface_hub itself wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.errors import NotFoundError, VerificationError
from agent.manifest import parse_manifest, parse_sidecar
from agent.remote import RemoteRepo, staged_models
from agent.settings import MODELS_PREFIX, Settings
from agent.stage import stage_from_cache
from agent.store import Store
from tests.support.staged import quiet, s5cmd_upload

PART = 1 << 16  # small parts so the tiny model's shards have several


def keys(s3_server: SeaweedServer, bucket: str) -> dict[str, dict[str, object]]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return {o["Key"]: {"size": o["Size"], "mtime": o["LastModified"], "etag": o["ETag"]}
            for o in listing.get("Contents", [])}


def test_stage_writes_exactly_blobs_refs_manifest_and_sidecar(settings: Settings, hf_cache: Path,
                                                              model_repo: tuple[str, str],
                                                              s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, commit = model_repo
    local = RepoCache(hf_cache, repo_id)
    result = stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    assert result.commit == commit

    prefix = f"{MODELS_PREFIX}models--simswarm-test--tiny-llama/"
    blob_names = sorted(p.name for p in local.blobs.iterdir())
    expected = {prefix + f"blobs/{n}" for n in blob_names}
    expected |= {prefix + "refs/main", prefix + f"trees/{commit}.json", prefix + f"parts/{commit}.json"}
    found = keys(s3_server, bucket)
    assert set(found) == expected
    for name in blob_names:
        assert found[prefix + f"blobs/{name}"]["size"] == local.blob_path(name).stat().st_size

    client = s3_server.client()
    ref = client.get_object(Bucket=bucket, Key=prefix + "refs/main")["Body"].read()
    assert ref == commit.encode()  # no trailing newline, as huggingface_hub writes refs
    tree_key = f"{prefix}trees/{commit}.json"
    staged = parse_manifest(client.get_object(Bucket=bucket, Key=tree_key)["Body"].read())
    # the staged manifest agrees with the tree file huggingface_hub wrote itself
    assert staged.files == parse_manifest(local.tree_path(commit).read_bytes()).files
    sidecar_key = f"{prefix}parts/{commit}.json"
    sidecar = parse_sidecar(client.get_object(Bucket=bucket, Key=sidecar_key)["Body"].read())
    assert sidecar.part_size == PART
    assert set(sidecar.parts) == set(blob_names)
    shard = max(blob_names, key=lambda n: local.blob_path(n).stat().st_size)
    assert len(sidecar.parts[shard]) > 1


def test_staging_twice_uploads_nothing(settings: Settings, hf_cache: Path, model_repo: tuple[str, str],
                                       s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, _ = model_repo
    first = stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    assert first.uploaded_blobs == first.blobs and first.uploaded_metadata == 3
    before = keys(s3_server, bucket)
    second = stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    assert (second.uploaded_blobs, second.uploaded_bytes, second.uploaded_metadata) == (0, 0, 0)
    assert keys(s3_server, bucket) == before  # same objects, same mtimes and ETags: nothing rewritten


def test_restage_replaces_a_blob_object_that_lost_its_bytes(settings: Settings, hf_cache: Path,
                                                            model_repo: tuple[str, str],
                                                            s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, _ = model_repo
    stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    remote = RemoteRepo(Store(settings), repo_id)
    victim = next(o.key for o in remote.listing() if "/blobs/" in o.key)
    s3_server.client().put_object(Bucket=bucket, Key=victim, Body=b"truncated")  # no sha256 metadata
    again = stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    assert again.uploaded_blobs == 1
    assert Store(settings).head(victim) is not None
    assert Store(settings).head(victim).size > len(b"truncated")  # type: ignore[union-attr]


def test_stage_refuses_a_corrupt_local_cache_and_uploads_nothing(settings: Settings, hf_cache: Path,
                                                                 model_repo: tuple[str, str],
                                                                 s3_server: SeaweedServer,
                                                                 bucket: str) -> None:
    repo_id, _ = model_repo
    local = RepoCache(hf_cache, repo_id)
    blob = max(local.blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="do not match"):
        stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    assert keys(s3_server, bucket) == {}


def test_stage_of_a_model_missing_from_the_cache_is_not_found(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        stage_from_cache(Store(settings), tmp_path / "empty", "org/absent", "main", quiet())


def test_list_shows_the_staged_model_with_its_commit_and_size(settings: Settings, hf_cache: Path,
                                                              model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    assert staged_models(Store(settings)) == []
    stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    local = RepoCache(hf_cache, repo_id)
    size = sum(p.stat().st_size for p in local.blobs.iterdir())
    files = sum(1 for _ in local.snapshot_entries(commit))
    rows = staged_models(Store(settings))
    assert [(r.repo_id, r.revision, r.commit, r.files, r.size, r.form) for r in rows] == [
        (repo_id, "main", commit, files, size, "compact")]
    assert json.loads(json.dumps(rows[0].__dict__))["size"] == size


def test_list_shows_every_model_even_when_one_is_damaged(settings: Settings, hf_cache: Path,
                                                         model_repo: tuple[str, str],
                                                         s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, commit = model_repo
    stage_from_cache(Store(settings), hf_cache, repo_id, "main", quiet(), part_size=PART)
    client = s3_server.client()
    broken = f"{MODELS_PREFIX}models--org--broken/"
    client.put_object(Bucket=bucket, Key=broken + "refs/main", Body=b"not a commit")
    client.put_object(Bucket=bucket, Key=broken + "blobs/" + "a" * 40, Body=b"x")
    client.put_object(Bucket=bucket, Key=f"{MODELS_PREFIX}models--a--b--c/refs/main", Body=commit.encode())
    client.put_object(Bucket=bucket, Key=f"{MODELS_PREFIX}.locks/models--x--y/lock", Body=b"")
    rows = {row.repo_id: row for row in staged_models(Store(settings))}
    assert set(rows) == {repo_id, "org/broken"}
    assert rows[repo_id].form == "compact" and rows[repo_id].commit == commit
    assert rows["org/broken"].form.startswith("damaged:")


def test_list_reads_a_legacy_bucket_written_by_s5cmd(settings: Settings, hf_cache: Path,
                                                     model_repo: tuple[str, str], s3_server: SeaweedServer,
                                                     bucket: str) -> None:
    repo_id, commit = model_repo
    s5cmd_upload(s3_server, hf_cache, bucket)
    local = RepoCache(hf_cache, repo_id)
    size = sum(p.stat().st_size for p in local.blobs.iterdir())
    rows = staged_models(Store(settings))
    assert [(r.repo_id, r.revision, r.commit, r.size, r.form) for r in rows] == [
        (repo_id, "main", commit, size, "legacy")]
