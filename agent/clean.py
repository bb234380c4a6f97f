"""Stale pre-seeds: inspect one model's folder before a pull, keep what verifies, remove the rest.

Only the requested model's folder is touched, and no link is ever followed out of it: a planted link
is removed as a link, never through its target. The folder is classified once, by agent.audit: the
same findings `verify` reports, each kind with its action (see `agent.audit.Kind`). What is removed or kept:
- temporary files (ours when not resumable, huggingface_hub's `.incomplete`, atomic-write leftovers);
- blobs of the manifest that fail their check (truncated, corrupted), and orphan blobs no link uses
  (blobs of the same commit that a narrower file selection leaves out are kept, unlinked);
- dangling links, links out of the repo's blobs/ folder, links of the requested commit to a bad blob;
- regular files in the requested snapshot (a copied cache without links): moved into blobs/ when they
  verify, so their bytes are reused, removed otherwise;
- refs that point at a commit with no snapshot (scan_cache_dir reports those as corruption), links,
  pipes and temporary files among the refs;
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

from agent.audit import BlobCheck, Finding, Kind, audit_folder
from agent.cache import RepoCache, is_commit
from agent.manifest import FileEntry, Manifest
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


def _check(cache: RepoCache, full: bool) -> BlobCheck:
    """A blob verified before and unchanged since is not hashed again; else size, and hash when `full`."""
    def check(path: Path, entry: FileEntry) -> str | None:
        if cache.verified_unchanged(path.name):
            return None
        return check_content(path, entry, full=full)

    return check


def repair_blobs(cache: RepoCache, findings: list[Finding], keep_partials: set[str], full: bool,
                 report: CleanReport) -> None:
    """Bad blobs, temporaries and non-files under a blob's name go; partials still wanted stay."""
    for found in findings:
        if found.kind is Kind.BLOB and found.blob:
            report.valid_blobs.add(found.blob)
            if full:
                cache.remember_verified(found.blob)
        elif found.kind is Kind.BAD_BLOB and found.blob:
            cache.forget_verified(found.blob)
            _unlink(found.path, report, cache)
        elif found.kind is Kind.PARTIAL and found.blob in keep_partials and not found.path.is_symlink():
            continue
        elif found.kind in (Kind.PARTIAL, Kind.TEMPORARY, Kind.NOT_A_FILE):
            _unlink(found.path, report, cache)


def adopt_copies(cache: RepoCache, commit: str, findings: list[Finding], full: bool,
                 report: CleanReport) -> None:
    """A snapshot file that is a real file (s5cmd copies follow links) becomes a blob when it verifies."""
    for found in findings:
        if found.kind is not Kind.COPY or found.entry is None:
            continue
        path, entry = found.path, found.entry
        if path.is_file() and entry.blob_name not in report.valid_blobs \
                and check_content(path, entry, full=full) is None:
            cache.blobs.mkdir(parents=True, exist_ok=True)
            os.replace(path, cache.blob_path(entry.blob_name))
            report.valid_blobs.add(entry.blob_name)
            report.reused.append(path.relative_to(cache.snapshot_dir(commit)).as_posix())
            if full:
                cache.remember_verified(entry.blob_name)
        else:
            _unlink(path, report, cache)


def repair_snapshots(cache: RepoCache, findings: list[Finding], present: set[str],
                     report: CleanReport) -> set[str]:
    """Drop what is not a snapshot, strays, wrong links and links whose blob is not `present` after the
    blob repair (in the requested commit: its valid blobs). Returns every blob still linked."""
    used: set[str] = set()
    for found in findings:
        if found.kind in (Kind.STALE_SNAPSHOT, Kind.STRAY, Kind.WRONG_LINK):
            _unlink(found.path, report, cache)
        elif found.kind in (Kind.LINK, Kind.NOT_RELATIVE, Kind.DANGLING):
            if found.blob in present:
                used.add(found.blob)
            else:
                _unlink(found.path, report, cache)
    if cache.snapshots.is_dir():
        for snap in cache.snapshots.iterdir():
            if snap.is_dir() and not snap.is_symlink():
                _prune_empty_dirs(snap)
    return used


def _prune_empty_dirs(root: Path) -> None:
    for dirpath, _dirnames, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def clean_orphans(cache: RepoCache, findings: list[Finding], manifest: Manifest, used: set[str],
                  report: CleanReport, keep_blobs: set[str] | None = None) -> None:
    """Blobs no link uses go, except those of the manifest and `keep_blobs` (the commit's files that a
    narrower selection leaves out: kept so a wider pull later fetches nothing twice, but without a
    verified stamp, which only selected blobs carry)."""
    keep = used | set(manifest.blobs()) | (keep_blobs or set())
    for name in (keep_blobs or set()) - used - set(manifest.blobs()):
        cache.forget_verified(name)
    for found in findings:
        if found.kind is Kind.OTHER_BLOB and found.blob and found.blob not in keep:
            cache.forget_verified(found.blob)
            _unlink(found.path, report, cache)


def repair_refs(cache: RepoCache, findings: list[Finding], report: CleanReport) -> None:
    """Refs that would mislead huggingface_hub go; the revision's own ref the pull rewrites."""
    for found in findings:
        moved = found.kind is Kind.WRONG_REF and not cache.snapshot_dir(found.commit or "").is_dir()
        if found.kind in (Kind.BAD_REF, Kind.REF_TEMPORARY) or moved:
            _unlink(found.path, report, cache)


def clean_stale(cache: RepoCache, commit: str, manifest: Manifest, *, full: bool,
                keep_partials: set[str], keep_blobs: set[str] | None = None,
                log: Callable[[str], None] | None = None, revision: str | None = None) -> CleanReport:
    """Audit the folder once (agent.audit), then repair in order; returns what was removed, reused and
    found valid."""
    report = CleanReport()
    if not cache.repo_dir.exists() and not cache.repo_dir.is_symlink():
        return report
    unplant_links(cache, report)
    if not cache.repo_dir.is_dir():
        return report
    clear_the_way(cache, commit, revision, report)
    findings = audit_folder(cache, commit, manifest, revision, check=_check(cache, full), trees=False)
    repair_blobs(cache, findings, keep_partials, full, report)
    adopt_copies(cache, commit, findings, full, report)
    present = report.valid_blobs | {f.blob for f in findings if f.kind is Kind.OTHER_BLOB and f.blob}
    used = repair_snapshots(cache, findings, present, report)
    clean_orphans(cache, findings, manifest, used, report, keep_blobs)
    repair_refs(cache, findings, report)
    if log and (report.removed or report.reused):
        log(f"cleaned {len(report.removed)} stale entries, reused {len(report.reused)} copied files")
    return report
