"""Narrowing a staged snapshot to the selected files, before anything is planned.

`narrow` applies `agent.selection` to the bucket's manifest. The rules may need one small file of the
snapshot, the safetensors index: it is read from the local cache when a valid copy is there, else
fetched from the bucket and checked against the manifest like any blob, then kept in memory and
written into `blobs/` only after the stale clean-up has run (so a planted link cannot redirect the
write), where the plan finds it present: no byte is fetched twice.

The agent records what it skipped on purpose in `<repo>/.simswarm/selection/<commit>.json` (the folder
`scan_cache_dir()` ignores), so `verify` can tell a skipped file from a missing one:

    {"format_version": 1, "selection": {"files": "vllm", "load_format": "auto", "include": [],
     "exclude": [], "vllm_version": "0.32.0"}, "load_format": "hf",
     "skipped": {"original/consolidated.00.pth": {"size": 123, "why": "..."}}}
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.cache import RepoCache, atomic_write
from agent.errors import UnsafePathError, UsageError, VerificationError
from agent.manifest import FileEntry, Manifest, git_blob_sha1
from agent.output import Output, human_bytes
from agent.remote import StagedSnapshot
from agent.s3read import ObjectReader, parsed_or_read_again
from agent.selection import Choice, Selection, choose
from agent.verify import check_content

MAX_INDEX_BYTES = 64 << 20  # an index of a very large MoE is a few MiB
RECORD_VERSION = 1


def bytes_match(entry: FileEntry, data: bytes) -> bool:
    """The manifest's content check, on bytes in memory."""
    if len(data) != entry.size:
        return False
    if entry.lfs_sha256:
        return hashlib.sha256(data).hexdigest() == entry.lfs_sha256
    return git_blob_sha1(data) == entry.blob_id


@dataclass
class Subset:
    """A snapshot narrowed to the selection, with what it takes to finish the job consistently."""

    snap: StagedSnapshot  # manifest and sources of the selected files only
    full: Manifest  # the bucket's whole manifest
    selection: Selection
    choice: Choice
    fetched: dict[str, bytes] = field(default_factory=dict)  # blob name -> bytes read for the rules

    @property
    def keep_on_disk(self) -> set[str]:
        """Blobs the stale clean-up must not delete: every blob of the commit, selected or not, so a
        later wider pull finds the ones an earlier pull left and fetches nothing twice."""
        return set(self.full.blobs())

    @property
    def bytes_fetched(self) -> int:
        return sum(len(data) for data in self.fetched.values())

    @property
    def bytes_skipped(self) -> int:
        """Bytes not downloaded: blobs that no selected file needs (a shared blob counts once)."""
        needed = set(self.snap.manifest.blobs())
        return sum(e.size for name, e in self.full.blobs().items() if name not in needed)

    def store_fetched(self, cache: RepoCache) -> set[str]:
        """Write the blobs read for the rules under their final names (they were checked in memory);
        one the selection itself leaves out (`--exclude '*.json'`) is not kept."""
        needed = set(self.snap.manifest.blobs())
        for name, data in self.fetched.items():
            if name in needed:
                atomic_write(cache.blob_path(name), data)
                cache.remember_verified(name)
        return needed & set(self.fetched)

    def describe(self) -> dict[str, object]:
        return {**self.selection.describe(), "resolved_load_format": self.choice.load_format}

    def write_record(self, cache: RepoCache) -> None:
        write_record(cache, self.snap.commit, self.selection, self.choice, self.full)


def write_record(cache: RepoCache, commit: str, selection: Selection, choice: Choice, full: Manifest) -> None:
    """What was skipped on purpose, for `verify`; no record when nothing was."""
    path = record_path(cache, commit)
    if not choice.skipped:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    skipped = {p: {"size": full.files[p].size if p in full.files else 0, "why": why}
               for p, why in choice.skipped.items()}
    doc = {"format_version": RECORD_VERSION, "selection": selection.describe(),
           "load_format": choice.load_format, "skipped": skipped}
    atomic_write(path, json.dumps(doc, indent=1).encode())


def record_path(cache: RepoCache, commit: str) -> Path:
    return cache.state / "selection" / f"{cache.snapshot_dir(commit).name}.json"


