"""Property tests: whatever the bucket holds, the parsers either return something safe or raise the
documented error, and no key or path maps outside the cache.

- `parse_manifest` (and `parse_sidecar`) on arbitrary bytes and on arbitrary JSON documents shaped like a
  manifest: a Manifest whose every path passes `safe_relpath`, or ManifestError; never another exception.
- `safe_relpath` / `RepoCache.snapshot_file` / `ref_path` / `snapshot_dir` on arbitrary strings:
  UnsafePathError (or UsageError for a revision), or a path that stays inside its folder once resolved
  with os.path.realpath.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.cache import RepoCache, safe_relpath
from agent.errors import ManifestError, UnsafePathError, UsageError
from agent.manifest import Manifest, parse_manifest, parse_sidecar

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

HEX = "0123456789abcdef"
hex40 = st.text(HEX, min_size=40, max_size=40)
hex64 = st.text(HEX, min_size=64, max_size=64)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)

# Path-like strings: the pieces that make paths dangerous, glued together.
path_pieces = st.sampled_from(["..", ".", "", "/", "\\", "\x00", "\n", "a", "config.json", "sub", "é",
                               "\ud800", "x" * 256, "~", "$HOME", "%2e%2e", "\uff0e\uff0e", "\u202e"])
path_like = st.one_of(st.text(max_size=40), st.lists(path_pieces, max_size=8).map("/".join),
                      st.lists(path_pieces, max_size=8).map("".join))

entry = st.fixed_dictionaries(
    {"size": st.one_of(st.integers(-5, 2**40), json_scalars),
     "blob_id": st.one_of(hex40, st.text(max_size=41))},
    optional={"lfs_sha256": st.one_of(hex64, st.text(max_size=64), st.none()),
              "lfs_size": st.one_of(st.integers(-1, 2**40), json_scalars), "extra": json_values})
manifest_docs = st.fixed_dictionaries(
    {"format_version": st.one_of(st.just(1), json_scalars),
     "files": st.one_of(st.dictionaries(path_like, st.one_of(entry, json_values), max_size=6), json_values)},
    optional={"other": json_values})


def _check(data: bytes) -> None:
    try:
        manifest = parse_manifest(data)
    except ManifestError as exc:
        assert "\n" not in exc.one_line() or "\n" in data.decode("utf-8", "replace")
        return
    assert isinstance(manifest, Manifest) and manifest.files
    for path, item in manifest.files.items():
        safe_relpath(path)
        assert item.size >= 0 and len(item.blob_name) in (40, 64)


@FUZZ
@given(manifest_docs)
def test_parse_manifest_on_manifest_shaped_documents_returns_safe_paths_or_raises_manifest_error(
        doc: dict[str, Any]) -> None:
    _check(json.dumps(doc).encode())


@FUZZ
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbf{}")
@example(b'{"format_version": 1, "files": {"a": {"size": 1e400, "blob_id": "' + b"a" * 40 + b'"}}}')
@example(b'{"format_version": 1, "files": {"a": {"size": ' + b"9" * 5000 + b', "blob_id": "x"}}}')
def test_parse_manifest_on_arbitrary_bytes_returns_safe_paths_or_raises_manifest_error(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("parse", [parse_manifest, parse_sidecar], ids=["manifest", "sidecar"])
def test_deeply_nested_json_is_a_manifest_error(parse: Any) -> None:
    with pytest.raises(ManifestError):
        parse(b"[" * 200_000 + b"]" * 200_000)


sidecar_docs = st.fixed_dictionaries(
    {"format_version": st.one_of(st.just(1), json_scalars),
     "algorithm": st.sampled_from(["sha256", "md5", 1]),
     "part_size": st.one_of(st.integers(-1, 2**30), json_scalars),
     "blobs": st.one_of(st.dictionaries(st.one_of(hex64, hex40, st.text(max_size=10)), st.one_of(
         st.fixed_dictionaries({"size": json_scalars, "parts": st.lists(st.one_of(hex64, json_scalars),
                                                                        max_size=3)}), json_values),
         max_size=4), json_values)})


@FUZZ
@given(st.one_of(sidecar_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)))
def test_parse_sidecar_returns_or_raises_manifest_error(data: bytes) -> None:
    try:
        sidecar = parse_sidecar(data)
    except ManifestError:
        return
    assert sidecar.part_size >= 1 << 16


def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real.startswith(root + os.sep)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> RepoCache:
    hub = tmp_path_factory.mktemp("fuzz-hub")
    repo = RepoCache(hub, "org/model")
    repo.ensure_dirs()
    return repo


COMMIT = "a" * 40


@FUZZ
@given(path_like)
@example("..")
@example("a/../../b")
@example("sub/" * 300 + "x")
def test_a_key_maps_inside_the_snapshot_or_is_refused(cache: RepoCache, relpath: str) -> None:
    try:
        path = cache.snapshot_file(COMMIT, relpath)
    except UnsafePathError:
        return
    assert _inside(path, cache.snapshot_dir(COMMIT))
    assert safe_relpath(relpath).as_posix() == relpath  # no silent rewriting: the name is the key


@FUZZ
@given(path_like)
def test_a_revision_maps_inside_refs_or_is_refused(cache: RepoCache, revision: str) -> None:
    try:
        path = cache.ref_path(revision)
    except (UnsafePathError, UsageError):
        return
    assert _inside(path, cache.refs)


@FUZZ
@given(st.one_of(hex40, path_like, st.text(string.hexdigits, min_size=39, max_size=41)))
def test_a_commit_names_a_snapshot_folder_or_is_refused(cache: RepoCache, commit: str) -> None:
    try:
        path = cache.snapshot_dir(commit)
    except UnsafePathError:
        return
    assert path.parent == cache.snapshots and len(commit) == 40 and set(commit) <= set(HEX)


@FUZZ
@given(st.one_of(hex40, hex64, path_like))
def test_a_blob_name_maps_inside_blobs_or_is_refused(cache: RepoCache, name: str) -> None:
    try:
        paths = [cache.blob_path(name), cache.part_path(name), cache.part_state_path(name)]
    except UnsafePathError:
        return
    assert all(p.parent == cache.blobs for p in paths)


@FUZZ
@given(st.one_of(path_like, st.text(string.ascii_letters + "-_./", max_size=30)))
def test_a_repo_id_names_a_folder_in_the_hub_cache_or_is_refused(tmp_path: Path, repo_id: str) -> None:
    try:
        repo = RepoCache(tmp_path, repo_id)
    except UsageError:
        return
    assert repo.repo_dir.parent == tmp_path and repo.repo_dir.name.startswith("models--")
    assert _inside(repo.lock_path, tmp_path / ".locks")
