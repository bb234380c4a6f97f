"""`RemoteRepo.load` on an in-memory bucket: what a staged model in either form reads as, and every way
a bucket's contents are refused before a byte of a blob is fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.errors import ManifestError, NotFoundError, UnsafePathError, VerificationError
from agent.manifest import Manifest
from agent.remote import RemoteRepo, staged_models
from agent.s3read import ObjectInfo
from agent.settings import MODELS_PREFIX
from agent.stage import stage_from_cache
from agent.subset import IndexReader
from tests.support.fake_store import FakeStore
from tests.support.staged import copy_legacy, quiet
from tests.unit.conftest import COMMIT, REPO, UNIT_PART

PREFIX = f"{MODELS_PREFIX}models--simswarm-test--unit-llama/"


def legacy_bucket(unit_cache: Path, *, with_tree: bool = False) -> FakeStore:
    """What `s5cmd cp` of a cache leaves: blobs/, a full copy of every file under snapshots/, refs/main."""
    store = FakeStore()
    copy_legacy(store, unit_cache, REPO, COMMIT)
    if with_tree:
        compact = FakeStore()
        stage_from_cache(compact, unit_cache, REPO, "main", quiet())
        store.put_bytes(PREFIX + f"trees/{COMMIT}.json", compact.objects[PREFIX + f"trees/{COMMIT}.json"])
    return store


def local_files(unit_model: Path) -> dict[str, int]:
    files = [p for p in unit_model.rglob("*") if p.is_file()]
    return {p.relative_to(unit_model).as_posix(): p.stat().st_size for p in files}


# -- the two forms -----------------------------------------------------------------------------------


def test_a_compact_staging_loads_with_its_manifest_bound_part_digests_and_one_key_per_blob(
        store: FakeStore, unit_model: Path) -> None:
    snap = RemoteRepo(store, REPO).load("main")
    assert (snap.form, snap.commit) == ("compact", COMMIT)
    assert {path: entry.size for path, entry in snap.manifest.files.items()} == local_files(unit_model)
    assert snap.sources == {name: PREFIX + f"blobs/{name}" for name in snap.manifest.blobs()}
    assert len(snap.sources) == len(snap.manifest.files) - 1  # the two configs are one blob
    assert snap.sidecar is not None and snap.sidecar.part_size == UNIT_PART
    for name, entry in snap.manifest.blobs().items():
        assert snap.sidecar.is_bound(name, entry.size), name


def test_a_compact_staging_loads_by_commit_without_reading_its_ref(store: FakeStore) -> None:
    snap = RemoteRepo(store, REPO).load(COMMIT)
    assert snap.commit == COMMIT
    assert PREFIX + "refs/main" not in store.reads


@pytest.mark.parametrize("with_tree", [False, True], ids=["no-trees", "with-trees"])
def test_a_legacy_copy_loads_with_each_blob_read_from_blobs_and_no_part_digests(
        with_tree: bool, unit_cache: Path, unit_model: Path, store: FakeStore) -> None:
    compact = RemoteRepo(store, REPO).load().manifest
    snap = RemoteRepo(legacy_bucket(unit_cache, with_tree=with_tree), REPO).load("main")
    assert (snap.form, snap.commit, snap.sidecar) == ("legacy", COMMIT, None)
    assert {path: entry.size for path, entry in snap.manifest.files.items()} == local_files(unit_model)
    assert {p: e.blob_name for p, e in snap.manifest.files.items()} == \
        {p: e.blob_name for p, e in compact.files.items()}
    assert snap.sources == {name: PREFIX + f"blobs/{name}" for name in compact.blobs()}


def test_a_legacy_copy_without_its_blob_is_read_from_the_snapshot_copy(unit_cache: Path) -> None:
    bucket = legacy_bucket(unit_cache, with_tree=True)
    manifest = RemoteRepo(bucket, REPO).load().manifest
    weights = manifest.files["model-00002-of-00002.safetensors"].blob_name
    del bucket.objects[PREFIX + f"blobs/{weights}"]
    snap = RemoteRepo(bucket, REPO).load()
    assert snap.sources[weights] == PREFIX + f"snapshots/{COMMIT}/model-00002-of-00002.safetensors"


# -- what is missing -----------------------------------------------------------------------------------


def test_a_model_not_in_the_bucket_is_not_found_exit_3() -> None:
    with pytest.raises(NotFoundError) as info:
        RemoteRepo(FakeStore(), REPO).load("main")
    assert info.value.exit_code == 3 and "is not staged in bucket 'fake-bucket'" in str(info.value)


def test_a_missing_ref_is_not_found_exit_3_naming_the_revision(store: FakeStore) -> None:
    del store.objects[PREFIX + "refs/main"]
    with pytest.raises(NotFoundError) as info:
        RemoteRepo(store, REPO).load("main")
    assert info.value.exit_code == 3 and f"{REPO}@main is not staged" in str(info.value)
    assert RemoteRepo(store, REPO).load(COMMIT).commit == COMMIT  # the commit itself is still there


def test_a_commit_with_neither_manifest_nor_snapshot_is_not_found(store: FakeStore) -> None:
    del store.objects[PREFIX + f"trees/{COMMIT}.json"]
    with pytest.raises(NotFoundError) as info:
        RemoteRepo(store, REPO).load()
    assert "neither a manifest nor snapshot objects" in str(info.value)


def test_a_blob_no_object_holds_is_not_found(store: FakeStore, staged_manifest: Manifest) -> None:
    name = next(iter(staged_manifest.blobs()))
    del store.objects[PREFIX + f"blobs/{name}"]
    with pytest.raises(NotFoundError) as info:
        RemoteRepo(store, REPO).load()
    assert f"no object holds blob {name[:12]}" in str(info.value)


# -- what is malformed ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"format_version": 1, "files": {}}',
                                  b'{"format_version": 2, "files": {"a": {"size": 1, "blob_id": "' +
                                  b"a" * 40 + b'"}}}'],
                         ids=["not-json", "a-list", "no-files", "format-2"])
def test_a_malformed_manifest_is_refused_exit_4(body: bytes, store: FakeStore) -> None:
    store.put_bytes(PREFIX + f"trees/{COMMIT}.json", body)
    with pytest.raises(ManifestError) as info:
        RemoteRepo(store, REPO).load()
    assert info.value.exit_code == 4 and "\n" not in info.value.one_line()


@pytest.mark.parametrize("ref", [b"main", b"abc123", b"A" * 40, b"../../etc/passwd", b""])
def test_a_ref_that_is_not_a_commit_is_refused_exit_4(ref: bytes, store: FakeStore) -> None:
    store.put_bytes(PREFIX + "refs/main", ref)
    with pytest.raises(ManifestError) as info:
        RemoteRepo(store, REPO).load("main")
    assert info.value.exit_code == 4 and "40-hex" in str(info.value)


METADATA_KEYS = {"ref": PREFIX + "refs/main", "manifest": PREFIX + f"trees/{COMMIT}.json",
                 "sidecar": PREFIX + f"parts/{COMMIT}.json"}


@pytest.mark.parametrize("what", sorted(METADATA_KEYS))
def test_a_metadata_object_cut_short_once_is_read_again(what: str, store: FakeStore) -> None:
    """Half the body, well framed: the bytes do not parse, which is the sign of a transient fault."""
    key = METADATA_KEYS[what]
    whole = RemoteRepo(store, REPO).load("main")
    store.reads.clear()
    store.cut_reads[key] = 1
    assert RemoteRepo(store, REPO).load("main") == whole
    assert store.reads.count(key) == 2 and store.cut_reads[key] == 0


@pytest.mark.parametrize("what", sorted(METADATA_KEYS))
def test_a_metadata_object_that_reads_the_same_bad_bytes_twice_is_refused_at_once(
        what: str, store: FakeStore) -> None:
    """The same bytes twice are the object itself: its error after one more read, not after every retry."""
    key = METADATA_KEYS[what]
    store.put_bytes(key, store.objects[key][:len(store.objects[key]) // 2])
    with pytest.raises(ManifestError) as info:
        RemoteRepo(store, REPO).load("main")
    assert info.value.exit_code == 4
    assert store.reads.count(key) == 2


def test_a_metadata_object_cut_short_on_every_read_ends_in_its_error_after_the_retries(
        store: FakeStore) -> None:
    """Bad bytes that differ each time (one more byte of the body, say) get the policy's retries."""
    key = METADATA_KEYS["manifest"]
    whole = store.objects[key]
    served = iter(range(1, len(whole)))
    read = store.read
    store.read = lambda k: whole[:next(served)] if k == key else read(k)  # type: ignore[method-assign]
    with pytest.raises(ManifestError):
        RemoteRepo(store, REPO).load("main")
    assert next(served) == store.body_retry.attempts + 1  # the first read and every retry, no more


