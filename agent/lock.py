"""The lock of one model folder in the cache: one agent writes at a time, a reader waits for a writer.

It is a `flock` on `.locks/<model folder>/simswarm-agent.lock`, beside the locks huggingface_hub keeps;
a second agent on the same volume waits for the first, then finds the work done.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agent.cache import RepoCache
from agent.errors import ReadOnlyCacheError
from agent.output import Output
from agent.ready import cache_writable

_CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


def open_lock_file(path: Path) -> int:
    """Open (creating) the lock file without following a link: a planted link must not make the agent
    create or touch a file outside the cache. A link found there is removed and the open retried."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        path.unlink()
        return os.open(path, flags, 0o644)


@contextlib.contextmanager
def cache_lock(cache: RepoCache, out: Output) -> Iterator[None]:
    """An exclusive lock per model folder under .locks/ (where huggingface_hub keeps its own)."""
    try:
        cache.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(cache.lock_path)
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
        raise ReadOnlyCacheError(f"{cache.repo_id}: cannot write in the cache {cache.hub_cache} "
                                 f"({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out.event("pull.wait", f"another agent is pulling {cache.repo_id} into this cache; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading_lock(cache: RepoCache, out: Output) -> Iterator[None]:
    """The lock while only reading, so a writer at work is waited for; none where nobody may write."""
    with contextlib.ExitStack() as stack:
        if cache_writable(cache):
            with contextlib.suppress(ReadOnlyCacheError):
                stack.enter_context(cache_lock(cache, out))
        yield
