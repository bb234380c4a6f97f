"""A staged model in the bucket: its keys, refs, manifest and sidecar, in compact or legacy form.

Compact (what `stage` writes): blobs/, refs/, trees/<commit>.json, parts/<commit>.json.
Legacy (`s5cmd cp` of a whole cache): blobs/ plus full copies under snapshots/<commit>/, maybe no trees/.
Either way `load` returns one `StagedSnapshot`: the manifest, and for each distinct blob the one key to
download it from, so a blob shared by several paths is fetched once.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.cache import BLOB_RE, check_repo_id, check_revision, is_commit, repo_folder_name, safe_relpath
from agent.errors import ManifestError, NotFoundError, UnsafePathError, UsageError, VerificationError
from agent.manifest import Manifest, Sidecar, derive_legacy, parse_manifest, parse_sidecar
from agent.s3read import ObjectInfo, ObjectReader, parsed_or_read_again
from agent.settings import MODELS_PREFIX

T = TypeVar("T")


@dataclass(frozen=True)
class StagedSnapshot:
    repo_id: str
    commit: str
    manifest: Manifest
    sources: dict[str, str]  # blob name -> object key to read its bytes from
    sidecar: Sidecar | None = None
    form: str = "compact"
    refs: dict[str, str] = field(default_factory=dict)


def repo_id_from_folder(folder: str) -> str | None:
    """`models--org--name` -> `org/name`; None for anything that is not a model folder we could pull."""
    parts = folder.rstrip("/").split("--")
    if len(parts) < 2 or parts[0] != "models":
        return None
    try:
        return check_repo_id("/".join(parts[1:]))
    except UsageError:
        return None


class RemoteRepo:
    def __init__(self, store: ObjectReader, repo_id: str) -> None:
        self.store = store
        self.repo_id = repo_id
        self.prefix = f"{MODELS_PREFIX}{repo_folder_name(repo_id)}/"

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def blob_key(self, name: str) -> str:
        return self.key("blobs", name)

    def tree_key(self, commit: str) -> str:
        return self.key("trees", f"{commit}.json")

    def parts_key(self, commit: str) -> str:
        return self.key("parts", f"{commit}.json")

    def ref_key(self, revision: str) -> str:
        return self.key("refs", str(safe_relpath(check_revision(revision))))

    def listing(self) -> list[ObjectInfo]:
        return list(self.store.list_objects(self.prefix))

    def refs(self, listing: list[ObjectInfo], only: str | None = None) -> dict[str, str]:
        """revision -> commit for every ref object (or the one named `only`), read at once; a ref that
        is not 40 hex is refused."""
        keys = {obj.key[len(self.prefix) + 5:]: obj.key for obj in listing
                if obj.key[len(self.prefix):].startswith("refs/")}
        if only is not None:
            keys = {only: keys[only]} if only in keys else {}
        found = {}
        for key, data in self.store.get_many(keys.values()).items():
            name = key[len(self.prefix) + 5:]
            found[name] = self.parsed(key, data, functools.partial(self._commit_of, name))
        return found

    def _commit_of(self, name: str, data: bytes) -> str:
        text = data[:1024].decode("utf-8", "replace").strip()
        if not is_commit(text):
            raise ManifestError(f"ref {name!r} of {self.repo_id} does not hold a 40-hex commit")
        return text

    def parsed(self, key: str, data: bytes, parse: Callable[[bytes], T]) -> T:
        """`parse(data)`, the object at `key` read again while its bytes do not parse (a body cut short)."""
        return parsed_or_read_again(data, functools.partial(self.store.get_bytes, key), parse,
                                    self.store.body_retry)

    def resolve(self, revision: str, listing: list[ObjectInfo]) -> str:
        if is_commit(revision):
            return revision
        revision = check_revision(revision)
        commit = self.refs(listing, only=revision).get(revision)
        if commit is None:
            raise NotFoundError(f"{self.repo_id}@{revision} is not staged in bucket {self.store.bucket!r}")
        return commit

    def load(self, revision: str = "main", listing: list[ObjectInfo] | None = None) -> StagedSnapshot:
        listing = self.listing() if listing is None else listing
        if not listing:
            raise NotFoundError(f"{self.repo_id} is not staged in bucket {self.store.bucket!r}")
        commit = self.resolve(revision, listing)
        by_key = {obj.key: obj for obj in listing}
        snapshot = self._snapshot_objects(commit, listing)
        blob_base = self.key("blobs", "")
        blobs = {k[len(blob_base):]: o for k, o in by_key.items() if k.startswith(blob_base)}
        small = self.store.get_many(k for k in (self.tree_key(commit), self.parts_key(commit)) if k in by_key)
        if self.tree_key(commit) in small:
            manifest = self.parsed(self.tree_key(commit), small[self.tree_key(commit)], parse_manifest)
            form = "legacy" if snapshot else "compact"
        elif snapshot:
            manifest = derive_legacy(match_snapshot_to_blobs(snapshot, blobs),
                                     {name: obj.size for name, obj in blobs.items()})
            form = "legacy"
        else:
            raise NotFoundError(f"{self.repo_id}@{commit[:12]} has neither a manifest nor snapshot objects")
        parts_key = self.parts_key(commit)
        sidecar = self.parsed(parts_key, small[parts_key], parse_sidecar) if parts_key in small else None
        sources = self._sources(manifest, blobs, snapshot)
        return StagedSnapshot(self.repo_id, commit, manifest, sources, sidecar, form)

    def _snapshot_objects(self, commit: str, listing: list[ObjectInfo]) -> dict[str, ObjectInfo]:
        base = self.key("snapshots", commit, "")
        found = {}
        for obj in listing:
            if obj.key.startswith(base):
                rel = obj.key[len(base):]
                safe_relpath(rel)
                found[rel] = obj
        return found

    def _sources(self, manifest: Manifest, blobs: dict[str, ObjectInfo],
                 snapshot: dict[str, ObjectInfo]) -> dict[str, str]:
        """Prefer blobs/<name>; a legacy bucket without it still has a snapshot copy to read. An object
        whose size differs from the manifest's can never verify: refused here, before any transfer
        (ranged GETs past its end would otherwise look like a flaky server)."""
        candidates: dict[str, list[ObjectInfo]] = defaultdict(list)
        for path, entry in manifest.files.items():
            name = entry.blob_name
            if name in blobs and blobs[name] not in candidates[name]:
                candidates[name].insert(0, blobs[name])
            if path in snapshot:
                candidates[name].append(snapshot[path])
        sources = {}
        for name, entry in manifest.blobs().items():
            found = candidates.get(name, [])
            if not found:
                raise NotFoundError(f"{self.repo_id}: no object holds blob {name[:12]}")
            fitting = [obj for obj in found if obj.size == entry.size]
            if not fitting:
                raise VerificationError(
                    f"{found[0].key[len(self.prefix):]} is {found[0].size} bytes but the manifest says "
                    f"{entry.size}",
                    hint="the staged model is damaged; re-stage it with `simswarm-agent stage`")
            sources[name] = fitting[0].key
        return sources


def match_snapshot_to_blobs(snapshot: dict[str, ObjectInfo], blobs: dict[str, ObjectInfo]) -> dict[str, str]:
    """Which blob each legacy snapshot copy is. s5cmd uploads a blob and its copy the same way, so the
    pair shares size and ETag; with several candidates the ETag decides, and no match is an error."""
    by_shape: dict[tuple[int, str], list[str]] = defaultdict(list)
    for name, obj in blobs.items():
        if BLOB_RE.match(name):
            by_shape[(obj.size, obj.etag)].append(name)
    mapping = {}
    for path, obj in snapshot.items():
        candidates = by_shape.get((obj.size, obj.etag), [])
        if len(candidates) != 1:
            raise ManifestError(
                f"legacy snapshot file {path!r} matches {len(candidates)} blobs by size and ETag; "
                "re-stage the model with `simswarm-agent stage`")
        mapping[path] = candidates[0]
    return mapping


@dataclass(frozen=True)
class StagedSummary:
    repo_id: str
    revision: str
    commit: str
    files: int
    size: int
    form: str


def staged_models(store: ObjectReader) -> list[StagedSummary]:
    """One row per (model, ref) staged under models/hf-cache/, compact or legacy. A damaged model gets
    one row saying so instead of hiding every other model behind its error."""
    rows = []
    for prefix in store.list_prefixes(MODELS_PREFIX):
        repo_id = repo_id_from_folder(prefix[len(MODELS_PREFIX):])
        if repo_id is None:
            continue
        remote = RemoteRepo(store, repo_id)
        try:
            rows.extend(_model_rows(remote))
        except (ManifestError, VerificationError, NotFoundError, UnsafePathError) as exc:
            rows.append(StagedSummary(repo_id, "-", "-", 0, 0, f"damaged: {exc}"))
    return rows


def _model_rows(remote: RemoteRepo) -> list[StagedSummary]:
    listing = remote.listing()
    refs = remote.refs(listing) or {commit: commit for commit in _snapshot_commits(remote, listing)}
    rows = []
    for revision, commit in sorted(refs.items()):
        snap = remote.load(commit, listing)
        rows.append(StagedSummary(remote.repo_id, revision, commit, len(snap.manifest.files),
                                  snap.manifest.total_size, snap.form))
    return rows


def _snapshot_commits(remote: RemoteRepo, listing: list[ObjectInfo]) -> set[str]:
    """Commits with a manifest or snapshot objects, for a model staged without refs."""
    commits = set()
    for obj in listing:
        parts = obj.key[len(remote.prefix):].split("/")
        if len(parts) >= 2 and parts[0] in {"snapshots", "trees"}:
            name = parts[1].removesuffix(".json")
            if is_commit(name):
                commits.add(name)
    return commits
