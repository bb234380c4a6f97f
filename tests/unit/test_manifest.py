"""The snapshot manifest and the part sidecar: parsing refuses every malformed or lying document, the
legacy derivation names blobs by their digests, and the content check accepts exactly the right bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ManifestError, UnsafePathError
from agent.manifest import (
    FileEntry,
    Manifest,
    Sidecar,
    derive_legacy,
    git_blob_sha1,
    lfs_pointer,
    parse_manifest,
    parse_sidecar,
    part_count,
    part_ranges,
)
from agent.verify import check_content, digest_blob

CONFIG = b'{"model_type": "llama"}\n'
WEIGHTS = bytes(range(256)) * 40
SHA = hashlib.sha256(WEIGHTS).hexdigest()


def _lfs(data: bytes) -> dict[str, Any]:
    sha = hashlib.sha256(data).hexdigest()
    return {"size": len(data), "blob_id": git_blob_sha1(lfs_pointer(sha, len(data))),
            "lfs_sha256": sha, "lfs_size": len(data)}


def _plain(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "blob_id": git_blob_sha1(data)}


def _doc(files: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"format_version": 1, "files": files, **extra}).encode()


GOOD = {"config.json": _plain(CONFIG), "model.safetensors": _lfs(WEIGHTS),
        "original/params.json": _plain(CONFIG)}


def test_parse_reads_plain_and_lfs_entries_and_names_blobs_like_huggingface_hub() -> None:
    manifest = parse_manifest(_doc(GOOD))
    assert manifest.files["model.safetensors"].blob_name == SHA
    assert manifest.files["config.json"].blob_name == git_blob_sha1(CONFIG)
    # two paths with the same bytes share one blob, counted once
    assert len(manifest.blobs()) == 2
    assert manifest.total_size == len(CONFIG) + len(WEIGHTS)


def test_manifest_round_trips_through_its_json() -> None:
    manifest = parse_manifest(_doc(GOOD))
    assert parse_manifest(manifest.to_json()) == manifest


@pytest.mark.parametrize("data", [
    b"", b"{", b"\xff\xfe", b"[]", b"null", b'"text"',
    json.dumps({"files": GOOD}).encode(),                      # no format_version
    json.dumps({"format_version": 2, "files": GOOD}).encode(),  # unknown version
    _doc({}),                                                  # no files
    json.dumps({"format_version": 1, "files": []}).encode(),
])
def test_malformed_manifest_is_refused(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data)


@pytest.mark.parametrize("entry", [
    "not an object",
    {"blob_id": git_blob_sha1(CONFIG)},                        # no size
    {"size": -1, "blob_id": git_blob_sha1(CONFIG)},
    {"size": "24", "blob_id": git_blob_sha1(CONFIG)},
    {"size": True, "blob_id": git_blob_sha1(CONFIG)},          # a bool is not a size
    {"size": 1.5, "blob_id": git_blob_sha1(CONFIG)},
    {"size": 24},                                              # no blob id
    {"size": 24, "blob_id": "XYZ"},
    {"size": 24, "blob_id": git_blob_sha1(CONFIG).upper()},
    {**_lfs(WEIGHTS), "lfs_sha256": "00"},                     # short sha256
    {**_lfs(WEIGHTS), "lfs_size": len(WEIGHTS) + 1},           # lying size: lfs_size != size
    {**_lfs(WEIGHTS), "size": len(WEIGHTS) - 1},
])
def test_malformed_entry_is_refused(entry: Any) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(_doc({"config.json": entry}))


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a\\b", "a\x00b", "a//b", "./a",
                                  "x" * 300, ""])
def test_manifest_path_that_could_escape_is_refused(path: str) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(_doc({path: _plain(CONFIG)}))


def test_same_blob_with_two_different_sizes_is_refused() -> None:
    lying = {**_lfs(WEIGHTS), "size": 10, "lfs_size": 10}
    with pytest.raises(ManifestError, match="two different"):
        parse_manifest(_doc({"a.safetensors": _lfs(WEIGHTS), "b.safetensors": lying}))


def test_path_that_is_both_file_and_folder_is_refused() -> None:
    with pytest.raises(ManifestError, match="both a file and a folder"):
        parse_manifest(_doc({"original": _plain(CONFIG), "original/params.json": _plain(CONFIG)}))


def test_derive_legacy_names_each_blob_by_its_digest_length() -> None:
    sha1 = git_blob_sha1(CONFIG)
    manifest = derive_legacy({"config.json": sha1, "model.safetensors": SHA, "copy.json": sha1},
                             {sha1: len(CONFIG), SHA: len(WEIGHTS)})
    assert manifest.files["model.safetensors"] == FileEntry(
        len(WEIGHTS), git_blob_sha1(lfs_pointer(SHA, len(WEIGHTS))), SHA, len(WEIGHTS))
    assert manifest.files["config.json"] == FileEntry(len(CONFIG), sha1)
    assert set(manifest.blobs()) == {sha1, SHA}


def test_derive_legacy_refuses_a_blob_name_that_is_not_a_digest_and_an_empty_snapshot() -> None:
    with pytest.raises(ManifestError):
        derive_legacy({"config.json": "notahash"}, {"notahash": 3})
    with pytest.raises(ManifestError):
        derive_legacy({}, {})
    with pytest.raises(UnsafePathError):
        derive_legacy({"../x": SHA}, {SHA: 1})


def test_check_content_accepts_right_bytes_and_names_size_and_hash_mismatches(tmp_path: Path) -> None:
    manifest = parse_manifest(_doc(GOOD))
    weights, config = tmp_path / "w", tmp_path / "c"
    weights.write_bytes(WEIGHTS)
    config.write_bytes(CONFIG)
    assert check_content(weights, manifest.files["model.safetensors"]) is None
    assert check_content(config, manifest.files["config.json"]) is None
    flipped = bytearray(WEIGHTS)
    flipped[100] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    assert "hash" in (check_content(weights, manifest.files["model.safetensors"]) or "")
    assert check_content(weights, manifest.files["model.safetensors"], full=False) is None  # same size
    weights.write_bytes(WEIGHTS[:-1])
    assert "size" in (check_content(weights, manifest.files["model.safetensors"], full=False) or "")
    assert "unreadable" in (check_content(tmp_path / "absent", manifest.files["config.json"]) or "")


# -- the part sidecar --------------------------------------------------------------------------------------


def test_part_ranges_cover_the_blob_exactly_once() -> None:
    for size in (0, 1, 65535, 65536, 65537, 3 * 65536):
        ranges = list(part_ranges(size, 65536))
        assert len(ranges) == part_count(size, 65536)
        assert sum(length for _, _, length in ranges) == size
        assert [offset for _, offset, _ in ranges] == [i * 65536 for i in range(len(ranges))]


def test_sidecar_round_trip_and_digests_match_the_bytes(tmp_path: Path) -> None:
    blob = tmp_path / SHA
    data = WEIGHTS * 20  # ~200 KiB: 4 parts of 64 KiB
    blob.write_bytes(data)
    digests = digest_blob(blob, 1 << 16)
    assert digests.sha256 == hashlib.sha256(data).hexdigest()
    assert digests.git_sha1 == git_blob_sha1(data)
    assert digests.parts == tuple(hashlib.sha256(data[o:o + n]).hexdigest() for _, o, n in
                                  part_ranges(len(data), 1 << 16))
    sidecar = Sidecar(1 << 16, {"a" * 64: digests.parts})
    parsed = parse_sidecar(sidecar.to_json({"a" * 64: len(data)}))
    assert parsed == sidecar
    assert parsed.digests_for("a" * 64, len(data)) == digests.parts
    assert parsed.digests_for("a" * 64, len(data) * 2) is None  # wrong part count: no per-part check
    assert parsed.digests_for("b" * 64, len(data)) is None


@pytest.mark.parametrize("doc", [
    b"nope",
    json.dumps({"format_version": 1, "algorithm": "md5", "part_size": 1 << 20, "blobs": {}}).encode(),
    json.dumps({"format_version": 1, "algorithm": "sha256", "part_size": 1024, "blobs": {}}).encode(),
    json.dumps({"format_version": 1, "algorithm": "sha256", "part_size": 1 << 20, "blobs": []}).encode(),
    json.dumps({"format_version": 1, "algorithm": "sha256", "part_size": 1 << 20,
                "blobs": {"../x": {"parts": []}}}).encode(),
    json.dumps({"format_version": 1, "algorithm": "sha256", "part_size": 1 << 20,
                "blobs": {"a" * 64: {"parts": ["zz"]}}}).encode(),
    json.dumps({"format_version": 1, "algorithm": "sha256", "part_size": 1 << 20,
                "blobs": {"a" * 64: "parts"}}).encode(),
])
def test_malformed_sidecar_is_refused(doc: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_sidecar(doc)


def test_manifest_of_for_blob_refuses_non_digest_names() -> None:
    with pytest.raises(ManifestError):
        FileEntry.for_blob("config.json", 3)
    assert Manifest({"a": FileEntry.for_blob(SHA, 5)}).total_size == 5
