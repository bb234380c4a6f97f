"""The Hugging Face cache layout (README "The local cache"): paths, atomic writes, relative links, refs.

Everything that names a path inside the cache goes through `safe_relpath`, so no key or manifest entry
from the bucket can escape the cache directory. Our own bookkeeping lives where huggingface_hub does not
look: partial downloads next to the blobs under a suffix it does not resume (`.simswarm.part`), and
verification records in `<repo>/.simswarm/`, which `scan_cache_dir()` ignores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import UnsafePathError, UsageError

# The names of the cache: a commit and a git blob id are 40 hex (sha1), an LFS blob 64 hex (sha256).
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
BLOB_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PART_SUFFIX = ".simswarm.part"
STATE_SUFFIX = ".simswarm.json"
LINK_SUFFIX = ".simswarm-link"
# Files not done yet: ours, huggingface_hub's (`.incomplete`, `.lock`), atomic-write leftovers (`.tmp`).
TEMPORARY_SUFFIXES = (PART_SUFFIX, STATE_SUFFIX, ".incomplete", ".tmp", LINK_SUFFIX, ".lock")
MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
FILE_MODE = 0o644


def is_commit(value: str) -> bool:
    return bool(SHA1_RE.match(value))


def git_blob_header(size: int) -> bytes:
    """What git hashes before a file's bytes: a non-LFS blob is named sha1(header + bytes)."""
    return b"blob %d\0" % size


def is_temporary(name: str) -> bool:
    """Whether a cache path (its last component decides) names a file that is not done: a temporary
    suffix, or a dotfile (atomic writes and link swaps start with a dot)."""
    base = name.rsplit("/", 1)[-1]
    return base.endswith(TEMPORARY_SUFFIXES) or base.startswith(".")


def partial_blob(name: str) -> str | None:
    """The blob whose partial download (or its checkpoint) `name` under blobs/ is, else None."""
    if not name.endswith((PART_SUFFIX, STATE_SUFFIX)):
        return None
    base = name.removesuffix(PART_SUFFIX).removesuffix(STATE_SUFFIX)
    return base if BLOB_RE.match(base) else None


def link_target(relpath: str, blob_name: str) -> str:
    """The relative target of snapshots/<commit>/<relpath>: ../../blobs/<blob>, one more ../ per folder.
    `relpath` is a checked one (`safe_relpath`): each "/" is one folder deeper."""
    return "../" * (relpath.count("/") + 2) + f"blobs/{check_blob_name(blob_name)}"


def check_blob_name(name: str) -> str:
    if not BLOB_RE.match(name):
        raise UnsafePathError(f"blob name is not a 40- or 64-hex digest: {name[:80]!r}")
    return name


