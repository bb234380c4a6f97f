"""Lay a model directory out as a Hugging Face cache, as huggingface_hub would after a download.

Used by `demo` and the benchmark, where no Hub (not even a fake one) is running. Blob names follow the
Hub: LFS files (safetensors, bin, anything large) by sha256, others by git blob sha1.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from agent.cache import RepoCache
from agent.manifest import git_blob_sha1

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_MIN_BYTES = 10 << 20


def blob_name_for(relpath: str, path: Path) -> str:
    size = path.stat().st_size
    if relpath.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(4 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return git_blob_sha1(path.read_bytes())


def seed_cache(model_dir: Path, hub_cache: Path, repo_id: str, commit: str, revision: str = "main") -> Path:
    """Copy each file of `model_dir` into blobs/, link it from snapshots/<commit>/; returns the snapshot."""
    cache = RepoCache(hub_cache, repo_id)
    cache.ensure_dirs()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relpath = path.relative_to(model_dir).as_posix()
        name = blob_name_for(relpath, path)
        blob = cache.blob_path(name)
        if not blob.exists():
            shutil.copyfile(path, blob)
        cache.link(commit, relpath, name)
    cache.write_ref(revision, commit)
    return cache.snapshot_dir(commit)


def fake_commit(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()
