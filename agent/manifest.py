"""The snapshot manifest (README "Bucket layout, manifest and part sidecar"): huggingface_hub's
tree-cache file, and the part-digest sidecar.

Manifest: `models--<org>--<name>/trees/<commit>.json`, exactly huggingface_hub's format (format_version 1).
Legacy buckets have none; `derive_legacy` rebuilds an equivalent one from the listing.

Sidecar: `models--<org>--<name>/parts/<commit>.json`, written by `stage`:

    {"format_version": 1, "algorithm": "sha256", "part_size": 16777216,
     "blobs": {"<blob name>": {"size": N, "sha256": "<sha256 of the whole blob>",
                               "git_sha1": "<git blob sha1 of the whole blob>",
                               "parts": ["<sha256 of bytes [0, part_size)>", ...],
                               "blake3_parts": ["<BLAKE3 of bytes [0, part_size)>", ...]}}}

Part i covers bytes [i * part_size, min(size, (i + 1) * part_size)). A downloader that uses the same part
size can check each part as it lands and refetch only a bad one.

`blake3_parts` are the same parts' BLAKE3 digests (32 bytes, a cryptographic hash like sha256, about 2.5x
faster on one core here): the native engine checks those when present, so full verification costs less
CPU than the transfer. `algorithm` still names the digest of `parts`, and readers that know only sha256
ignore the extra key, so a bucket staged with both serves old agents and new ones.

`sha256` / `git_sha1` bind the part digests to the blob's identity: `stage` computes all of them in one
read of the same bytes and refuses bytes that do not hash to their blob name. An entry whose recorded
digest equals its blob name (sha256 for a 64-hex name, git sha1 for a 40-hex one) is *bound*: a blob all
of whose parts match it is the blob, with no second pass over its bytes. An entry without them (older
sidecars) or with another digest is not bound: its parts are still checked as they land, and the whole
blob is hashed as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.cache import BLOB_RE, SHA1_RE, SHA256_RE, git_blob_header, safe_relpath
from agent.errors import ManifestError, UnsafePathError

FORMAT_VERSION = 1
DEFAULT_PART_SIZE = 16 << 20
MAX_FILES = 100_000


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(git_blob_header(len(data)) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    size: int
    blob_id: str
    lfs_sha256: str | None = None
    lfs_size: int | None = None

    @property
    def blob_name(self) -> str:
        """The file's name under blobs/: the LFS sha256 when there is one, else the git blob sha1."""
        return self.lfs_sha256 or self.blob_id

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {"size": self.size, "blob_id": self.blob_id}
        if self.lfs_sha256 is not None:
            info["lfs_sha256"] = self.lfs_sha256
            info["lfs_size"] = self.lfs_size
        return info

    @classmethod
    def for_blob(cls, blob_name: str, size: int) -> FileEntry:
        """The entry a blob's own name implies: 64 hex is an LFS sha256, 40 hex a git blob sha1."""
        if SHA256_RE.match(blob_name):
            return cls(size, git_blob_sha1(lfs_pointer(blob_name, size)), blob_name, size)
        if SHA1_RE.match(blob_name):
            return cls(size, blob_name)
        raise ManifestError(f"blob name is neither 40 nor 64 hex: {blob_name[:80]!r}")


@dataclass(frozen=True)
class Manifest:
    files: Mapping[str, FileEntry]

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.blobs().values())

    def blobs(self) -> dict[str, FileEntry]:
        """Each distinct blob once (two paths may share one)."""
        return {entry.blob_name: entry for entry in self.files.values()}

    def to_json(self) -> bytes:
        data = {"format_version": FORMAT_VERSION,
                "files": {path: self.files[path].to_json() for path in sorted(self.files)}}
        return json.dumps(data, indent=2).encode()


def _entry(path: str, info: Any) -> FileEntry:
    if not isinstance(info, dict):
        raise ManifestError(f"manifest entry for {path!r} is not an object")
    size, blob_id = info.get("size"), info.get("blob_id")
    lfs_sha, lfs_size = info.get("lfs_sha256"), info.get("lfs_size")
    if type(size) is not int or size < 0:
        raise ManifestError(f"manifest entry for {path!r} has no valid size")
    if not isinstance(blob_id, str) or not SHA1_RE.match(blob_id):
        raise ManifestError(f"manifest entry for {path!r} has no valid blob_id")
    if lfs_sha is not None:
        if not isinstance(lfs_sha, str) or not SHA256_RE.match(lfs_sha):
            raise ManifestError(f"manifest entry for {path!r} has a malformed lfs_sha256")
        if lfs_size != size:
            raise ManifestError(f"manifest entry for {path!r}: lfs_size {lfs_size!r} != size {size}")
    return FileEntry(size, blob_id, lfs_sha, size if lfs_sha else None)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of repeated keys; a manifest listing a file twice is refused instead."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ManifestError(f"key {key[:80]!r} appears twice")
        doc[key] = value
    return doc