def drop_narrowed_trees(cache: RepoCache) -> None:
    """Before huggingface_hub downloads: a trees/<commit>.json the agent narrowed is not the repo's
    listing, but snapshot_download would take it for one and fetch nothing it leaves out. Drop it with
    its record; huggingface_hub lists the repo again and writes the whole listing."""
    folder = cache.state / "selection"
    if not folder.is_dir() or folder.is_symlink():
        return
    for record in folder.glob("*.json"):
        with contextlib.suppress(FileNotFoundError, UnsafePathError):
            cache.tree_path(record.stem).unlink()
        record.unlink()


def recorded_selection(cache: RepoCache, commit: str) -> dict[str, Any] | None:
    """The selection an earlier pull of `commit` made, or None when it pulled everything."""
    try:
        selection = json.loads(record_path(cache, commit).read_text())["selection"]
        return dict(selection)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_record(cache: RepoCache, commit: str) -> dict[str, dict[str, Any]]:
    """path -> {"size", "why"} of the files a pull skipped on purpose; empty when none or unreadable."""
    try:
        doc = json.loads(record_path(cache, commit).read_text())
        skipped = doc["skipped"]
        return {str(p): dict(info) for p, info in skipped.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class IndexReader:
    """Reads a small file of the snapshot for the rules: local valid copy first, else the bucket."""

    def __init__(self, store: ObjectReader, cache: RepoCache, snap: StagedSnapshot) -> None:
        self.store = store
        self.cache = cache
        self.snap = snap
        self.fetched: dict[str, bytes] = {}

    def _local(self, entry: FileEntry) -> bytes | None:
        name = entry.blob_name
        path = self.cache.blob_path(name)
        if any(p.is_symlink() for p in (self.cache.repo_dir, self.cache.blobs, path)) or not path.is_file():
            return None  # a planted link is the clean-up's to remove, not ours to read through
        if self.cache.verified_unchanged(name) or check_content(path, entry) is None:
            return path.read_bytes()
        return None

    def __call__(self, relpath: str) -> bytes | None:
        entry = self.snap.manifest.files.get(relpath)
        if entry is None or entry.size > MAX_INDEX_BYTES:
            return None
        data = self._local(entry)
        if data is not None:
            return data
        key = self.snap.sources[entry.blob_name]
        read = functools.partial(self.store.get_bytes, key, limit=MAX_INDEX_BYTES)
        data = parsed_or_read_again(read(), read, functools.partial(self._matching, relpath, entry),
                                    self.store.body_retry)  # bytes damaged on the way are read again
        self.fetched[entry.blob_name] = data
        return data

    def _matching(self, relpath: str, entry: FileEntry, data: bytes) -> bytes:
        if not bytes_match(entry, data):
            raise VerificationError(f"{relpath} of {self.snap.repo_id} does not match the manifest",
                                    hint="the staged model is damaged; re-stage it (`simswarm-agent stage`)")
        return data


def narrowed(snap: StagedSnapshot, keep: frozenset[str]) -> StagedSnapshot:
    manifest = Manifest({p: e for p, e in snap.manifest.files.items() if p in keep})
    blobs = set(manifest.blobs())
    return replace(snap, manifest=manifest, sources={n: k for n, k in snap.sources.items() if n in blobs})


def narrow(store: ObjectReader, cache: RepoCache, snap: StagedSnapshot, selection: Selection,
           out: Output) -> Subset:
    """The snapshot restricted to the selection; logs what is skipped and what that saves."""
    if selection.everything:
        return Subset(snap, snap.manifest, selection, Choice(frozenset(snap.manifest.files)))
    reader = IndexReader(store, cache, snap)
    choice = choose(snap.manifest.files, selection, reader)
    if not choice.keep:
        raise UsageError(f"the file selection leaves none of the {len(snap.manifest.files)} files of "
                         f"{snap.repo_id}", hint="widen --include or drop --exclude")
    subset = Subset(narrowed(snap, choice.keep), snap.manifest, selection, choice, reader.fetched)
    for note in choice.notes:
        out.event("pull.select.note", note)
    fmt = f", vLLM load format {choice.load_format}" if choice.load_format else ""
    out.event("pull.select", f"--files {selection.files}{fmt}: pulling {len(choice.keep)} of "
              f"{len(snap.manifest.files)} files, skipping {len(choice.skipped)} "
              f"({human_bytes(subset.bytes_skipped)} saved)",
              files=len(choice.keep), files_skipped=len(choice.skipped), bytes_skipped=subset.bytes_skipped,
              load_format=choice.load_format, skipped=sorted(choice.skipped))
    return subset
