"""One audit of a model's folder: every entry classified once, by the cache's own rules (agent/cache.py).

`simswarm-agent verify` reports the findings that are problems (`audit_cache` in agent/verify.py); the
pull's clean-up repairs what it can (`clean_stale` in agent/clean.py). Both read the same findings, so
what one calls a stray file, a bad blob or a wrong link, the other does too. Each `Kind` says what it is,
whether `verify` reports it, and what the clean-up does with it. No link is followed out of the folder,
and nothing here writes.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.cache import BLOB_RE, RepoCache, is_commit, is_temporary, link_target, partial_blob
from agent.errors import ManifestError
from agent.manifest import FileEntry, Manifest, parse_manifest

BlobCheck = Callable[[Path, FileEntry], "str | None"]  # None when the blob's bytes are right


class Kind(enum.Enum):
    """What an entry is. "Reported": `verify` lists it as a problem. The clean-up's action follows."""

    # blobs/
    BLOB = enum.auto()  # a manifest blob whose bytes pass the check: kept (stamped when fully hashed)
    BAD_BLOB = enum.auto()  # a manifest blob that fails it: reported, removed
    MISSING_BLOB = enum.auto()  # a manifest blob not on disk: reported; the pull fetches it
    NOT_A_FILE = enum.auto()  # a blob name held by a link, folder, pipe: reported (the manifest's), removed
    OTHER_BLOB = enum.auto()  # a blob not in the manifest: removed unless linked or kept by the selection
    PARTIAL = enum.auto()  # our partial download of a blob, or its checkpoint: reported; kept if resumable
    TEMPORARY = enum.auto()  # any other name: reported, removed
    # snapshots/
    LINK = enum.auto()  # a link to its blob by the relative target: kept while its blob is there
    NOT_RELATIVE = enum.auto()  # a link to its blob by another target: reported, kept (the pull relinks it)
    DANGLING = enum.auto()  # a link into blobs/ whose blob is not there: kept only if the repair brings it
    WRONG_LINK = enum.auto()  # to another blob, or out of blobs/: reported (requested snapshot), removed
    MISSING_LINK = enum.auto()  # a manifest path with no link: reported; the pull links it
    COPY = enum.auto()  # a real file where a link belongs: reported; adopted as its blob if it verifies
    STRAY = enum.auto()  # a path the manifest does not list: reported, removed
    OTHER_FILE = enum.auto()  # a real file in another commit's snapshot: not ours to judge, kept
    STALE_SNAPSHOT = enum.auto()  # a file, link or non-commit name under snapshots/: removed
    MISSING_SNAPSHOT = enum.auto()  # the requested commit has no snapshot folder: reported
    # refs/
    REF = enum.auto()  # holds a commit that has a snapshot: kept
    WRONG_REF = enum.auto()  # the revision's ref holds another commit: reported; kept if that has a snapshot
    BAD_REF = enum.auto()  # a link, whitespace, no commit, or a commit without snapshot: reported, removed
    REF_TEMPORARY = enum.auto()  # a temporary file among the refs: reported, removed
    MISSING_REF = enum.auto()  # the revision has no ref: reported; the pull writes it
    # the rest
    BAD_TREE = enum.auto()  # trees/<commit>.json unreadable or listing other files: reported; rewritten
    MISSING_FOLDER = enum.auto()  # the model's folder itself: reported


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass(frozen=True)
class Finding:
    """One entry of the folder: what it is, where (as `verify` names it), and what `verify` says about it
    (None: nothing)."""

    kind: Kind
    path: Path
    where: str
    what: str | None = None
    blob: str | None = None  # the blob it is, links to, or is a partial of
    commit: str | None = None  # a ref's commit
    entry: FileEntry | None = None  # the manifest's entry, for a copy


def problems(findings: Iterable[Finding]) -> list[Problem]:
    return [Problem(f.where, f.what) for f in findings if f.what is not None]


