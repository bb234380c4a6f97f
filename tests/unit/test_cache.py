"""The cache layout: paths from outside cannot escape, links are relative with the right depth, refs hold
the bare commit, writes are atomic, and link targets are recognised only inside the repo's blobs/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cache import (
    MAX_PATH_BYTES,
    RepoCache,
    atomic_write,
    check_blob_name,
    check_repo_id,
    check_revision,
    repo_folder_name,
    safe_relpath,
)
from agent.errors import UnsafePathError, UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOB = "ab" * 32


@pytest.mark.parametrize("path", [
    "", "..", ".", "../x", "a/../../x", "a/..", "/abs", "/", "a\\b", "..\\x", "a\x00b", "a\nb", "a\x7fb",
    "a//b", "a/", "./a", "x" * (MAX_PATH_BYTES + 1), "a/" + "y" * 256, "\ud800",
])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(path)


@pytest.mark.parametrize("path", ["config.json", "original/params.json", ".gitattributes", "a/b/c/d.bin",
                                  "...", "é/模型.json", "x" * 255])
def test_safe_paths_are_kept_as_posix_parts(path: str) -> None:
    assert safe_relpath(path).as_posix() == path


_PIECES = st.sampled_from(["..", ".", "/", "\\", "\x00", "a", "é", "~", "..."])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(st.one_of(_PIECES, st.text(max_size=3)), max_size=12)
                 .map("".join)))
def test_any_string_is_refused_or_stays_inside_the_base(path: str) -> None:
    base = Path("/srv/cache/base")
    try:
        rel = safe_relpath(path)
    except UnsafePathError:
        return
    joined = os.path.normpath(os.path.join(base, *rel.parts))
    assert os.path.commonpath([joined, base]) == str(base)
    assert joined != str(base)
    assert base.joinpath(*rel.parts).resolve().is_relative_to(base.resolve())


@pytest.mark.parametrize("repo_id", ["../x", "a/b/c", "a/..", "", "a/", "-a/b", "a b/c", "a/b\x00"])
def test_bad_repo_ids_are_refused(repo_id: str) -> None:
    with pytest.raises(UsageError):
        check_repo_id(repo_id)


def test_repo_folder_name_is_huggingface_hubs() -> None:
    assert repo_folder_name("Qwen/Qwen3-14B") == "models--Qwen--Qwen3-14B"
    assert repo_folder_name("gpt2") == "models--gpt2"


@pytest.mark.parametrize("revision", ["../main", "refs/heads/main", "/main", ""])
def test_bad_revisions_are_refused(revision: str) -> None:
    with pytest.raises((UsageError, UnsafePathError)):
        check_revision(revision)


def test_blob_names_must_be_digests() -> None:
    assert check_blob_name(BLOB) == BLOB
    for bad in ("../x", "AB" * 32, "ab" * 31, BLOB + ".incomplete"):
        with pytest.raises(UnsafePathError):
            check_blob_name(bad)


def test_link_depth_grows_with_nesting_and_resolves_to_the_blob(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    cache.blobs.mkdir(parents=True)
    (cache.blobs / BLOB).write_bytes(b"weights")
    top = cache.link(COMMIT, "model.safetensors", BLOB)
    nested = cache.link(COMMIT, "original/deep/params.json", BLOB)
    assert os.readlink(top) == f"../../blobs/{BLOB}"
    assert os.readlink(nested) == f"../../../../blobs/{BLOB}"
    assert top.read_bytes() == nested.read_bytes() == b"weights"
    assert cache.link_target_blob(top) == cache.link_target_blob(nested) == BLOB


def test_link_replaces_a_wrong_link_a_copy_or_a_folder(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    dest = cache.snapshot_file(COMMIT, "f.bin")
    dest.parent.mkdir(parents=True)
    os.symlink("/etc/passwd", dest)
    cache.link(COMMIT, "f.bin", BLOB)
    assert os.readlink(dest) == f"../../blobs/{BLOB}"
    dest.unlink()
    dest.mkdir()
    (dest / "inner").write_text("x")
    cache.link(COMMIT, "f.bin", BLOB)
    assert dest.is_symlink()
    assert not list(dest.parent.glob(".*simswarm-link"))


def test_link_target_blob_ignores_links_that_leave_the_repos_blobs(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    snap = cache.snapshot_dir(COMMIT)
    snap.mkdir(parents=True)
    other = RepoCache(tmp_path, "org/other")
    cases = {
        "abs": str(cache.blobs / BLOB),  # absolute, but into our blobs/: accepted (resolves there)
        "out": "/etc/passwd",
        "other": f"../../../{other.folder}/blobs/{BLOB}",
        "notblob": "../../blobs/config.json",
        "sub": f"../../blobs/sub/{BLOB}",
    }
    for name, target in cases.items():
        os.symlink(target, snap / name)
    found = {name: cache.link_target_blob(snap / name) for name in cases}
    assert found == {"abs": BLOB, "out": None, "other": None, "notblob": None, "sub": None}
    (snap / "plain").write_text("x")
    assert cache.link_target_blob(snap / "plain") is None


def test_ref_is_the_bare_commit_without_a_newline(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    cache.write_ref("main", COMMIT)
    assert cache.ref_path("main").read_bytes() == COMMIT.encode()
    assert cache.read_ref("main") == COMMIT
    cache.write_ref("refs/pr/3", COMMIT)
    assert (cache.refs / "refs" / "pr" / "3").read_bytes() == COMMIT.encode()
    with pytest.raises(UnsafePathError):
        cache.write_ref("main", "not-a-commit")
    cache.ref_path("main").write_text("garbage")
    assert cache.read_ref("main") is None
    assert cache.read_ref("absent") is None


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file_and_cleans_up(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_verified_stamp_is_void_once_the_blob_changes(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    cache.blobs.mkdir(parents=True)
    blob = cache.blob_path(BLOB)
    blob.write_bytes(b"abc")
    assert not cache.verified_unchanged(BLOB)
    cache.remember_verified(BLOB)
    assert cache.verified_unchanged(BLOB)
    blob.write_bytes(b"abd")  # same size, new mtime/ctime
    os.utime(blob, ns=(1, 1))
    assert not cache.verified_unchanged(BLOB)
    cache.forget_verified(BLOB)
    assert not cache.stamp_path(BLOB).exists()


def test_snapshot_entries_lists_links_and_files_without_following(tmp_path: Path) -> None:
    cache = RepoCache(tmp_path, "org/name")
    snap = cache.snapshot_dir(COMMIT)
    (snap / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    os.symlink(outside, snap / "dirlink")
    (snap / "sub" / "f").write_text("x")
    assert sorted(rel for rel, _ in cache.snapshot_entries(COMMIT)) == ["dirlink", "sub/f"]
    with pytest.raises(UnsafePathError):
        cache.snapshot_dir("../" + COMMIT[3:])
