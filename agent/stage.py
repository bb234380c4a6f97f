"""`stage`: upload a model from a local Hugging Face cache into the bucket in compact form.

Each blob once (with its sha256 as object metadata, so a re-stage can tell an intact copy without
downloading it), then the part sidecar, then the manifest, and the ref last: a half-finished stage is
never visible under a ref. Local bytes are checked against their blob names before anything is sent, so a
corrupted local cache is refused instead of spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.cache import SHA256_RE, RepoCache, check_revision, is_commit
from agent.errors import NotFoundError, VerificationError
from agent.manifest import DEFAULT_PART_SIZE, FileEntry, Manifest, Sidecar, check_consistent
from agent.output import Output, Progress, human_bytes
from agent.remote import RemoteRepo
from agent.s3read import ObjectStore
from agent.verify import BlobDigests, digest_blob

SHA256_META = "sha256"


@dataclass
class StageResult:
    commit: str
    files: int
    blobs: int
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    uploaded_metadata: int = 0


def local_commit(cache: RepoCache, revision: str) -> str:
    commit = revision if is_commit(revision) else cache.read_ref(check_revision(revision))
    if commit is None or not cache.snapshot_dir(commit).is_dir():
        raise NotFoundError(f"{cache.repo_id}@{revision} is not in the local cache {cache.hub_cache}",
                            hint="pass --from-cache DIR or --from-hub")
    return commit


def local_blob(cache: RepoCache, relpath: str, path: Path) -> tuple[str, Path]:
    """The blob a snapshot entry stands for, and the file holding its bytes."""
    name = cache.link_target_blob(path)
    if name is None:
        raise VerificationError(f"{relpath}: snapshot entry is not a link into the repo's blobs/ folder")
    blob = cache.blob_path(name)
    if not blob.is_file():
        raise VerificationError(f"{relpath}: its blob {name[:12]} is missing from the local cache")
    return name, blob


def entry_for(name: str, relpath: str, digests: BlobDigests) -> FileEntry:
    """The manifest entry, after checking the bytes really are the blob their name claims."""
    lfs = bool(SHA256_RE.match(name))
    if (digests.sha256 if lfs else digests.git_sha1) != name:
        raise VerificationError(f"{relpath}: local bytes do not match blob {name[:12]} "
                                f"({'sha256' if lfs else 'git sha1'})")
    return FileEntry.for_blob(name, digests.size)


def scan_local(cache: RepoCache, commit: str, part_size: int,
               out: Output) -> tuple[Manifest, dict[str, BlobDigests], dict[str, Path]]:
    files: dict[str, FileEntry] = {}
    digests: dict[str, BlobDigests] = {}
    paths: dict[str, Path] = {}
    for relpath, path in sorted(cache.snapshot_entries(commit)):
        name, blob = local_blob(cache, relpath, path)
        if name not in digests:
            digests[name] = digest_blob(blob, part_size)
            paths[name] = blob
        files[relpath] = entry_for(name, relpath, digests[name])
    if not files:
        raise NotFoundError(f"{cache.repo_id}@{commit[:12]}: the local snapshot is empty")
    check_consistent(files)
    out.event("stage.scanned", f"checked {len(files)} files ({len(digests)} blobs) in the local cache",
              files=len(files), blobs=len(digests))
    return Manifest(files), digests, paths


def put_if_changed(store: ObjectStore, key: str, data: bytes) -> bool:
    """Upload a small object unless the bucket already holds exactly these bytes."""
    if store.head(key) is not None and store.get_bytes(key) == data:
        return False
    store.put_bytes(key, data, content_type="application/json")
    return True


def blob_is_intact(store: ObjectStore, key: str, digests: BlobDigests) -> bool:
    meta = store.head_metadata(key)
    return (meta is not None and meta.get("content-length") == str(digests.size)
            and meta.get(SHA256_META) == digests.sha256)


def stage_from_cache(store: ObjectStore, hub_cache: Path, repo_id: str, revision: str, out: Output,
                     part_size: int = DEFAULT_PART_SIZE) -> StageResult:
    cache = RepoCache(hub_cache, repo_id)
    remote = RemoteRepo(store, repo_id)
    commit = local_commit(cache, revision)
    manifest, digests, paths = scan_local(cache, commit, part_size, out)
    result = StageResult(commit, len(manifest.files), len(digests))

    # 1. blobs, each once, skipping what the bucket already holds intact
    todo = [n for n in sorted(digests) if not blob_is_intact(store, remote.blob_key(n), digests[n])]
    progress = Progress(out, sum(digests[n].size for n in todo), label="stage")
    for name in todo:
        store.upload_file(paths[name], remote.blob_key(name), metadata={SHA256_META: digests[name].sha256},
                          callback=progress)
        result.uploaded_blobs += 1
        result.uploaded_bytes += digests[name].size
    progress.close()

    # 2. sidecar and manifest, then 3. the ref last, so a reader never sees a ref to half a model
    # The whole digests bind the part digests to the blob's identity (scan_local checked the name).
    sidecar = Sidecar(part_size, {name: d.parts for name, d in digests.items()},
                      {name: {"sha256": d.sha256, "git_sha1": d.git_sha1} for name, d in digests.items()},
                      {name: d.blake3_parts for name, d in digests.items() if d.blake3_parts})
    sizes = {name: d.size for name, d in digests.items()}
    small = [(remote.parts_key(commit), sidecar.to_json(sizes)),
             (remote.tree_key(commit), manifest.to_json())]
    refs = [revision] if not is_commit(revision) else []
    small += [(remote.ref_key(ref), commit.encode()) for ref in refs]
    result.uploaded_metadata = sum(put_if_changed(store, key, data) for key, data in small)
    out.event("stage.done",
              f"staged {repo_id}@{commit[:12]}: {result.files} files, {result.blobs} blobs, "
              f"uploaded {result.uploaded_blobs} blobs ({human_bytes(result.uploaded_bytes)}) "
              f"and {result.uploaded_metadata} metadata objects",
              repo_id=repo_id, commit=commit, uploaded_blobs=result.uploaded_blobs,
              uploaded_bytes=result.uploaded_bytes, uploaded_metadata=result.uploaded_metadata)
    return result


def download_from_hub(repo_id: str, revision: str, hub_cache: Path, token: str | None) -> None:
    """Fetch the snapshot into the local cache with huggingface_hub (HF_ENDPOINT is honoured)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, cache_dir=str(hub_cache), token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFoundError(f"{repo_id}@{revision} not found on the Hub: {type(exc).__name__}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise NotFoundError(f"{repo_id}@{revision}: Hub download failed: {type(exc).__name__}") from None
