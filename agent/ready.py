"""Is the snapshot already complete and verified in the cache? Asked before anything is written.

The lock, the clean-up, the stamps and the links all write, and a cache on a read-only volume (a
ReadOnlyMany model volume in Kubernetes) refuses every write, while huggingface_hub, and so vLLM, serves
it offline as it is. So a pull first checks, reading only, whether the snapshot can be used as it is,
and takes the lock only when something must be written.

"Verified" is the rule a warm pull uses, applied without writing:
- `--verify full`: every blob has a stamp (`.simswarm/verified/<id>`) that still matches it: verified
  before, unchanged since. A cache the agent can write defers a blob without one to the locked pull,
  which hashes and stamps it once; on a cache it cannot write no stamp can be added, so such a blob is
  hashed now, on every start (fill the volume with `simswarm-agent pull` to have stamps in it).
- `--verify size`: every blob has its size.
- `--rehash`: no stamp is trusted.
Besides the blobs, the snapshot must be what `verify` checks: the ref holds the commit, every path is a
relative link to its blob, nothing stray, and a trees/<commit>.json, if present, lists exactly the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.audit import BlobCheck
from agent.cache import RepoCache
from agent.errors import ReadOnlyCacheError
from agent.manifest import FileEntry, Manifest
from agent.verify import audit_cache, check_content


def cache_writable(cache: RepoCache) -> bool:
    """Whether this process may write the model's folder, or create it in the nearest existing parent.
    access(2) answers for read-only mounts too (EROFS), root included."""
    path = cache.repo_dir
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def blob_check(cache: RepoCache, *, full: bool, rehash: bool, writable: bool) -> BlobCheck:
    def check(path: Path, entry: FileEntry) -> str | None:
        if not full:
            return check_content(path, entry, full=False)
        if not rehash and cache.verified_unchanged(path.name):
            return None
        if writable:
            return "not verified since it landed"  # the locked pull hashes it once and stamps it
        return check_content(path, entry, full=True)

    return check


def as_is_problem(cache: RepoCache, commit: str, manifest: Manifest, revision: str, *, full: bool,
                  rehash: bool) -> str | None:
    """None when the snapshot can be served exactly as it is; else the first reason it cannot."""
    check = blob_check(cache, full=full, rehash=rehash, writable=cache_writable(cache))
    problems = audit_cache(cache, commit, manifest, revision, check=check)
    return str(problems[0]) if problems else None


def refuse_read_only(cache: RepoCache, commit: str, problem: str) -> None:
    """A cache that cannot be written must be usable as it is: else one line saying why it is not."""
    if not cache_writable(cache):
        raise ReadOnlyCacheError(f"{cache.repo_id}@{commit[:12]}: the cache {cache.hub_cache} is read-only "
                                 f"and its copy is not complete: {problem}")