def audit_folder(cache: RepoCache, commit: str, manifest: Manifest, revision: str | None, *,
                 check: BlobCheck, trees: bool = True, others: bool = True) -> list[Finding]:
    """Every entry of one model's folder, classified against the requested commit's manifest, in the
    order `verify` lists problems: refs, the snapshot, blobs, the tree. `check` judges each blob of the
    manifest; `revision` None skips what only a named revision can tell (its missing or moved ref);
    `trees` False skips the tree file (the pull rewrites it anyway); `others` False skips the entries
    of other commits' snapshots (none of them is a problem of this one)."""
    if not cache.repo_dir.is_dir() or cache.repo_dir.is_symlink():
        return [Finding(Kind.MISSING_FOLDER, cache.repo_dir, cache.folder,
                        "model folder missing from the cache")]
    blobs = blob_findings(cache, manifest, check)
    present = {f.blob for f in blobs if f.blob and f.kind in (Kind.BLOB, Kind.BAD_BLOB, Kind.OTHER_BLOB)}
    snapshots, live = snapshot_findings(cache, commit, manifest, present, others=others)
    found = ref_findings(cache, revision, commit, live) + snapshots + blobs
    return found + tree_findings(cache, commit, manifest) if trees else found


def blob_findings(cache: RepoCache, manifest: Manifest, check: BlobCheck) -> list[Finding]:
    """The manifest's blobs first (by name), then everything else under blobs/."""
    found: list[Finding] = []
    wanted = manifest.blobs()
    for name, entry in sorted(wanted.items()):
        path, where = cache.blob_path(name), f"blobs/{name}"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            found.append(Finding(Kind.NOT_A_FILE, path, where, "not a regular file", blob=name))
        elif not path.exists():
            found.append(Finding(Kind.MISSING_BLOB, path, where, "missing blob", blob=name))
        else:
            what = check(path, entry)
            found.append(Finding(Kind.BLOB if what is None else Kind.BAD_BLOB, path, where, what, blob=name))
    if not cache.blobs.is_dir():
        return found
    for path in sorted(cache.blobs.iterdir()):
        name, where = path.name, f"blobs/{path.name}"
        if name in wanted:
            continue
        if BLOB_RE.match(name):
            regular = path.is_file() and not path.is_symlink()
            found.append(Finding(Kind.OTHER_BLOB if regular else Kind.NOT_A_FILE, path, where, blob=name))
        else:
            partial = partial_blob(name)
            kind = Kind.TEMPORARY if partial is None else Kind.PARTIAL
            found.append(Finding(kind, path, where, "stray temporary file", blob=partial))
    return found


def snapshot_findings(cache: RepoCache, commit: str, manifest: Manifest, present: set[str], *,
                      others: bool = True) -> tuple[list[Finding], set[str]]:
    """The requested snapshot's entries (manifest paths, then strays), then what else lies under
    snapshots/ (other commits' entries when `others`); and the commits that have a snapshot folder.
    `present`: blobs on disk as regular files."""
    rest: list[Finding] = []
    live: set[str] = set()
    if cache.snapshots.is_dir():
        for snap in sorted(cache.snapshots.iterdir()):
            if not snap.is_dir() or snap.is_symlink() or not is_commit(snap.name):
                rest.append(Finding(Kind.STALE_SNAPSHOT, snap, f"snapshots/{snap.name}"))
                continue
            live.add(snap.name)
            if others and snap.name != commit:
                rest += [_other_entry(cache, f"snapshots/{snap.name}/{relpath}", path, present)
                         for relpath, path in cache.snapshot_entries(snap.name)]
    if commit not in live:
        missing = Finding(Kind.MISSING_SNAPSHOT, cache.snapshot_dir(commit), f"snapshots/{commit}",
                          "missing snapshot folder")
        return [missing, *rest], live
    return _requested_entries(cache, commit, manifest, present) + rest, live


def _requested_entries(cache: RepoCache, commit: str, manifest: Manifest, present: set[str]) -> list[Finding]:
    """Every manifest path must be a relative link to its blob; nothing else may sit in the snapshot."""
    found: list[Finding] = []
    entries = dict(cache.snapshot_entries(commit))
    for relpath in sorted(manifest.files):
        entry = manifest.files[relpath]
        where = f"snapshots/{commit[:12]}/{relpath}"
        path = entries.get(relpath)
        if path is None:
            path = cache.snapshot_file(commit, relpath)
            what = "not a link (a copy of the file)" if path.exists() else "missing link"
            found.append(Finding(Kind.MISSING_LINK, path, where, what, blob=entry.blob_name))
        elif not path.is_symlink():
            found.append(Finding(Kind.COPY, path, where, "not a link (a copy of the file)",
                                 blob=entry.blob_name, entry=entry))
        else:
            found.append(_link(cache, path, where, relpath, entry, present))
    for relpath in sorted(set(entries) - set(manifest.files)):
        what = "stray temporary file" if is_temporary(relpath) else "not in the manifest"
        found.append(Finding(Kind.STRAY, entries[relpath], f"snapshots/{commit[:12]}/{relpath}", what))
    return found


