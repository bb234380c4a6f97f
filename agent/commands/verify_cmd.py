"""`verify MODEL [--revision REV] [--hf-home DIR]`: check a local cache against the manifest.

The manifest is the cache's own `trees/<commit>.json`; without one, the bucket's (when MINIO_ENDPOINT is
set); without either, the snapshot's links themselves (each blob checked against its own name). Every
problem is printed on stdout, one line each; the exit code is 0 when there is none, 4 otherwise. Files a
pull skipped on purpose (`--files vllm`, `--include`, `--exclude`) are listed as such, not as missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.audit import Problem
from agent.cache import RepoCache, check_repo_id, check_revision, is_commit
from agent.errors import ManifestError, NotAvailableError, VerificationError
from agent.manifest import FileEntry, Manifest, parse_manifest
from agent.output import Output, human_bytes
from agent.remote import RemoteRepo
from agent.s3read import open_reader
from agent.settings import Settings
from agent.subset import read_record
from agent.verify import audit_cache


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "verify", help="check a local cache against the manifest; list every problem")
    parser.add_argument("model", help="Hugging Face repo id, e.g. Qwen/Qwen3-14B")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    parser.add_argument("--hf-home", type=Path, metavar="DIR",
                        help="HF_HOME to check (the cache is DIR/hub); default from the environment")
    parser.set_defaults(func=run)


def resolve_commit(cache: RepoCache, revision: str, settings: Settings) -> str | None:
    """The commit to check: the revision itself, the local ref, else the bucket's ref."""
    if is_commit(revision):
        return revision
    commit = cache.read_ref(revision)
    if commit is None and settings.storage_enabled:
        try:
            remote = RemoteRepo(open_reader(settings), cache.repo_id)
            commit = remote.resolve(revision, remote.listing())
        except NotAvailableError:  # not staged, or the server is down: the local ref is all there is
            return None
    return commit


def links_manifest(cache: RepoCache, commit: str) -> Manifest | None:
    """Without any manifest: what the snapshot's links claim, each blob checked against its own name."""
    files: dict[str, FileEntry] = {}
    for relpath, path in cache.snapshot_entries(commit):
        name = cache.link_target_blob(path)
        if name is not None and cache.blob_path(name).is_file():
            files[relpath] = FileEntry.for_blob(name, cache.blob_path(name).stat().st_size)
    return Manifest(files) if files else None


def find_manifest(cache: RepoCache, commit: str, settings: Settings,
                  problems: list[Problem]) -> tuple[Manifest | None, str]:
    """The manifest and where it came from; a malformed local one is itself a problem."""
    tree = cache.tree_path(commit)
    if tree.is_file():
        try:
            return parse_manifest(tree.read_bytes()), "local trees/"
        except ManifestError as exc:
            problems.append(Problem(f"trees/{commit}.json", str(exc)))
    if settings.storage_enabled:
        try:
            return RemoteRepo(open_reader(settings), cache.repo_id).load(commit).manifest, "bucket"
        except NotAvailableError:  # not staged, or the server is down: check the blobs by their names
            pass
    return links_manifest(cache, commit), "snapshot links (no manifest found)"


def without_skipped(cache: RepoCache, commit: str, manifest: Manifest, out: Output) -> Manifest:
    """The files the snapshot should hold: the manifest less what a pull skipped on purpose (recorded
    by the pull; the bucket's manifest lists them, the local trees/ file already does not)."""
    skipped = read_record(cache, commit)
    if not skipped:
        return manifest
    size = sum(int(info.get("size", 0)) for info in skipped.values())
    out.event("verify.skipped", f"{len(skipped)} files were skipped on purpose by the file selection "
              f"({human_bytes(size)}): {', '.join(sorted(skipped)[:5])}"
              + (f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else ""),
              skipped={p: info.get("why", "") for p, info in sorted(skipped.items())})
    return Manifest({p: e for p, e in manifest.files.items() if p not in skipped})


def run(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    settings = settings.with_hf_home(args.hf_home)
    cache = RepoCache(settings.hub_cache, check_repo_id(args.model))
    revision = check_revision(args.revision)
    label = f"{cache.repo_id}@{revision}"
    problems: list[Problem] = []
    commit = resolve_commit(cache, revision, settings)
    manifest: Manifest | None = None
    if commit is None:
        problems.append(Problem(f"refs/{revision}", "missing ref: the revision is not in the local cache"))
    else:
        label = f"{cache.repo_id}@{commit[:12]}"
        manifest, source = find_manifest(cache, commit, settings, problems)
        if manifest is None:
            problems.append(Problem(f"snapshots/{commit}", "no manifest and no snapshot to check"))
        else:
            manifest = without_skipped(cache, commit, manifest, out)
            out.event("verify.manifest", f"checking {label} in {cache.hub_cache}: "
                      f"{len(manifest.files)} files, manifest from {source}",
                      commit=commit, files=len(manifest.files), manifest=source)
            problems += audit_cache(cache, commit, manifest, revision)
    for problem in problems:
        sys.stdout.write(f"{problem}\n")
    sys.stdout.flush()
    if problems:
        raise VerificationError(f"{len(problems)} problem(s) in {label} (listed above)",
                                hint="run `simswarm-agent pull MODEL` to repair the cache")
    out.event("verify.ok", f"{label}: every file, link, blob and ref is correct",
              commit=commit, files=len(manifest.files) if manifest else 0)
    return 0
