"""`pull_from_store` with the bucket in memory and an engine that copies from it: the orchestration's
decisions (what to fetch, when a blob gets its final name, what a failed check leads to, when nothing
is written), in milliseconds. The bytes on the wire stay in tests/integration (real engines, SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cache import BLOB_RE, RepoCache
from agent.errors import VerificationError
from agent.manifest import Manifest, part_ranges
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.remote import RemoteRepo
from agent.settings import Settings
from agent.verify import audit_cache
from tests.support.fake_store import FakeEngine, FakeStore
from tests.support.hf_cache import tree_state
from tests.support.staged import assert_no_bad_final_blob, quiet
from tests.unit.conftest import COMMIT, REPO, UNIT_PART

PREFIX = RemoteRepo(FakeStore(), REPO).prefix


def pull(settings: Settings, store: FakeStore, engine: FakeEngine, **options: object) -> PullResult:
    return pull_from_store(settings, PullOptions(REPO, **options), quiet(),  # type: ignore[arg-type]
                           reader=store, engine=engine)


def assert_complete(settings: Settings, manifest: Manifest, unit_model: Path) -> None:
    """The ref, every link and every blob as the manifest says, and each file's bytes the model's own."""
    cache = RepoCache(settings.hub_cache, REPO)
    assert cache.read_ref("main") == COMMIT
    assert [str(p) for p in audit_cache(cache, COMMIT, manifest, "main")] == []
    for relpath, path in cache.snapshot_entries(COMMIT):
        assert path.read_bytes() == (unit_model / relpath).read_bytes(), relpath


def weights(manifest: Manifest) -> str:
    return manifest.files["model-00001-of-00002.safetensors"].blob_name


def test_a_pull_fetches_each_blob_once_by_its_planned_parts_and_leaves_a_complete_cache(
        pod: Settings, store: FakeStore, staged_manifest: Manifest, unit_model: Path) -> None:
    engine = FakeEngine(store)
    result = pull(pod, store, engine)
    assert (result.source, result.engine, result.commit) == ("minio", "fake", COMMIT)
    assert result.bytes_downloaded == staged_manifest.total_size
    assert result.blobs_fetched == len(staged_manifest.blobs()) and result.blobs_present == 0
    [jobs] = engine.calls  # one transfer, no refetch
    assert sorted(job.blob_name for job in jobs) == sorted(staged_manifest.blobs())
    sidecar = RemoteRepo(store, REPO).load().sidecar
    assert sidecar is not None
    for job in jobs:
        ranges = part_ranges(staged_manifest.blobs()[job.blob_name].size, UNIT_PART)
        assert [(p.offset, p.length) for p in job.parts] == [(o, n) for _, o, n in ranges]
        assert [p.sha256 for p in job.parts] == list(sidecar.parts[job.blob_name])
        assert store.key_of(job.url) == PREFIX + f"blobs/{job.blob_name}"
    assert_complete(pod, staged_manifest, unit_model)


def test_a_pull_fetches_only_the_blobs_missing_from_the_cache(
        pod: Settings, store: FakeStore, staged_manifest: Manifest, unit_model: Path) -> None:
    pull(pod, store, FakeEngine(store))
    cache = RepoCache(pod.hub_cache, REPO)
    name = weights(staged_manifest)
    cache.blob_path(name).unlink()
    engine = FakeEngine(store)
    result = pull(pod, store, engine)
    assert engine.fetched() == [name]
    assert result.bytes_downloaded == staged_manifest.blobs()[name].size
    assert result.blobs_present == len(staged_manifest.blobs()) - 1
    assert_complete(pod, staged_manifest, unit_model)


def test_a_blob_that_fails_its_whole_hash_is_fetched_again_and_then_passes(
        pod: Settings, store: FakeStore, staged_manifest: Manifest, unit_model: Path) -> None:
    """An engine without part checks (as s5cmd): the orchestration hashes each blob, and a blob whose
    bytes came back damaged once is fetched from scratch once more."""
    name = weights(staged_manifest)
    store.flip_reads[PREFIX + f"blobs/{name}"] = 1
    engine = FakeEngine(store, checks_parts=False)
    result = pull(pod, store, engine)
    assert engine.fetched().count(name) == 2
    assert len(engine.calls) == 2 and [job.blob_name for job in engine.calls[1]] == [name]
    assert result.bytes_downloaded == staged_manifest.total_size + staged_manifest.blobs()[name].size
    assert_complete(pod, staged_manifest, unit_model)


def test_a_blob_that_fails_its_hash_again_after_the_refetch_is_exit_4_and_never_named(
        pod: Settings, store: FakeStore, staged_manifest: Manifest) -> None:
    name = weights(staged_manifest)
    store.flip_reads[PREFIX + f"blobs/{name}"] = 2
    engine = FakeEngine(store, checks_parts=False)
    with pytest.raises(VerificationError) as info:
        pull(pod, store, engine)
    assert info.value.exit_code == 4 and "still fails its check after a refetch" in str(info.value)
    assert engine.fetched().count(name) == 2
    cache = RepoCache(pod.hub_cache, REPO)
    assert not cache.blob_path(name).exists() and not cache.part_path(name).exists()
    assert cache.read_ref("main") is None
    assert_no_bad_final_blob(cache, staged_manifest)


def edit_sidecar(store: FakeStore, change: Callable[[dict[str, Any]], None]) -> None:
    key = PREFIX + f"parts/{COMMIT}.json"
    doc = json.loads(store.objects[key])
    change(doc)
    store.put_bytes(key, json.dumps(doc).encode())


def test_a_lying_part_digest_never_gives_the_blob_its_final_name(
        pod: Settings, store: FakeStore, staged_manifest: Manifest) -> None:
    """The sidecar claims a digest for one part that its (right) bytes do not have: the engine refuses
    the part, and nothing claims the blob or the snapshot."""
    name = weights(staged_manifest)
    edit_sidecar(store, lambda doc: doc["blobs"][name]["parts"].__setitem__(1, "0" * 64))
    with pytest.raises(VerificationError):
        pull(pod, store, FakeEngine(store))
    cache = RepoCache(pod.hub_cache, REPO)
    assert not cache.blob_path(name).exists()
    assert cache.read_ref("main") is None


def test_part_digests_not_bound_to_the_blob_cannot_vouch_for_corrupt_bytes(
        pod: Settings, store: FakeStore, staged_manifest: Manifest) -> None:
    """The object is corrupt and the sidecar's part digests describe the corrupt bytes, without the
    whole digests that bind them to the blob's name: the parts pass, so the whole hash must run here,
    fail, and fail again after the refetch."""
    name = weights(staged_manifest)
    key = PREFIX + f"blobs/{name}"
    bad = bytearray(store.objects[key])
    bad[len(bad) // 3] ^= 0x01
    store.objects[key] = bytes(bad)

    def describe_the_corrupt_bytes(doc: dict[str, Any]) -> None:
        entry = doc["blobs"][name]
        ranges = part_ranges(len(bad), UNIT_PART)
        entry["parts"] = [hashlib.sha256(bad[o:o + n]).hexdigest() for _, o, n in ranges]
        entry.pop("sha256")
        entry.pop("git_sha1")
    edit_sidecar(store, describe_the_corrupt_bytes)
    engine = FakeEngine(store)
    with pytest.raises(VerificationError) as info:
        pull(pod, store, engine)
    assert info.value.exit_code == 4 and engine.fetched().count(name) == 2
    cache = RepoCache(pod.hub_cache, REPO)
    assert not cache.blob_path(name).exists() and cache.read_ref("main") is None
    assert_no_bad_final_blob(cache, staged_manifest)


def test_a_warm_cache_is_used_as_it_is_with_nothing_fetched_or_written(
        pod: Settings, store: FakeStore, staged_manifest: Manifest) -> None:
    pull(pod, store, FakeEngine(store))
    before = tree_state(pod.hub_cache)
    store.reads.clear()
    engine = FakeEngine(store)
    result = pull(pod, store, engine)
    assert (result.source, result.bytes_downloaded, result.blobs_fetched) == ("cache", 0, 0)
    assert result.blobs_present == len(staged_manifest.blobs())
    assert engine.calls == []
    assert not any("/blobs/" in key for key in store.reads)  # the listing and the small objects only
    assert tree_state(pod.hub_cache) == before


def test_nothing_under_a_final_blob_name_is_ever_a_partial_file(
        pod: Settings, store: FakeStore, staged_manifest: Manifest) -> None:
    """Every blob the engine is handed is written to its temporary file, never to its final name."""
    engine = FakeEngine(store)
    pull(pod, store, engine)
    cache = RepoCache(pod.hub_cache, REPO)
    for job in engine.calls[0]:
        assert job.temp_path == cache.part_path(job.blob_name) and not BLOB_RE.match(job.temp_path.name)


class RecordingHandoff:
    """A `Handoff` that notes, at each call, what an offline reader of the cache would see."""

    def __init__(self, cache: RepoCache) -> None:
        self.cache = cache
        self.log: list[tuple[str, Any]] = []

    def first(self, path: str) -> bool:
        return not path.endswith(".safetensors")

    def reading_order(self, paths: list[str]) -> list[str]:
        return sorted(paths, reverse=True)  # the opposite of the manifest's order: the pull must follow it

    def placed_first(self, cache: RepoCache, snap: Any) -> None:
        blobs = {p.name for p in cache.blobs.iterdir() if BLOB_RE.match(p.name)}
        self.log.append(("first", {"ref": cache.read_ref("main"), "tree": cache.tree_path(COMMIT).exists(),
                                   "blobs": blobs}))

    def arrived(self, blob_name: str) -> None:
        self.log.append(("arrived", blob_name))


def test_a_handoff_gets_the_first_files_placed_then_each_weight_in_its_reading_order(
        pod: Settings, store: FakeStore, staged_manifest: Manifest, unit_model: Path) -> None:
    cache = RepoCache(pod.hub_cache, REPO)
    handoff = RecordingHandoff(cache)
    engine = FakeEngine(store)
    pull_from_store(pod, PullOptions(REPO), quiet(), reader=store, engine=engine, handoff=handoff)
    shards = sorted((p for p in staged_manifest.files if p.endswith(".safetensors")), reverse=True)
    weight_blobs = [staged_manifest.files[p].blob_name for p in shards]
    first_blobs = {e.blob_name for p, e in staged_manifest.files.items() if not p.endswith(".safetensors")}
    (stage, seen), *arrivals = handoff.log
    # The configs were verified and named, the ref written, no tree yet, no weight named yet.
    assert stage == "first" and seen["ref"] == COMMIT and seen["tree"] is False
    assert seen["blobs"] == first_blobs
    # Then the weights, one transfer in the handoff's order, each handed off once named.
    assert arrivals == [("arrived", name) for name in weight_blobs]
    assert [[j.blob_name for j in jobs] for jobs in engine.calls][-1] == weight_blobs
    assert_complete(pod, staged_manifest, unit_model)


def test_a_complete_cache_never_calls_the_handoff(
        pod: Settings, store: FakeStore, staged_manifest: Manifest, unit_model: Path) -> None:
    pull(pod, store, FakeEngine(store))
    handoff = RecordingHandoff(RepoCache(pod.hub_cache, REPO))
    result = pull_from_store(pod, PullOptions(REPO), quiet(), reader=store, engine=FakeEngine(store),
                             handoff=handoff)
    assert result.source == "cache" and handoff.log == []