def safe_relpath(path: str) -> PurePosixPath:
    """A manifest or key path as a relative POSIX path that stays inside its folder, or UnsafePathError."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError("empty path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path longer than {MAX_PATH_BYTES} bytes: {path[:60]!r}...")
    if "\\" in path or path.startswith("/"):
        raise UnsafePathError(f"path is absolute or uses backslashes: {path[:80]!r}")
    if any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in path):
        raise UnsafePathError(f"path holds control characters: {path[:80]!r}")
    parts = path.split("/")
    for part in parts:
        if part in {"", ".", ".."}:
            raise UnsafePathError(f"path has an empty, '.' or '..' component: {path[:80]!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"path component longer than {MAX_COMPONENT_BYTES} bytes")
    return PurePosixPath(*parts)


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(REPO_PART_RE.match(p) and ".." not in p for p in parts):
        raise UsageError(f"not a Hugging Face repo id (org/name): {repo_id[:100]!r}")
    return repo_id


def check_revision(revision: str) -> str:
    """A branch, tag, `refs/pr/N` or commit: usable as a path under refs/."""
    try:
        safe_relpath(revision)
    except UnsafePathError as exc:
        raise UsageError(f"not a revision: {exc}") from None
    if revision.startswith("refs/") and not revision.startswith("refs/pr/"):
        raise UsageError(f"unsupported revision: {revision!r}")
    return revision


def repo_folder_name(repo_id: str) -> str:
    return "--".join(["models", *check_repo_id(repo_id).split("/")])


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see old or new, never half.

    Nothing is fsynced, as huggingface_hub and s5cmd fsync nothing: a killed process keeps the page
    cache, which is the crash the ordering of a pull is built for. An fsync would not make a power loss
    safe either (the blobs themselves are never synced) and it costs a journal commit: 0.1-0.4 s of an
    otherwise idle pull on these machines, more on a disk with gigabytes dirty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; a ref or manifest only its writer can read would break a cache filled by
        # one user and served by another (a shared or read-only model volume): world-readable, as
        # huggingface_hub's own files are.
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class BlobStamp:
    """What the agent remembers about a verified blob, to know it is unchanged since (see README)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> BlobStamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class RepoCache:
    """One model's folder in a hub cache: `models--org--name/{blobs,snapshots,refs,trees}`."""

    def __init__(self, hub_cache: Path, repo_id: str) -> None:
        self.hub_cache = Path(hub_cache)
        self.repo_id = check_repo_id(repo_id)
        self.folder = repo_folder_name(repo_id)
        self.repo_dir = self.hub_cache / self.folder
        self.blobs = self.repo_dir / "blobs"
        self.snapshots = self.repo_dir / "snapshots"
        self.refs = self.repo_dir / "refs"
        self.trees = self.repo_dir / "trees"
        self.state = self.repo_dir / ".simswarm"
        self.stamps = self.state / "verified"
        self.lock_path = self.hub_cache / ".locks" / self.folder / "simswarm-agent.lock"

    # -- paths ---------------------------------------------------------------------------------
    def blob_path(self, name: str) -> Path:
        return self.blobs / check_blob_name(name)

    def part_path(self, name: str) -> Path:
        return self.blobs / (check_blob_name(name) + PART_SUFFIX)

    def part_state_path(self, name: str) -> Path:
        return self.blobs / (check_blob_name(name) + STATE_SUFFIX)

    def snapshot_dir(self, commit: str) -> Path:
        if not is_commit(commit):
            raise UnsafePathError(f"commit is not 40 hex: {commit[:80]!r}")
        return self.snapshots / commit

    def snapshot_file(self, commit: str, relpath: str) -> Path:
        return self.snapshot_dir(commit).joinpath(*safe_relpath(relpath).parts)

    def ref_path(self, revision: str) -> Path:
        return self.refs.joinpath(*safe_relpath(check_revision(revision)).parts)

    def tree_path(self, commit: str) -> Path:
        return self.trees / f"{self.snapshot_dir(commit).name}.json"

    def stamp_path(self, name: str) -> Path:
        return self.stamps / check_blob_name(name)

    # -- writes --------------------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        for folder in (self.blobs, self.snapshots, self.refs):
            folder.mkdir(parents=True, exist_ok=True)

    def link(self, commit: str, relpath: str, blob_name: str) -> Path:
        """Point snapshots/<commit>/<relpath> at its blob, by the relative `link_target`."""
        dest = self.snapshot_file(commit, relpath)
        target = link_target(relpath, blob_name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() and os.readlink(dest) == target:
            return dest
        tmp = dest.parent / f".{dest.name}{LINK_SUFFIX}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest

    def write_ref(self, revision: str, commit: str) -> None:
        # No trailing newline: huggingface_hub compares the file's text to the commit verbatim.
        if not is_commit(commit):
            raise UnsafePathError(f"commit is not 40 hex: {commit[:80]!r}")
        atomic_write(self.ref_path(revision), commit.encode())

    def read_ref(self, revision: str) -> str | None:
        try:
            text = self.ref_path(revision).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return text if is_commit(text) else None

    def write_tree(self, commit: str, data: bytes) -> None:
        atomic_write(self.tree_path(commit), data)

    # -- verification records ------------------------------------------------------------------
    def remember_verified(self, name: str) -> None:
        stamp = BlobStamp.of(self.blob_path(name))
        # A stamp lost in a crash costs one re-hash, never a wrong verdict (it must match).
        atomic_write(self.stamp_path(name), json.dumps(stamp.__dict__).encode())

    def verified_unchanged(self, name: str) -> bool:
        """True when the blob was fully verified before and its size, times and inode are the same."""
        try:
            recorded = BlobStamp(**json.loads(self.stamp_path(name).read_text()))
            return recorded == BlobStamp.of(self.blob_path(name))
        except (OSError, ValueError, TypeError):
            return False

    def forget_verified(self, name: str) -> None:
        # A file where the stamps' folder belongs holds no stamp (the clean-up removes it): nothing to forget.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.stamp_path(name).unlink()

    # -- reading -------------------------------------------------------------------------------
    def snapshot_entries(self, commit: str) -> Iterator[tuple[str, Path]]:
        """(relpath, path) for every file or link under snapshots/<commit>, without following links."""
        root = self.snapshot_dir(commit)
        if not root.is_dir() or root.is_symlink():
            return
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            base = Path(dirpath)
            for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
                path = base / name
                yield path.relative_to(root).as_posix(), path

    def link_target_blob(self, path: Path) -> str | None:
        """The blob name a snapshot link points at, if it is a link into this repo's blobs/ folder."""
        if not path.is_symlink():
            return None
        target = os.readlink(path)
        resolved = os.path.normpath(os.path.join(path.parent, target))
        if os.path.dirname(resolved) != os.path.normpath(self.blobs):
            return None
        name = os.path.basename(resolved)
        return name if BLOB_RE.match(name) else None
