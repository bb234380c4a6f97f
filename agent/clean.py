"""Stale pre-seeds: inspect one model's folder before a pull, keep what verifies, remove the rest.

Only the requested model's folder is touched, and no link is ever followed out of it: a planted link
is removed as a link, never through its target. What is removed or kept:
- temporary files (ours when not resumable, huggingface_hub's `.incomplete`, atomic-write leftovers);
- blobs of the manifest that fail their check (truncated, corrupted), and orphan blobs no link uses
  (blobs of the same commit that a narrower file selection leaves out are kept, unlinked);
- dangling links, links out of the repo's blobs/ folder, links of the requested commit to a bad blob;
- regular files in the requested snapshot (a copied cache without links): moved into blobs/ when they
  verify, so their bytes are reused, removed otherwise;
- refs that point at a commit with no snapshot (scan_cache_dir reports those as corruption);
- a folder where the agent must write a file (`refs/<revision>`, `trees/<commit>.json`), a file where
  it keeps a folder (`.simswarm/verified`, a parent of `refs/<revision>`): else every rerun would fail
  on the same write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache import BLOB_RE, PART_SUFFIX, STATE_SUFFIX, RepoCache, is_commit
from agent.manifest import Manifest
from agent.verify import check_content


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    valid_blobs: set[str] = field(default_factory=set)

    def note(self, path: Path, cache: RepoCache) -> None:
        self.removed.append(os.path.relpath(path, cache.repo_dir))


def _unlink(path: Path, report: CleanReport, cache: RepoCache) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        report.note(path, cache)


def unplant_links(cache: RepoCache, report: CleanReport) -> None:
    """A cache folder that is itself a link could lead writes outside the cache: remove the link. A file
    where a folder belongs would make every later write fail: remove it too."""
    for folder in (cache.repo_dir, cache.blobs, cache.snapshots, cache.refs, cache.trees, cache.state,
                   cache.stamps):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            _unlink(folder, report, cache)


def clear_the_way(cache: RepoCache, commit: str, revision: str | None, report: CleanReport) -> None:
    """Remove what stands where the pull will write its ref and manifest: a folder in a file's place,
    a file (or link) in a folder's place. All of it inside the model's folder; links are not followed."""
    files = [cache.tree_path(commit)]
    if revision is not None and not is_commit(revision):
        ref = cache.ref_path(revision)
        files.append(ref)
        parent = ref.parent
        while parent != cache.refs:  # refs/pr for refs/pr/1
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                _unlink(parent, report, cache)
            parent = parent.parent
    for path in files:
        if path.is_dir() and not path.is_symlink():
            _unlink(path, report, cache)


def clean_temporaries(cache: RepoCache, keep_partials: set[str], report: CleanReport) -> None:
    if not cache.blobs.is_dir():
        return
    for path in cache.blobs.iterdir():
        name = path.name
        base = name.removesuffix(PART_SUFFIX).removesuffix(STATE_SUFFIX)
        if name.endswith((PART_SUFFIX, STATE_SUFFIX)) and base in keep_partials and not path.is_symlink():
            continue
        if not BLOB_RE.match(name) or path.is_symlink() or not path.is_file():
            _unlink(path, report, cache)


def check_blobs(cache: RepoCache, manifest: Manifest, full: bool, report: CleanReport) -> None:
    for name, entry in manifest.blobs().items():
        path = cache.blob_path(name)
        if not path.is_file():
            continue
        if cache.verified_unchanged(name) or check_content(path, entry, full=full) is None:
            report.valid_blobs.add(name)
            if full:
                cache.remember_verified(name)
        else:
            cache.forget_verified(name)
            _unlink(path, report, cache)


def adopt_regular_files(cache: RepoCache, commit: str, manifest: Manifest, full: bool,
                        report: CleanReport) -> None:
    """A snapshot file that is a real file (s5cmd copies follow links) becomes a blob when it verifies."""
    for relpath, path in list(cache.snapshot_entries(commit)):
        if path.is_symlink() or not path.is_file():
            continue
        entry = manifest.files.get(relpath)
        if entry is not None and entry.blob_name not in report.valid_blobs \
                and check_content(path, entry, full=full) is None:
            cache.blobs.mkdir(parents=True, exist_ok=True)
            os.replace(path, cache.blob_path(entry.blob_name))
            report.valid_blobs.add(entry.blob_name)
            report.reused.append(relpath)
            if full:
                cache.remember_verified(entry.blob_name)
        else:
            _unlink(path, report, cache)


def clean_links(cache: RepoCache, commit: str, manifest: Manifest, report: CleanReport) -> set[str]:
    """Drop links that dangle, leave blobs/, or (in the requested commit) point at the wrong blob.
    Returns every blob name still referenced by a link."""
    used: set[str] = set()
    if not cache.snapshots.is_dir():
        return used
    for snap in list(cache.snapshots.iterdir()):
        if not snap.is_dir() or snap.is_symlink() or not is_commit(snap.name):
            _unlink(snap, report, cache)
            continue
        for relpath, path in list(cache.snapshot_entries(snap.name)):
            blob = cache.link_target_blob(path)
            wanted = manifest.files.get(relpath)
            # In the requested commit every entry must be a manifest path linked to its valid blob.
            wrong = snap.name == commit and (
                wanted is None or blob != wanted.blob_name or blob not in report.valid_blobs)
            if not path.is_symlink():
                if snap.name != commit:
                    continue  # another revision's real file: not ours to judge
                _unlink(path, report, cache)
            elif blob is None or not cache.blob_path(blob).is_file() or wrong:
                _unlink(path, report, cache)
            else:
                used.add(blob)
        _prune_empty_dirs(snap)
    return used


def _prune_empty_dirs(root: Path) -> None:
    for dirpath, _dirnames, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def clean_orphans(cache: RepoCache, manifest: Manifest, used: set[str], report: CleanReport,
                  keep_blobs: set[str] | None = None) -> None:
    """Blobs no link uses go, except those of the manifest and `keep_blobs` (the commit's files that a
    narrower selection leaves out: kept so a wider pull later fetches nothing twice, but without a
    verified stamp, which only selected blobs carry)."""
    keep = used | set(manifest.blobs()) | (keep_blobs or set())
    for name in (keep_blobs or set()) - used - set(manifest.blobs()):
        cache.forget_verified(name)
    if cache.blobs.is_dir():
        for path in cache.blobs.iterdir():
            if BLOB_RE.match(path.name) and path.name not in keep:
                cache.forget_verified(path.name)
                _unlink(path, report, cache)


def clean_refs(cache: RepoCache, report: CleanReport) -> None:
    if not cache.refs.is_dir():
        return
    for path in list(cache.refs.rglob("*")):
        if path.is_symlink() or (path.is_file() and not _ref_ok(cache, path)):
            _unlink(path, report, cache)


def _ref_ok(cache: RepoCache, path: Path) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return is_commit(text) and cache.snapshot_dir(text).is_dir()


def clean_stale(cache: RepoCache, commit: str, manifest: Manifest, *, full: bool,
                keep_partials: set[str], keep_blobs: set[str] | None = None,
                log: Callable[[str], None] | None = None, revision: str | None = None) -> CleanReport:
    """Run every clean-up step in order; returns what was removed, reused and found valid."""
    report = CleanReport()
    if not cache.repo_dir.exists() and not cache.repo_dir.is_symlink():
        return report
    unplant_links(cache, report)
    if not cache.repo_dir.is_dir():
        return report
    clear_the_way(cache, commit, revision, report)
    clean_temporaries(cache, keep_partials, report)
    check_blobs(cache, manifest, full, report)
    adopt_regular_files(cache, commit, manifest, full, report)
    used = clean_links(cache, commit, manifest, report)
    clean_orphans(cache, manifest, used, report, keep_blobs)
    clean_refs(cache, report)
    if log and (report.removed or report.reused):
        log(f"cleaned {len(report.removed)} stale entries, reused {len(report.reused)} copied files")
    return report
