"""Hostile or broken input from the bucket and the disk: refused with one clear line, or neutralised.

- keys that would escape the cache (`..`, absolute, backslashes, control characters, very long), in a
  legacy bucket listing and in a manifest;
- manifests that are malformed, lie about sizes or hashes, list a file twice, or give one blob two hashes;
- refs that are not 40 hex, revisions that would escape refs/;
- symlinks planted in the cache that point outside it: after a pull their targets are untouched.

What SeaweedFS does with odd keys (checked by `test_what_seaweedfs_does_with_odd_keys`): it refuses `.`
and `..` components and over-long keys, turns `\\` into `/` and collapses `//`, and stores control
characters as they are. So only the control characters can reach a real legacy listing; the other forms
are fed to `RemoteRepo.load` as a listing directly, and all of them through a manifest (its paths are
JSON strings, nothing normalises them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.cache import BLOB_RE, RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.errors import AgentError, ManifestError, UnsafePathError, VerificationError
from agent.manifest import Manifest, parse_manifest
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.remote import RemoteRepo
from agent.settings import MODELS_PREFIX, Settings
from agent.store import ObjectInfo, Store
from agent.verify import audit_cache, check_content
from tests.support.hf_cache import assert_clean_cache
from tests.support.staged import PART, quiet

PREFIX = f"{MODELS_PREFIX}models--simswarm-test--tiny-llama/"


def pull(settings: Settings, repo_id: str, revision: str = "main") -> PullResult:
    return pull_from_store(settings, PullOptions(repo_id, revision=revision, engine="auto", concurrency=2),
                           quiet())


@pytest.fixture
def staged(s3_server: SeaweedServer, staged_bucket: str) -> Iterator[str]:
    """The module's staged model (conftest's `staged_bucket`), for a test that damages its ref, manifest
    or sidecar (or adds objects): afterwards every object is as staged again (blobs are never changed in
    place)."""
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=staged_bucket, Prefix=PREFIX)["Contents"]}
    small = {k: client.get_object(Bucket=staged_bucket, Key=k)["Body"].read()
             for k in keys if "/blobs/" not in k}
    yield staged_bucket
    for obj in client.list_objects_v2(Bucket=staged_bucket, Prefix=PREFIX)["Contents"]:
        if obj["Key"] not in keys:
            client.delete_object(Bucket=staged_bucket, Key=obj["Key"])
    for key, body in small.items():
        client.put_object(Bucket=staged_bucket, Key=key, Body=body)


def pod_settings(s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> Settings:
    """The agent's settings for `bucket`, with an empty cache of the test's own."""
    return Settings.from_env({**s3_server.env(bucket), "HF_HOME": str(tmp_path / "home")})


def put(s3_server: SeaweedServer, bucket: str, key: str, body: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)


def manifest_doc(manifest: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(manifest.to_json())
    return doc


def assert_refused(exc: AgentError, code: int, cache: RepoCache, manifest: Manifest) -> None:
    assert exc.exit_code == code, exc.one_line()
    line = exc.one_line()
    assert "\n" not in line and line.startswith("error: ") and "(" in line, line
    assert cache.read_ref("main") is None
    if cache.blobs.is_dir():
        blobs = manifest.blobs()
        for path in cache.blobs.iterdir():
            if BLOB_RE.match(path.name):
                assert path.name in blobs and check_content(path, blobs[path.name]) is None


def assert_nothing_outside(root: Path, before: set[str]) -> None:
    """No new entry anywhere under `root` outside the hub cache (a path that escaped would land there)."""
    after = {str(p.relative_to(root)) for p in root.rglob("*")}
    escaped = {rel for rel in after - before if rel != "home" and not rel.startswith("home/hub")}
    assert escaped == set()


def test_what_seaweedfs_does_with_odd_keys(s3_server: SeaweedServer, bucket: str) -> None:
    client = s3_server.client()
    base = "odd/"
    for refused in (base + "a/../b", base + "./a", base + "x" * 1100):
        with pytest.raises(ClientError):
            client.put_object(Bucket=bucket, Key=refused, Body=b"x")
    for stored in (base + "a\\b", base + "c//d", base + "ctl\x01e"):
        client.put_object(Bucket=bucket, Key=stored, Body=b"x")
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"])
    assert listed == [base + "a/b", base + "c/d", base + "ctl\x01e"]


# -- keys that would escape the cache --------------------------------------------------------------------

ESCAPING = {
    "dotdot": "../../../../evil.json",
    "nested-dotdot": "sub/../../evil.json",
    "absolute": "/etc/evil.json",
    "backslash": "..\\..\\evil.json",
    "nul": "evil\x00.json",
    "control": "evil\x01.json",
    "newline": "evil\n.json",
    "dot": "./evil.json",
    "empty-component": "sub//evil.json",
    "long-component": "x" * 300 + ".json",
    "long-path": "/".join(["d" * 200] * 6) + ".json",
}


@pytest.mark.parametrize("path", list(ESCAPING.values()), ids=list(ESCAPING))
def test_a_manifest_path_that_would_escape_the_cache_is_refused_with_exit_4(
        path: str, s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    doc = manifest_doc(manifest)
    doc["files"][path] = doc["files"]["config.json"]  # a valid entry under a hostile name
    put(s3_server, staged, f"{PREFIX}trees/{commit}.json", json.dumps(doc).encode())
    settings = pod_settings(s3_server, staged, tmp_path)
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    with pytest.raises(ManifestError) as info:
        pull(settings, repo_id)
    assert_refused(info.value, 4, RepoCache(settings.hub_cache, repo_id), manifest)
    assert "refused" in str(info.value)
    assert_nothing_outside(tmp_path, before)


@pytest.mark.parametrize("path", list(ESCAPING.values()), ids=list(ESCAPING))
def test_a_legacy_listing_key_that_would_escape_the_cache_is_refused(path: str, s3_server: SeaweedServer,
                                                                     bucket: str) -> None:
    """The listing as a server that normalised nothing would return it."""
    commit = "c" * 40
    blob = hashlib.sha256(b"x").hexdigest()
    listing = [ObjectInfo(f"{PREFIX}blobs/{blob}", 1, "e"),
               ObjectInfo(f"{PREFIX}snapshots/{commit}/{path}", 1, "e")]
    remote = RemoteRepo(Store(Settings.from_env(s3_server.env(bucket))), "simswarm-test/tiny-llama")
    with pytest.raises(UnsafePathError) as info:
        remote.load(commit, listing)
    assert info.value.exit_code == 4 and "\n" not in info.value.one_line()


def test_a_control_character_key_in_a_real_legacy_bucket_fails_the_pull_with_exit_4(
        s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    repo_id = "org/legacy"
    prefix = f"{MODELS_PREFIX}models--org--legacy/"
    commit = "d" * 40
    data = b"{}\n"
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    put(s3_server, bucket, f"{prefix}blobs/{blob}", data)
    put(s3_server, bucket, f"{prefix}snapshots/{commit}/config\x01.json", data)
    put(s3_server, bucket, f"{prefix}refs/main", commit.encode())
    settings = pod_settings(s3_server, bucket, tmp_path)
    with pytest.raises(UnsafePathError) as info:
        pull(settings, repo_id)
    assert info.value.exit_code == 4 and "control characters" in str(info.value)
    assert not RepoCache(settings.hub_cache, repo_id).snapshots.exists()


# -- malformed and lying manifests -------------------------------------------------------------------------

def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        entry = doc["files"]["config.json"]
        if value is None:
            del entry[field]
        else:
            entry[field] = value
    return change


MALFORMED: dict[str, Callable[[dict[str, Any]], None] | bytes] = {
    "not-json": b"{not json",
    "not-utf8": b"\xff\xfe{}",
    "a-list": b"[]",
    "no-files": b'{"format_version": 1, "files": {}}',
    "format-2": lambda doc: doc.update(format_version=2),
    "negative-size": _set("size", -1),
    "string-size": _set("size", "519"),
    "bool-size": _set("size", True),
    "float-size": _set("size", 1.5),
    "no-blob-id": _set("blob_id", None),
    "short-blob-id": _set("blob_id", "abc"),
    "uppercase-blob-id": _set("blob_id", "A" * 40),
    "entry-not-object": lambda doc: doc["files"].update({"config.json": 519}),
    "file-and-folder": lambda doc: doc["files"].update({"config.json/x": doc["files"]["config.json"]}),
}


@pytest.mark.parametrize("change", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_manifest_is_refused_with_exit_4(
        change: Callable[[dict[str, Any]], None] | bytes, s3_server: SeaweedServer, staged: str,
        manifest: Manifest, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    if isinstance(change, bytes):
        body = change
    else:
        doc = manifest_doc(manifest)
        change(doc)
        body = json.dumps(doc).encode()
    put(s3_server, staged, f"{PREFIX}trees/{commit}.json", body)
    settings = pod_settings(s3_server, staged, tmp_path)
    with pytest.raises(ManifestError) as info:
        pull(settings, repo_id)
    assert_refused(info.value, 4, RepoCache(settings.hub_cache, repo_id), manifest)
    assert "manifest" in str(info.value)


def _lfs_entry(manifest: Manifest) -> tuple[str, dict[str, Any]]:
    path = next(p for p, e in sorted(manifest.files.items()) if e.lfs_sha256)
    return path, dict(manifest.files[path].to_json())


def test_a_manifest_whose_hash_lies_fails_with_exit_4_and_no_blob_under_the_lying_name(
        s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    path, entry = _lfs_entry(manifest)
    real = entry["lfs_sha256"]
    fake = hashlib.sha256(b"not these bytes").hexdigest()
    client = s3_server.client()
    client.copy_object(Bucket=staged, Key=f"{PREFIX}blobs/{fake}",
                       CopySource={"Bucket": staged, "Key": f"{PREFIX}blobs/{real}"})
    doc = manifest_doc(manifest)
    doc["files"][path]["lfs_sha256"] = fake
    client.delete_object(Bucket=staged, Key=f"{PREFIX}parts/{commit}.json")  # the whole-blob check decides
    put(s3_server, staged, f"{PREFIX}trees/{commit}.json", json.dumps(doc).encode())
    settings = pod_settings(s3_server, staged, tmp_path)
    with pytest.raises(VerificationError) as info:
        pull(settings, repo_id)
    cache = RepoCache(settings.hub_cache, repo_id)
    assert info.value.exit_code == 4 and "\n" not in info.value.one_line()
    assert not cache.blob_path(fake).exists()
    assert cache.read_ref("main") is None


@pytest.mark.parametrize("delta", [1, -1], ids=["bigger", "smaller"])
def test_a_manifest_whose_size_lies_fails_with_exit_4_before_any_transfer(
        delta: int, s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    path, entry = _lfs_entry(manifest)
    doc = manifest_doc(manifest)
    doc["files"][path].update(size=entry["size"] + delta, lfs_size=entry["size"] + delta)
    put(s3_server, staged, f"{PREFIX}trees/{commit}.json", json.dumps(doc).encode())
    settings = pod_settings(s3_server, staged, tmp_path)
    with pytest.raises(VerificationError) as info:
        pull(settings, repo_id)
    assert info.value.exit_code == 4 and "manifest says" in str(info.value)
    cache = RepoCache(settings.hub_cache, repo_id)
    assert not cache.blobs.exists() or not any(BLOB_RE.match(p.name) for p in cache.blobs.iterdir())


def test_a_manifest_that_lists_a_file_twice_is_refused() -> None:
    entry = {"size": 3, "blob_id": "a" * 40}
    other = {"size": 4, "blob_id": "b" * 40}
    body = ('{"format_version": 1, "files": {"config.json": ' + json.dumps(entry)
            + ', "config.json": ' + json.dumps(other) + "}}").encode()
    with pytest.raises(ManifestError):
        parse_manifest(body)


def test_two_paths_naming_one_blob_with_different_hashes_or_sizes_are_refused(
        s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    path, entry = _lfs_entry(manifest)
    settings = pod_settings(s3_server, staged, tmp_path)
    variants = [dict(entry, blob_id="f" * 40),  # same lfs_sha256 (blob name), another git blob id
                dict(entry, size=entry["size"] - 1, lfs_size=entry["size"] - 1)]  # same name, other size
    for twin in variants:
        doc = manifest_doc(manifest)
        doc["files"]["copy/" + path] = twin
        put(s3_server, staged, f"{PREFIX}trees/{commit}.json", json.dumps(doc).encode())
        with pytest.raises(ManifestError) as info:
            pull(settings, repo_id)
        assert_refused(info.value, 4, RepoCache(settings.hub_cache, repo_id), manifest)
        assert "two different" in str(info.value)


# -- refs and revisions ------------------------------------------------------------------------------------

BAD_REFS = {"word": b"main", "short": b"abc123", "uppercase": b"A" * 40, "too-long": b"a" * 41,
            "path": b"../../../etc/passwd", "two-lines": b"a" * 40 + b"\n" + b"b" * 40, "empty": b""}


@pytest.mark.parametrize("body", list(BAD_REFS.values()), ids=list(BAD_REFS))
def test_a_ref_that_is_not_40_hex_is_refused_with_exit_4(
        body: bytes, s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, _ = model_repo
    put(s3_server, staged, f"{PREFIX}refs/main", body)
    settings = pod_settings(s3_server, staged, tmp_path)
    with pytest.raises(ManifestError) as info:
        pull(settings, repo_id)
    assert_refused(info.value, 4, RepoCache(settings.hub_cache, repo_id), manifest)
    assert "40-hex" in str(info.value)


def test_a_ref_with_a_trailing_newline_is_accepted_and_written_without_it(
        s3_server: SeaweedServer, staged: str, manifest: Manifest, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    put(s3_server, staged, f"{PREFIX}refs/main", commit.encode() + b"\n")
    settings = pod_settings(s3_server, staged, tmp_path)
    pull(settings, repo_id)
    assert RepoCache(settings.hub_cache, repo_id).ref_path("main").read_bytes() == commit.encode()


@pytest.mark.parametrize("revision", ["../../../etc", "/abs", "a\\b", "refs/heads/../../x"])
def test_a_revision_that_would_escape_refs_is_a_usage_error(
        revision: str, s3_server: SeaweedServer, staged: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    settings = pod_settings(s3_server, staged, tmp_path)
    with pytest.raises(AgentError) as info:
        pull(settings, model_repo[0], revision)
    assert info.value.exit_code == 2, info.value.one_line()


# -- symlinks planted in the cache, pointing outside it ----------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    return outside


def _link_file(link: Path, target: Path, content: bytes | None = b"precious\n") -> list[Path]:
    if content is not None:
        target.write_bytes(content)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return [target]


def _link_dir(link: Path, target: Path) -> list[Path]:
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    (target / "precious.txt").write_bytes(b"precious\n")
    if link.is_dir() and not link.is_symlink():
        shutil.copytree(link, target, dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=True)
    return [target]


def _big(manifest: Manifest) -> str:
    return max(manifest.blobs(), key=lambda n: manifest.blobs()[n].size)


Plant = Callable[[RepoCache, str, Manifest, Path], list[Path]]

PLANTS: dict[str, Plant] = {
    "snapshot-file": lambda c, commit, m, out: _link_file(c.snapshot_file(commit, "config.json"),
                                                          out / "config.json"),
    "nested-snapshot-file": lambda c, commit, m, out: _link_file(
        c.snapshot_file(commit, "original/params.json"), out / "params.json"),
    "snapshot-dir": lambda c, commit, m, out: _link_dir(c.snapshot_dir(commit), out / "snap"),
    "blob-with-right-bytes": lambda c, commit, m, out: _link_file(
        c.blob_path(_big(m)), out / "blob", c.blob_path(_big(m)).read_bytes()),
    "blob-with-wrong-bytes": lambda c, commit, m, out: _link_file(c.blob_path(_big(m)), out / "blob"),
    "blobs-dir": lambda c, commit, m, out: _link_dir(c.blobs, out / "blobs"),
    "refs-main": lambda c, commit, m, out: _link_file(c.ref_path("main"), out / "ref", commit.encode()),
    "refs-dir": lambda c, commit, m, out: _link_dir(c.refs, out / "refs"),
    "trees-file": lambda c, commit, m, out: _link_file(c.tree_path(commit), out / "tree.json"),
    "partial-blob": lambda c, commit, m, out: _link_file(c.part_path(_big(m)), out / "part"),
    "partial-state": lambda c, commit, m, out: _link_file(
        c.part_state_path(_big(m)), out / "state.json",
        json.dumps({"size": m.blobs()[_big(m)].size, "part_size": PART, "done": [0]}).encode()),
    "verified-stamps": lambda c, commit, m, out: _link_dir(c.state, out / "state"),
    "model-folder": lambda c, commit, m, out: _link_dir(c.repo_dir, out / "repo"),
}

DANGLING: dict[str, Plant] = {
    # A link whose target does not exist: nothing may create it.
    "dangling-lock": lambda c, commit, m, out: _link_file(c.lock_path, out / "created-by-lock", None),
    "dangling-partial-blob": lambda c, commit, m, out: _link_file(c.part_path(_big(m)), out / "created-part",
                                                                  None),
    "dangling-ref": lambda c, commit, m, out: _link_file(c.ref_path("main"), out / "created-ref", None),
}


def _snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    found = {}
    for root in paths:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if p.is_file():
                found[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return found


@pytest.mark.parametrize("plant", list(PLANTS.values()), ids=list(PLANTS))
def test_a_symlink_planted_in_the_cache_never_leads_a_pull_outside_it(
        plant: Plant, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], hf_cache: Path, tmp_path: Path) -> None:
    repo_id, commit = model_repo
    settings = Settings.from_env({**s3_server.env(staged_bucket), "HF_HOME": str(hf_cache.parent)})
    cache = RepoCache(hf_cache, repo_id)
    for blob in cache.blobs.iterdir():
        os.chmod(blob, 0o644)
    targets = plant(cache, commit, manifest, _outside(tmp_path))
    before = _snapshot(targets)
    assert before, "the plant made no target to watch"
    pull(settings, repo_id)
    assert _snapshot(targets) == before  # not written, not truncated, not touched
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
    assert_clean_cache(hf_cache)
    for path in (cache.repo_dir, cache.blobs, cache.snapshots, cache.snapshot_dir(commit), cache.refs):
        assert not path.is_symlink()
    for name in manifest.blobs():
        assert not cache.blob_path(name).is_symlink()


@pytest.mark.parametrize("plant", [
    pytest.param(DANGLING["dangling-lock"], id="dangling-lock"),
    pytest.param(DANGLING["dangling-partial-blob"], id="dangling-partial-blob"),
    pytest.param(DANGLING["dangling-ref"], id="dangling-ref"),
])
def test_a_dangling_symlink_planted_in_the_cache_never_makes_a_pull_create_its_target(
        plant: Plant, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], hf_cache: Path, tmp_path: Path) -> None:
    repo_id, commit = model_repo
    settings = Settings.from_env({**s3_server.env(staged_bucket), "HF_HOME": str(hf_cache.parent)})
    cache = RepoCache(hf_cache, repo_id)
    outside = _outside(tmp_path)
    plant(cache, commit, manifest, outside)
    pull(settings, repo_id)
    assert list(outside.iterdir()) == []
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