def load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except ManifestError as exc:
        raise ManifestError(f"{what}: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check a trees/<commit>.json; any flaw is a ManifestError naming it."""
    doc = load_json(data, "manifest")
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ManifestError("manifest has no format_version 1")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError("manifest lists no files")
    if len(files) > MAX_FILES:
        raise ManifestError(f"manifest lists more than {MAX_FILES} files")
    entries: dict[str, FileEntry] = {}
    for path, info in files.items():
        try:
            safe_relpath(path)
        except UnsafePathError as exc:
            raise ManifestError(f"manifest path refused: {exc}") from None
        entries[path] = _entry(path, info)
    check_consistent(entries)
    return Manifest(entries)


def check_consistent(entries: Mapping[str, FileEntry]) -> None:
    """Two paths that share a blob must agree on it; no path may be both a file and a folder."""
    seen: dict[str, FileEntry] = {}
    for entry in entries.values():
        other = seen.setdefault(entry.blob_name, entry)
        if other != entry:
            raise ManifestError(f"manifest gives blob {entry.blob_name[:12]} two different sizes or ids")
    folders = {str(parent) for path in entries for parent in safe_relpath(path).parents}
    clash = folders & set(entries)
    if clash:
        raise ManifestError(f"manifest path is both a file and a folder: {sorted(clash)[0]!r}")


def derive_legacy(snapshot_files: Mapping[str, str], blob_sizes: Mapping[str, int]) -> Manifest:
    """The manifest a legacy bucket implies: `snapshot_files` maps each path to the blob it copies."""
    entries = {}
    for path, blob in snapshot_files.items():
        safe_relpath(path)
        if not BLOB_RE.match(blob):
            raise ManifestError(f"legacy blob name is not a digest: {blob[:80]!r}")
        entries[path] = FileEntry.for_blob(blob, blob_sizes[blob])
    if not entries:
        raise ManifestError("legacy snapshot lists no files")
    check_consistent(entries)
    return Manifest(entries)


@dataclass(frozen=True)
class Sidecar:
    part_size: int
    parts: Mapping[str, tuple[str, ...]]  # blob name -> sha256 of each part
    wholes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> {"sha256", "git_sha1"}
    blake3: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # blob name -> BLAKE3 of each part

    def digests_for(self, blob_name: str, size: int) -> tuple[str, ...] | None:
        """The blob's part digests when they match its size, else None (then only the whole is checked)."""
        return self._counted(self.parts.get(blob_name), size)

    def blake3_for(self, blob_name: str, size: int) -> tuple[str, ...] | None:
        """The same parts' BLAKE3 digests, when the sidecar has them for every part."""
        return self._counted(self.blake3.get(blob_name), size)

    def _counted(self, digests: tuple[str, ...] | None, size: int) -> tuple[str, ...] | None:
        if digests is None or len(digests) != part_count(size, self.part_size):
            return None
        return digests

    def is_bound(self, blob_name: str, size: int) -> bool:
        """True when the part digests were computed from bytes that hash to the blob's own name."""
        whole = self.wholes.get(blob_name, {})
        named_by = "sha256" if SHA256_RE.match(blob_name) else "git_sha1"
        return whole.get(named_by) == blob_name and self.digests_for(blob_name, size) is not None

    def to_json(self, sizes: Mapping[str, int]) -> bytes:
        blobs = {name: {"size": sizes[name], **self.wholes.get(name, {}), "parts": list(self.parts[name]),
                        **({"blake3_parts": list(self.blake3[name])} if name in self.blake3 else {})}
                 for name in sorted(self.parts)}
        doc = {"format_version": FORMAT_VERSION, "algorithm": "sha256", "part_size": self.part_size,
               "blobs": blobs}
        return json.dumps(doc, indent=1).encode()


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


def part_ranges(size: int, part_size: int) -> Iterable[tuple[int, int, int]]:
    """(index, offset, length) of each part; an empty blob is one empty part."""
    for index in range(part_count(size, part_size)):
        offset = index * part_size
        yield index, offset, min(part_size, size - offset)


def parse_sidecar(data: bytes) -> Sidecar:
    doc = load_json(data, "part sidecar")
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ManifestError("part sidecar has no format_version 1")
    part_size, blobs = doc.get("part_size"), doc.get("blobs")
    if doc.get("algorithm") != "sha256" or type(part_size) is not int or part_size < 1 << 16:
        raise ManifestError("part sidecar needs algorithm sha256 and part_size >= 64 KiB")
    if not isinstance(blobs, dict):
        raise ManifestError("part sidecar has no blobs object")
    parts: dict[str, tuple[str, ...]] = {}
    wholes: dict[str, dict[str, str]] = {}
    blake3: dict[str, tuple[str, ...]] = {}
    for name, info in blobs.items():
        digests = info.get("parts") if isinstance(info, dict) else None
        if not BLOB_RE.match(str(name)) or not isinstance(digests, list):
            raise ManifestError(f"part sidecar entry {str(name)[:80]!r} is malformed")
        parts[name] = _hex_digests(name, digests, "digest")
        if info.get("blake3_parts") is not None:
            blake3[name] = _hex_digests(name, info["blake3_parts"], "BLAKE3 part digest")
        whole = _whole_digests(name, info)
        if whole:
            wholes[name] = whole
    return Sidecar(part_size, parts, wholes, blake3)


def _hex_digests(name: str, digests: object, what: str) -> tuple[str, ...]:
    """A list of 32-byte hex digests (sha256 and BLAKE3 digests have the same shape)."""
    if not isinstance(digests, list) or not all(isinstance(d, str) and SHA256_RE.match(d) for d in digests):
        raise ManifestError(f"part sidecar entry {name[:12]} has a malformed {what}")
    return tuple(digests)


def _whole_digests(name: str, info: dict[str, Any]) -> dict[str, str]:
    found = {}
    for key, pattern in (("sha256", SHA256_RE), ("git_sha1", SHA1_RE)):
        value = info.get(key)
        if value is not None:
            if not isinstance(value, str) or not pattern.match(value):
                raise ManifestError(f"part sidecar entry {name[:12]} has a malformed {key}")
            found[key] = value
    return found