def test_an_index_file_cut_short_once_is_read_again(store: FakeStore, tmp_path: Path) -> None:
    """The small files the file selection reads (config, index) are checked against the manifest: a
    body that does not match is read again, as a broken one."""
    snap = RemoteRepo(store, REPO).load("main")
    key = snap.sources[snap.manifest.files["tokenizer.json"].blob_name]
    store.reads.clear()
    store.cut_reads[key] = 1
    data = IndexReader(store, RepoCache(tmp_path, REPO), snap)("tokenizer.json")
    assert data == store.objects[key] and store.reads.count(key) == 2


def test_an_object_whose_size_differs_from_the_manifest_is_refused_before_any_transfer(
        store: FakeStore, staged_manifest: Manifest) -> None:
    name = max(staged_manifest.blobs(), key=lambda n: staged_manifest.blobs()[n].size)
    store.objects[PREFIX + f"blobs/{name}"] += b"x"
    with pytest.raises(VerificationError) as info:
        RemoteRepo(store, REPO).load()
    assert info.value.exit_code == 4 and "manifest says" in str(info.value)
    assert PREFIX + f"blobs/{name}" not in store.reads  # refused from the listing alone


# -- keys that would escape the cache ------------------------------------------------------------------

ESCAPES = ["../../../etc/passwd", "a/../../b", "/abs/path", "a\\..\\b", "config\x01.json", "x/" + "y" * 300]


