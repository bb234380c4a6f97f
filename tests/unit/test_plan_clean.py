"""Planning and stale-seed clean-up, on hand-built caches: resumed parts are re-verified against the
sidecar, the disk check counts what is already allocated, and clean-up removes exactly what is bad
without ever following a link out of the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from agent.cache import PART_SUFFIX, RepoCache
from agent.clean import clean_stale
from agent.engines.base import TransferConfig
from agent.errors import DiskFullError
from agent.fetch import preallocate
from agent.manifest import (
    DEFAULT_PART_SIZE,
    FileEntry,
    Manifest,
    Sidecar,
    git_blob_sha1,
    lfs_pointer,
    part_ranges,
)
from agent.plan import (
    DISK_MARGIN,
    Extents,
    Plan,
    check_disk,
    choose_part_size,
    make_plan,
    plan_blob,
    read_part_state,
    write_part_state,
)
from agent.remote import StagedSnapshot
from agent.verify import audit_cache

COMMIT = "1" * 40
OLD_COMMIT = "2" * 40
PART = 1 << 16
WEIGHTS = bytes((i * 7 + i // 251) % 256 for i in range(4 * PART + 1000))  # 5 parts of 64 KiB
CONFIG = b'{"hidden_size": 16}\n'
PARAMS = b'{"dim": 16}\n'


def lfs_entry(data: bytes) -> FileEntry:
    sha = hashlib.sha256(data).hexdigest()
    return FileEntry(len(data), git_blob_sha1(lfs_pointer(sha, len(data))), sha, len(data))


def plain_entry(data: bytes) -> FileEntry:
    return FileEntry(len(data), git_blob_sha1(data))


W, C, P = lfs_entry(WEIGHTS), plain_entry(CONFIG), plain_entry(PARAMS)
MANIFEST = Manifest({"model.safetensors": W, "config.json": C, "original/params.json": P})
CONTENT = {W.blob_name: WEIGHTS, C.blob_name: CONFIG, P.blob_name: PARAMS}
SIDECAR = Sidecar(PART, {W.blob_name: tuple(hashlib.sha256(WEIGHTS[o:o + n]).hexdigest()
                                            for _, o, n in part_ranges(len(WEIGHTS), PART))})


@pytest.fixture
def cache(tmp_path: Path) -> RepoCache:
    return RepoCache(tmp_path / "hub", "org/model")


def build_complete(cache: RepoCache, commit: str = COMMIT) -> None:
    """The cache as huggingface_hub leaves it: blobs, relative links, ref, tree."""
    cache.ensure_dirs()
    for name, data in CONTENT.items():
        cache.blob_path(name).write_bytes(data)
    for path, entry in MANIFEST.files.items():
        cache.link(commit, path, entry.blob_name)
    cache.write_ref("main", commit)
    cache.write_tree(commit, MANIFEST.to_json())


def clean(cache: RepoCache, *, full: bool = True, keep: set[str] | None = None) -> list[str]:
    keep = set(MANIFEST.blobs()) if keep is None else keep
    report = clean_stale(cache, COMMIT, MANIFEST, full=full, keep_partials=keep)
    return sorted(report.removed)


# -- plan: resume ---------------------------------------------------------------------------------------


def write_partial(cache: RepoCache, data: bytes, have: list[tuple[int, int]]) -> None:
    cache.ensure_dirs()
    part = cache.part_path(W.blob_name)
    preallocate(part, W.size)
    with open(part, "r+b") as fh:
        fh.write(data)
    write_part_state(cache, W.blob_name, W.size, Extents(have))


def test_resume_keeps_checkpointed_bytes_for_the_engine_to_recheck_and_fetches_the_rest(
        cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[: 2 * PART + 100], have=[(0, 2 * PART + 100)])
    blob = plan_blob(cache, W.blob_name, W, SIDECAR)
    assert blob.part_size == PART
    # every part with a digest goes to the engine: kept bytes are re-read into the part's check
    assert [(p.index, p.kept) for p in blob.missing] == [(0, PART), (1, PART), (2, 100), (3, 0), (4, 0)]
    assert blob.bytes_missing == W.size - 2 * PART - 100
    assert all(p.sha256 == SIDECAR.parts[W.blob_name][p.index] for p in blob.missing)
    assert cache.part_path(W.blob_name).exists()  # the kept bytes stay on disk


def test_without_part_digests_wholly_kept_parts_are_not_fetched_and_the_blob_hash_decides(
        cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[: 2 * PART], have=[(0, PART + 10), (3 * PART, 4 * PART)])
    blob = plan_blob(cache, W.blob_name, W, None)
    assert blob.digests is None and not blob.bound
    assert blob.part_size == DEFAULT_PART_SIZE  # one part here: the file is smaller than a part
    assert [(p.index, p.kept) for p in blob.missing] == [(0, PART + 10)]


def test_a_checkpoint_survives_a_change_of_stream_count_and_of_the_old_state_format(
        cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[:PART], have=[])
    cache.part_state_path(W.blob_name).write_text(
        json.dumps({"size": W.size, "part_size": PART, "done": [0, 2]}))  # the format before ranges
    assert read_part_state(cache, W.blob_name, W.size).ranges == [(0, PART), (2 * PART, 3 * PART)]
    assert choose_part_size(10 << 30, None) == choose_part_size(1000, None)  # no stream count in it


def test_with_no_checkpoint_the_partial_is_dropped_and_every_part_fetched(cache: RepoCache) -> None:
    write_partial(cache, b"\0" * (2 * PART), have=[])
    blob = plan_blob(cache, W.blob_name, W, SIDECAR)
    assert [(p.index, p.kept) for p in blob.missing] == [(i, 0) for i in range(5)]
    assert not cache.part_path(W.blob_name).exists()
    assert not cache.part_state_path(W.blob_name).exists()


def test_resume_off_starts_over_even_with_a_checkpoint(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[:PART], have=[(0, PART)])
    blob = plan_blob(cache, W.blob_name, W, SIDECAR, resume=False)
    assert all(p.kept == 0 for p in blob.missing)
    assert not cache.part_path(W.blob_name).exists()


@pytest.mark.parametrize("state", [
    {"size": 1, "have": [[0, 1]]},                      # another size
    {"size": len(WEIGHTS), "have": [[0, len(WEIGHTS) + 1]]},  # past the end
    {"size": len(WEIGHTS), "have": [["x", 1]]},
    {"size": len(WEIGHTS), "part_size": PART, "done": ["x"]},
    "not json",
    [1, 2],
])
def test_unusable_part_state_claims_nothing(cache: RepoCache, state: object) -> None:
    write_partial(cache, WEIGHTS, have=[(0, PART)])
    cache.part_state_path(W.blob_name).write_text(state if isinstance(state, str) else json.dumps(state))
    assert not read_part_state(cache, W.blob_name, W.size)


def test_part_state_of_a_truncated_partial_claims_nothing(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS, have=[(0, 2 * PART)])
    os.truncate(cache.part_path(W.blob_name), PART)
    assert not read_part_state(cache, W.blob_name, W.size)


def test_extents_merge_and_measure_prefixes() -> None:
    have = Extents([(10, 20), (30, 40), (20, 25)])
    assert have.ranges == [(10, 25), (30, 40)]
    assert have.prefix(12, 100) == 13 and have.prefix(25, 5) == 0 and have.prefix(30, 4) == 4
    assert have.total() == 25


def test_only_a_sidecar_bound_to_the_blob_identity_proves_a_blob_by_its_parts() -> None:
    digests = SIDECAR.parts[W.blob_name]
    bound = Sidecar(PART, {W.blob_name: digests}, {W.blob_name: {"sha256": W.blob_name}})
    unbound = Sidecar(PART, {W.blob_name: digests}, {W.blob_name: {"sha256": "0" * 64}})
    assert bound.is_bound(W.blob_name, W.size)
    assert not unbound.is_bound(W.blob_name, W.size)
    assert not SIDECAR.is_bound(W.blob_name, W.size)  # an older sidecar, with part digests only


def test_make_plan_fetches_only_what_is_not_valid_and_drops_their_partials(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[:PART], have=[(0, PART)])
    snap = StagedSnapshot("org/model", COMMIT, MANIFEST, {}, SIDECAR)
    plan = make_plan(cache, snap, {W.blob_name, C.blob_name}, check_parts=True)
    assert sorted(plan.present) == sorted([W.blob_name, C.blob_name])
    assert [b.name for b in plan.to_fetch] == [P.blob_name]
    assert not cache.part_path(W.blob_name).exists()  # a valid blob needs no partial


# -- plan: disk -----------------------------------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_disk_check_refuses_with_exit_5_and_counts_preallocated_bytes(
        cache: RepoCache, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = StagedSnapshot("org/model", COMMIT, MANIFEST, {}, SIDECAR)
    plan = make_plan(cache, snap, set(), check_parts=True)
    need = MANIFEST.total_size
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 40, 0, need + DISK_MARGIN - 1))
    with pytest.raises(DiskFullError) as info:
        check_disk(cache, plan)
    assert info.value.exit_code == 5
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 40, 0, need + DISK_MARGIN))
    check_disk(cache, plan)
    # once the big blob is preallocated, its bytes are already on disk and no longer needed
    cache.ensure_dirs()
    preallocate(cache.part_path(W.blob_name), W.size)
    left = need - W.size + DISK_MARGIN + 8192
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 40, 0, left))
    check_disk(cache, plan)
    check_disk(cache, Plan())


# -- clean-up -------------------------------------------------------------------------------------------


def test_a_complete_cache_is_left_alone(cache: RepoCache) -> None:
    build_complete(cache)
    assert clean(cache) == []
    assert audit_cache(cache, COMMIT, MANIFEST, "main") == []


def test_planted_links_out_of_the_cache_are_removed_as_links_targets_untouched(cache: RepoCache,
                                                                                tmp_path: Path) -> None:
    build_complete(cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious"
    victim.write_bytes(WEIGHTS[:10])  # wrong content for any blob: clean-up would delete it if it followed
    snap = cache.snapshot_dir(COMMIT)
    (snap / "config.json").unlink()
    os.symlink(victim, snap / "config.json")  # a manifest path linked out of the cache
    os.symlink(victim, snap / "extra.bin")  # a path the manifest does not have
    cache.blob_path(W.blob_name).unlink()
    os.symlink(victim, cache.blob_path(W.blob_name))  # a "blob" that is a link out
    os.symlink(outside, cache.refs / "evil")  # a ref folder that is a link out
    os.symlink(outside, snap / "original2")  # a folder link inside the snapshot
    removed = clean(cache)
    assert {"snapshots/" + COMMIT + "/config.json", "snapshots/" + COMMIT + "/extra.bin",
            "blobs/" + W.blob_name, "refs/evil", "snapshots/" + COMMIT + "/original2"} <= set(removed)
    assert victim.read_bytes() == WEIGHTS[:10]
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    for path in (snap / "config.json", snap / "extra.bin", cache.blob_path(W.blob_name), cache.refs / "evil"):
        assert not path.is_symlink() and not path.exists()


def test_a_cache_folder_that_is_a_link_out_is_removed_as_a_link(cache: RepoCache, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "blobs").mkdir(parents=True)
    (outside / "blobs" / W.blob_name).write_bytes(b"not the weights")
    cache.hub_cache.mkdir(parents=True)
    os.symlink(outside, cache.repo_dir)
    clean(cache)
    assert not cache.repo_dir.is_symlink()
    assert (outside / "blobs" / W.blob_name).read_bytes() == b"not the weights"
    cache.repo_dir.mkdir()
    os.symlink(outside / "blobs", cache.blobs)
    clean(cache)
    assert not cache.blobs.is_symlink()
    assert (outside / "blobs" / W.blob_name).read_bytes() == b"not the weights"


def test_dangling_links_truncated_and_corrupt_blobs_and_temporaries_are_removed(cache: RepoCache) -> None:
    build_complete(cache)
    snap = cache.snapshot_dir(COMMIT)
    os.symlink("../../blobs/" + "9" * 64, snap / "gone.safetensors")  # dangling
    with open(cache.blob_path(W.blob_name), "r+b") as fh:
        fh.truncate(PART)  # truncated
    corrupt = bytearray(CONFIG)
    corrupt[0] ^= 1
    cache.blob_path(C.blob_name).write_bytes(bytes(corrupt))  # same size, wrong bytes
    (cache.blobs / (P.blob_name + ".incomplete")).write_bytes(b"hf partial")
    (cache.blobs / ".tmp-atomic.tmp").write_bytes(b"leftover")
    (cache.blobs / ("e" * 64 + PART_SUFFIX)).write_bytes(b"partial of a blob we no longer want")
    removed = clean(cache)
    assert f"blobs/{W.blob_name}" in removed and f"blobs/{C.blob_name}" in removed
    assert f"snapshots/{COMMIT}/gone.safetensors" in removed
    assert sorted(p.name for p in cache.blobs.iterdir()) == [P.blob_name]
    # the links of the removed blobs are gone too: nothing looks complete that is not
    assert sorted(rel for rel, _ in cache.snapshot_entries(COMMIT)) == ["original/params.json"]


def test_partials_of_wanted_blobs_are_kept_for_resume(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS[:PART], have=[(0, PART)])
    clean(cache)
    assert cache.part_path(W.blob_name).exists()
    assert cache.part_state_path(W.blob_name).exists()
    clean(cache, keep=set())
    assert not cache.part_path(W.blob_name).exists()


def test_regular_file_copies_in_the_snapshot_are_adopted_into_blobs(cache: RepoCache) -> None:
    # what `s5cmd cp` of a cache leaves: full copies under snapshots/, no blobs
    snap = cache.snapshot_dir(COMMIT)
    (snap / "original").mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(WEIGHTS)
    (snap / "config.json").write_bytes(CONFIG[:-1])  # a truncated copy: removed, not adopted
    (snap / "original" / "params.json").write_bytes(PARAMS)
    report = clean_stale(cache, COMMIT, MANIFEST, full=True, keep_partials=set())
    assert sorted(report.reused) == ["model.safetensors", "original/params.json"]
    assert report.valid_blobs == {W.blob_name, P.blob_name}
    assert cache.blob_path(W.blob_name).read_bytes() == WEIGHTS
    assert cache.blob_path(P.blob_name).read_bytes() == PARAMS
    assert list(cache.snapshot_entries(COMMIT)) == []  # links get placed by the pull, after the blobs


def test_old_commit_keeps_its_valid_links_and_bad_refs_go(cache: RepoCache) -> None:
    build_complete(cache, OLD_COMMIT)
    cache.write_ref("old", OLD_COMMIT)
    cache.ref_path("main").write_text(COMMIT + "\n")  # a commit with no snapshot, with a newline
    cache.write_ref("gone", "3" * 40)
    removed = clean(cache)
    assert "refs/main" in removed and "refs/gone" in removed
    assert cache.read_ref("old") == OLD_COMMIT
    # the old snapshot's blobs are those of the manifest: shared, kept, and its links still resolve
    assert (cache.snapshot_dir(OLD_COMMIT) / "model.safetensors").read_bytes() == WEIGHTS


def test_orphan_blobs_no_link_uses_are_removed(cache: RepoCache) -> None:
    build_complete(cache)
    orphan = cache.blob_path("d" * 40)
    orphan.write_bytes(b"orphan")
    assert f"blobs/{'d' * 40}" in clean(cache)
    assert not orphan.exists()


def test_size_mode_keeps_a_same_size_corrupt_blob_but_full_mode_removes_it(cache: RepoCache) -> None:
    build_complete(cache)
    corrupt = bytearray(CONFIG)
    corrupt[0] ^= 1
    cache.blob_path(C.blob_name).write_bytes(bytes(corrupt))
    assert clean(cache, full=False) == []
    assert f"blobs/{C.blob_name}" in clean(cache, full=True)


def test_audit_names_every_problem_once(cache: RepoCache) -> None:
    build_complete(cache)
    snap = cache.snapshot_dir(COMMIT)
    cache.ref_path("main").write_text(COMMIT + "\n")
    (snap / "config.json").unlink()
    (snap / "original" / "params.json").unlink()
    os.symlink("../../blobs/" + W.blob_name, snap / "original" / "params.json")  # wrong depth and blob
    os.truncate(cache.blob_path(W.blob_name), 10)
    (cache.blobs / "x.incomplete").write_text("")
    (snap / "stray.txt").write_text("")
    problems = [str(p) for p in audit_cache(cache, COMMIT, MANIFEST, "main")]
    assert len(problems) == 6, problems
    joined = "\n".join(problems)
    for needle in ("refs/main: holds whitespace", "config.json: missing link",
                   "params.json: wrong link target", f"blobs/{W.blob_name}: size 10",
                   "blobs/x.incomplete: stray", "stray.txt: not in the manifest"):
        assert needle in joined
    cache.blob_path(C.blob_name).unlink()
    assert any(str(p).endswith("missing blob") for p in audit_cache(cache, COMMIT, MANIFEST, "main"))


def test_what_verify_reports_the_clean_up_and_the_pulls_writes_repair(cache: RepoCache) -> None:
    """One audit: after the clean-up, and the writes a pull makes after it (missing blobs, links, ref,
    tree), nothing `verify` reported remains."""
    build_complete(cache)
    build_complete(cache, OLD_COMMIT)
    snap = cache.snapshot_dir(COMMIT)
    os.truncate(cache.blob_path(W.blob_name), 10)  # a bad blob
    (snap / "config.json").unlink()
    os.symlink(f"../../blobs/{P.blob_name}", snap / "config.json")  # a wrong link
    (snap / "original" / "params.json").unlink()
    os.symlink(str(cache.blob_path(P.blob_name)), snap / "original" / "params.json")  # absolute, not relative
    (snap / "stray.txt").write_text("")
    (snap / ".config.json.simswarm-link").write_text("")
    (cache.blobs / ("e" * 64 + PART_SUFFIX)).write_bytes(b"partial of a blob no longer wanted")
    (cache.blobs / "x.incomplete").write_text("")
    cache.ref_path("main").write_text(COMMIT + "\n")
    (cache.refs / ".main.abc.tmp").write_text(COMMIT)  # an atomic write's leftover holding a good commit
    os.mkfifo(cache.refs / "pipe")
    (cache.snapshots / "not-a-commit").write_text("")
    before = [str(p) for p in audit_cache(cache, COMMIT, MANIFEST, "main")]
    assert len(before) == 10, before
    report = clean_stale(cache, COMMIT, MANIFEST, full=True, keep_partials=set(), revision="main")
    for name, data in CONTENT.items():  # what the pull fetches, links and writes next
        if name not in report.valid_blobs:
            cache.blob_path(name).write_bytes(data)
    for path, entry in MANIFEST.files.items():
        cache.link(COMMIT, path, entry.blob_name)
    cache.write_ref("main", COMMIT)
    cache.write_tree(COMMIT, MANIFEST.to_json())
    assert audit_cache(cache, COMMIT, MANIFEST, "main") == []


# -- transfer errors ------------------------------------------------------------------------------------


def test_a_transfer_error_never_carries_the_presigned_query() -> None:
    import urllib3

    from agent.engines.base import Part
    from agent.engines.python import PartTask, _final_error

    url = "http://127.0.0.1:1/b/k?X-Amz-Credential=AK%2F&X-Amz-Signature=deadbeef"
    task = PartTask(url, "/tmp/x.simswarm.part", 10, Part(0, 0, 10), TransferConfig())
    for exc in (urllib3.exceptions.MaxRetryError(None, "/b/k?X-Amz-Signature=deadbeef"),  # type: ignore[arg-type]
                urllib3.exceptions.ProtocolError(f"broken: {url}"), OSError(f"refused '{url}'")):
        line = _final_error(task, exc).one_line()
        assert "deadbeef" not in line and "X-Amz-Signature" not in line and "X-Amz-Credential" not in line


@pytest.mark.parametrize(("status", "content_range", "start"), [
    (206, "bytes 65536-131071/300000", PART),
    (200, "bytes 65536-131071/300000", PART),  # rclone: 200, but the body is the range
    (200, "", 0),                              # the whole object: the engine skips to the part
    (206, "bytes 0-299999/300000", 0),         # more than asked, from the start: skipped to the part
    (206, "bytes 70000-131071/300000", None),  # starts after the part: bytes would land shifted
    (206, "", None),                           # 206 without Content-Range: cannot place the bytes
])
def test_the_engine_places_a_body_only_where_it_really_starts(status: int, content_range: str,
                                                              start: int | None) -> None:
    from types import SimpleNamespace

    from agent.engines.base import Part
    from agent.engines.python import PartTask, _body_start, _Retryable

    task = PartTask("http://x/b/k", "/tmp/x.part", 300000, Part(1, PART, PART), TransferConfig())
    response: Any = SimpleNamespace(status=status, headers={"Content-Range": content_range})
    if start is None:
        with pytest.raises(_Retryable):
            _body_start(response, task)
    else:
        assert _body_start(response, task) == start


def test_a_file_where_a_cache_folder_belongs_is_removed(cache: RepoCache) -> None:
    cache.repo_dir.mkdir(parents=True)
    for folder in (cache.blobs, cache.snapshots, cache.refs):
        folder.write_text("not a folder")
    clean(cache)
    assert not any(f.exists() for f in (cache.blobs, cache.snapshots, cache.refs))
    build_complete(cache)  # every write of a pull now works
    assert audit_cache(cache, COMMIT, MANIFEST, "main") == []


def test_a_checkpoint_is_rewritten_in_place_and_a_shorter_one_reads_back_exactly(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS, have=[(0, 10), (20, 30), (40, 50)])
    path = cache.part_state_path(W.blob_name)
    inode = path.stat().st_ino
    write_part_state(cache, W.blob_name, W.size, Extents([(0, 50)]))
    assert path.stat().st_ino == inode  # the same file: written over, not renamed over
    assert read_part_state(cache, W.blob_name, W.size).ranges == [(0, 50)]  # the old tail is padding


def test_a_checkpoint_longer_than_a_page_is_replaced_whole(cache: RepoCache) -> None:
    write_partial(cache, WEIGHTS, have=[(0, 10)])
    many = [(i * 4, i * 4 + 2) for i in range(W.size // 4)][:800]  # fragmented: well over 4 KiB of JSON
    write_part_state(cache, W.blob_name, W.size, Extents(many))
    assert read_part_state(cache, W.blob_name, W.size).ranges == many
    write_part_state(cache, W.blob_name, W.size, Extents([(0, 10)]))  # back under a page, over a long file
    assert read_part_state(cache, W.blob_name, W.size).ranges == [(0, 10)]