def _link(cache: RepoCache, path: Path, where: str, relpath: str, entry: FileEntry,
          present: set[str]) -> Finding:
    target, blob = os.readlink(path), cache.link_target_blob(path)
    if blob != entry.blob_name:
        return Finding(Kind.WRONG_LINK, path, where, f"wrong link target {target!r}, expected blob "
                      f"{entry.blob_name}", blob=blob)
    relative = link_target(relpath, blob)
    if target != relative:
        return Finding(Kind.NOT_RELATIVE, path, where, f"link target {target!r} is not the relative "
                      f"{relative!r}", blob=blob)
    kind = Kind.LINK if blob in present else Kind.DANGLING  # a missing blob is reported as such, once
    return Finding(kind, path, where, blob=blob)


def _other_entry(cache: RepoCache, where: str, path: Path, present: set[str]) -> Finding:
    """An entry of another commit's snapshot: `verify` checks only the requested one."""
    if not path.is_symlink():
        return Finding(Kind.OTHER_FILE, path, where)
    blob = cache.link_target_blob(path)
    if blob is None:
        return Finding(Kind.WRONG_LINK, path, where)
    return Finding(Kind.LINK if blob in present else Kind.DANGLING, path, where, blob=blob)


def ref_findings(cache: RepoCache, revision: str | None, commit: str, live: set[str]) -> list[Finding]:
    """The requested ref must hold exactly the commit (no newline); every other ref a snapshot's commit."""
    found: list[Finding] = []
    if revision is not None and not is_commit(revision) and not cache.ref_path(revision).is_file():
        found.append(Finding(Kind.MISSING_REF, cache.ref_path(revision), f"refs/{revision}", "missing ref"))
    if not cache.refs.is_dir():
        return found
    for path in sorted(cache.refs.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        name = path.relative_to(cache.refs).as_posix()
        found.append(_ref(path, name, revision, commit, live))
    return found


def _ref(path: Path, name: str, revision: str | None, commit: str, live: set[str]) -> Finding:
    where = f"refs/{name}"
    if is_temporary(name):
        return Finding(Kind.REF_TEMPORARY, path, where, "stray temporary file")
    if path.is_symlink():
        return Finding(Kind.BAD_REF, path, where, "a link, not a file")
    if not path.is_file():  # a pipe or a device: reading it could block forever
        return Finding(Kind.BAD_REF, path, where, "not a regular file")
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        return Finding(Kind.BAD_REF, path, where, f"unreadable ({exc.strerror})")
    if is_commit(text.strip()) and text != text.strip():
        return Finding(Kind.BAD_REF, path, where, "holds whitespace or a trailing newline around the commit "
                                                 "(breaks offline resolution)")
    if not is_commit(text):
        return Finding(Kind.BAD_REF, path, where, f"does not hold a 40-hex commit: {text[:50]!r}")
    if name == revision and text != commit:
        return Finding(Kind.WRONG_REF, path, where, f"points at {text[:12]}, expected {commit[:12]}",
                       commit=text)
    if text not in live:
        return Finding(Kind.BAD_REF, path, where, f"points at {text[:12]}, which has no snapshot",
                       commit=text)
    return Finding(Kind.REF, path, where, commit=text)


def tree_findings(cache: RepoCache, commit: str, manifest: Manifest) -> list[Finding]:
    """A trees/<commit>.json is optional, but when present it must list exactly the manifest's files."""
    path = cache.tree_path(commit)
    where = f"trees/{commit}.json"
    if not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_file():
        return [Finding(Kind.BAD_TREE, path, where, "not a regular file")]
    try:
        local = parse_manifest(path.read_bytes())
    except ManifestError as exc:
        return [Finding(Kind.BAD_TREE, path, where, str(exc))]
    if dict(local.files) != dict(manifest.files):
        return [Finding(Kind.BAD_TREE, path, where, "does not list exactly the files of the snapshot")]
    return []