@pytest.mark.parametrize("path", ESCAPES, ids=["dotdot", "inner-dotdot", "absolute", "backslash",
                                               "control", "long-component"])
def test_a_legacy_listing_key_that_would_escape_the_snapshot_is_refused_exit_4(
        path: str, unit_cache: Path) -> None:
    bucket = legacy_bucket(unit_cache)
    listing = list(bucket.list_objects(PREFIX))
    bucket.listing = [*listing, ObjectInfo(PREFIX + f"snapshots/{COMMIT}/{path}", 3, "e" * 32)]
    with pytest.raises(UnsafePathError) as info:
        RemoteRepo(bucket, REPO).load("main")
    assert info.value.exit_code == 4


@pytest.mark.parametrize("path", ESCAPES, ids=["dotdot", "inner-dotdot", "absolute", "backslash",
                                               "control", "long-component"])
def test_a_manifest_path_that_would_escape_the_snapshot_is_refused_exit_4(
        path: str, store: FakeStore, staged_manifest: Manifest) -> None:
    entry = next(iter(staged_manifest.files.values()))
    escaping = Manifest({**staged_manifest.files, path: entry})
    store.put_bytes(PREFIX + f"trees/{COMMIT}.json", escaping.to_json())
    with pytest.raises((UnsafePathError, ManifestError)) as info:
        RemoteRepo(store, REPO).load()
    assert info.value.exit_code == 4


# -- listing every staged model ------------------------------------------------------------------------


def test_staged_models_lists_each_model_and_a_damaged_one_as_a_row_of_its_own(
        store: FakeStore, unit_cache: Path) -> None:
    other = "models--simswarm-test--broken/"
    store.put_bytes(MODELS_PREFIX + other + "refs/main", b"not a commit")
    rows = staged_models(store)
    assert [(r.repo_id, r.revision, r.commit, r.form) for r in rows] == [
        ("simswarm-test/broken", "-", "-", "damaged: ref 'main' of simswarm-test/broken does not hold a "
                                           "40-hex commit"),
        (REPO, "main", COMMIT, "compact")]
