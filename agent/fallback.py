"""The Hugging Face Hub path: used only when the bucket cannot deliver the model (README, "Serving: the
pod's entrypoint", **Fallback**).

The story: try the bucket; if it cannot deliver (storage off, unreachable, model not staged, a
manifest or object that stays bad after the repair round), serve a complete copy that an earlier pod
left in the cache if there is one; else, if the fallback is allowed, let huggingface_hub download into
the same cache. Blobs the bucket already delivered and verified stay:
huggingface_hub only fetches blobs it does not find. With `--write-back` what came from the Hub is
staged into the bucket, so the next pod finds it there.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.cache import BLOB_RE, RepoCache, is_commit
from agent.engines.base import Engine
from agent.errors import (
    AgentError,
    ConfigError,
    DiskFullError,
    ManifestError,
    NotAvailableError,
    ReadOnlyCacheError,
    UnsafePathError,
    VerificationError,
    as_agent_error,
)
from agent.lock import cache_lock, reading_lock
from agent.manifest import DEFAULT_PART_SIZE, Manifest, parse_manifest
from agent.output import Output, human_bytes
from agent.pull import Handoff, PullOptions, PullResult, pull_from_store
from agent.ready import cache_writable
from agent.s3read import ObjectReader
from agent.selection import Choice, Selection, choose
from agent.settings import Settings
from agent.stage import scan_local, stage_from_cache
from agent.subset import drop_narrowed_trees, recorded_selection, write_record
from agent.verify import audit_cache

# What "the bucket cannot deliver" means. Credentials, a missing bucket or a full disk are not in it:
# those are the operator's to fix, and the Hub would not help with a full disk.
BUCKET_CANNOT_DELIVER = (NotAvailableError, VerificationError, UnsafePathError)


@dataclass
class FallbackResult(PullResult):
    """A pull's result plus why the Hub was used (empty when the bucket delivered)."""

    fallback_reason: str = ""


def try_bucket(settings: Settings, opts: PullOptions, out: Output, *, reader: ObjectReader | None = None,
               engine: Engine | None = None, handoff: Handoff | None = None) -> PullResult | AgentError:
    """The bucket's result, or why it cannot deliver (the errors that allow a fallback, and a read-only
    cache, which may still hold a complete copy of another commit). Whatever else goes wrong on the
    bucket path becomes the agent's error here: a pod out of open files, or a bug nobody foresaw, may
    still be served from the Hub; a full disk or a refused path stops the pull (a person must act)."""
    if not settings.storage_enabled:
        return ConfigError("object storage is off: MINIO_ENDPOINT is not set", hint="set MINIO_ENDPOINT")
    try:
        return pull_from_store(settings, opts, out, reader=reader, engine=engine, handoff=handoff)
    except (*BUCKET_CANNOT_DELIVER, ReadOnlyCacheError) as exc:
        return exc
    except AgentError:
        raise
    except Exception as exc:
        error = as_agent_error(exc)
        if not isinstance(error, BUCKET_CANNOT_DELIVER):
            raise error from exc
        error.__cause__ = exc  # --debug prints the original traceback
        return error


def fallback_refusal(allow_fallback: bool, settings: Settings) -> str | None:
    """Why the Hub may not be used, or None when it may. HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) in the
    agent's own environment forbids it: huggingface_hub would not go online anyway."""
    if not allow_fallback:
        return "the Hub fallback is off (--no-fallback)"
    if settings.hub_offline:
        return f"the Hub fallback is off ({settings.hub_offline} is set in the agent's environment)"
    return None


def explained(cause: AgentError, refusal: str) -> AgentError:
    """The bucket's error, same type and exit code, with why the Hub was not tried added to its line."""
    try:
        return type(cause)(f"{cause}; {refusal}", hint=cause.hint)
    except TypeError:  # an error type with its own constructor: keep it as it is
        return cause


def pull_with_fallback(settings: Settings, opts: PullOptions, out: Output, *, allow_fallback: bool,
                       write_back: bool, reader: ObjectReader | None = None,
                       engine: Engine | None = None, handoff: Handoff | None = None) -> PullResult:
    """Fill the cache from the bucket, else from the Hub; the result says which and why.

    Without the fallback the bucket's own error is raised (exit 3 not available, 4 verification; with
    storage off, 3: the model is not in the cache). A Hub failure is exit 3 naming both causes.
    `reader` and `engine` go to the bucket's pull (tests); None: as configured. `handoff` goes to the
    bucket's pull (serve's overlapped start); the Hub's download does not tell it anything.
    """
    # 1. the bucket first, always
    outcome = try_bucket(settings, opts, out, reader=reader, engine=engine, handoff=handoff)
    if isinstance(outcome, PullResult):
        return outcome
    cause = outcome
    local = complete_local_snapshot(settings, opts, out, cause)  # 2. a complete copy already here?
    if local is not None:
        return local
    if isinstance(cause, ReadOnlyCacheError):
        raise cause  # the Hub could not write there either
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    refusal = fallback_refusal(allow_fallback, settings)  # 3. may we use the Hub?
    if refusal is not None:
        if not settings.storage_enabled:  # a valid setup (a pre-filled volume) whose cache lacks the model
            raise NotAvailableError(
                f"{opts.repo_id}: {cause}, the cache holds no complete copy, and {refusal}",
                hint="set MINIO_ENDPOINT, fill the cache, or allow the Hugging Face fallback")
        raise explained(cause, refusal)
    if not cache_writable(cache):
        raise ReadOnlyCacheError(f"{opts.repo_id}: {one_line(str(cause))}; the cache {settings.hub_cache} is "
                                 "read-only and holds no complete copy, so the Hub fallback cannot fill it")
    reason = f"bucket could not deliver: {one_line(str(cause))}"
    out.event("pull.fallback", f"{opts.repo_id}@{opts.revision}: {reason}; downloading from the Hub",
              reason=reason, error=type(cause).__name__)
    # A write-back stages what is in the cache: it must be the whole snapshot, never a selection of it.
    hub_opts = replace(opts, selection=Selection()) if write_back else opts
    result = pull_from_hub(settings, hub_opts, out, reason=reason, cause=cause)  # 4. the Hub
    if write_back:  # 5. opt-in: stage it so the next pod finds it in the bucket
        write_back_to_bucket(settings, opts, result, out)
    return result


def complete_local_snapshot(settings: Settings, opts: PullOptions, out: Output,
                            cause: AgentError) -> FallbackResult | None:
    """The revision as an earlier pod left it, when it is complete and verifies; else None.

    A pod restarting on a kept volume while the bucket is down (or the model was removed from it) can
    serve what it already has, without the Hub. Complete means what `verify` checks: the ref, every
    link, every blob's bytes against the local trees/<commit>.json, and nothing stray.
    """
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    commit = opts.revision if is_commit(opts.revision) else cache.read_ref(opts.revision)
    if commit is None or not cache.tree_path(commit).is_file():
        return None
    narrowed_to = recorded_selection(cache, commit)
    if narrowed_to is not None and narrowed_to != opts.selection.describe():
        return None  # complete for another selection: not a copy of what was asked for
    started = time.monotonic()
    with reading_lock(cache, out):
        try:
            manifest = parse_manifest(cache.tree_path(commit).read_bytes())
        except ManifestError:
            return None
        if audit_cache(cache, commit, manifest, opts.revision):
            return None
    reason = f"bucket could not deliver: {one_line(str(cause))}; the local cache holds a complete copy"
    result = FallbackResult("cache", "none", opts.repo_id, opts.revision, commit=commit, verified="full",
                            snapshot_path=str(cache.snapshot_dir(commit)), files=len(manifest.files),
                            blobs_present=len(manifest.blobs()), fallback_reason=reason)
    result.notes.append(reason)
    result.seconds = round(time.monotonic() - started, 3)
    out.event("pull.local", f"{opts.repo_id}@{commit[:12]}: {reason}", reason=reason)
    return result


def pull_from_hub(settings: Settings, opts: PullOptions, out: Output, *, reason: str,
                  cause: AgentError) -> FallbackResult:
    started = time.monotonic()
    cache = RepoCache(settings.hub_cache, opts.repo_id)
    result = FallbackResult("hub", "huggingface_hub", opts.repo_id, opts.revision, verified=opts.verify,
                            fallback_reason=reason)
    with cache_lock(cache, out):
        drop_narrowed_trees(cache)
        before = blob_sizes(cache)
        snapshot, choice = download_snapshot(settings, opts, cause, progress_bars=out.interactive)
        after = blob_sizes(cache)
        result.commit = snapshot.name
        result.snapshot_path = str(snapshot)
        if choice is not None:
            narrow_hub_snapshot(cache, result, opts.selection, choice)
        fetched = set(after) - set(before)
        result.blobs_fetched = len(fetched)
        result.bytes_downloaded = sum(after[name] for name in fetched)
        if opts.full:  # the same check the bucket path makes: bytes against their blob names
            quiet = Output(json_mode=False, quiet=True)
            manifest, _, _ = scan_local(cache, result.commit, DEFAULT_PART_SIZE, quiet)
            result.files = len(manifest.files)
            result.blobs_present = len(set(manifest.blobs()) - fetched)
        else:
            result.files = sum(1 for _ in cache.snapshot_entries(result.commit))
            result.blobs_present = len(set(before) & set(after))
    result.notes.append(reason)
    result.seconds = round(time.monotonic() - started, 3)
    out.event("pull.hub", f"{opts.repo_id}@{result.commit[:12]} from the Hub: {result.blobs_fetched} blobs "
              f"({human_bytes(result.bytes_downloaded)}) downloaded, {result.blobs_present} kept",
              blobs_fetched=result.blobs_fetched, blobs_present=result.blobs_present)
    return result


def blob_sizes(cache: RepoCache) -> dict[str, int]:
    """Complete blobs on disk (name -> size); huggingface_hub's `.incomplete` files are not blobs yet."""
    if not cache.blobs.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in cache.blobs.iterdir()
            if p.is_file() and BLOB_RE.match(p.name)}


def literal_pattern(path: str) -> str:
    """An fnmatch pattern matching exactly `path` (huggingface_hub's allow_patterns are globs)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in path)


def hub_choice(settings: Settings, opts: PullOptions) -> Choice | None:
    """The file selection over the Hub's listing (None: everything). The rules may read the safetensors
    index: it is downloaded into the cache first, as vLLM itself does."""
    if opts.selection.everything:
        return None
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token)
    files = api.list_repo_files(opts.repo_id, revision=opts.revision)

    def read(path: str) -> bytes:
        local = hf_hub_download(opts.repo_id, path, revision=opts.revision, cache_dir=str(settings.hub_cache),
                                token=settings.hf_token, endpoint=settings.hf_endpoint)
        return Path(local).read_bytes()
    return choose(files, opts.selection, read)


def narrow_hub_snapshot(cache: RepoCache, result: PullResult, selection: Selection, choice: Choice) -> None:
    """Make huggingface_hub's snapshot hold exactly the selected files: it wrote the whole repo's tree
    listing to trees/<commit>.json, which offline readers would then find incomplete."""
    tree = cache.tree_path(result.commit)
    full = parse_manifest(tree.read_bytes()) if tree.is_file() else Manifest({})
    if full.files:
        subset = Manifest({p: e for p, e in full.files.items() if p in choice.keep})
        cache.write_tree(result.commit, subset.to_json())
    for relpath, path in list(cache.snapshot_entries(result.commit)):
        if relpath not in choice.keep:  # an index read for the rules but excluded by the user
            path.unlink()
    write_record(cache, result.commit, selection, choice, full)
    kept = {e.blob_name for p, e in full.files.items() if p in choice.keep}
    result.files_skipped, result.skipped = len(choice.skipped), sorted(choice.skipped)
    result.bytes_skipped = sum(e.size for n, e in full.blobs().items() if n not in kept)
    result.selection = {**selection.describe(), "resolved_load_format": choice.load_format}
    result.notes += choice.notes


def download_snapshot(settings: Settings, opts: PullOptions, cause: AgentError, *,
                      progress_bars: bool = True) -> tuple[Path, Choice | None]:
    """huggingface_hub's own download (HF_ENDPOINT honoured) of the selected files; any failure names
    both causes in one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils.tqdm import disable_progress_bars

    if not progress_bars:  # tqdm's carriage returns would garble the pod's JSON log lines
        disable_progress_bars()

    try:
        choice = hub_choice(settings, opts)
        allow = sorted(literal_pattern(p) for p in choice.keep) if choice is not None else None
        path: str = snapshot_download(opts.repo_id, revision=opts.revision, cache_dir=str(settings.hub_cache),
                                      token=settings.hf_token, endpoint=settings.hf_endpoint,
                                      allow_patterns=allow)
    except AgentError:
        raise  # Interrupted (SIGTERM/SIGINT) unwinds as it is
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"{opts.repo_id}: disk full while downloading from the Hub") from None
        raise both_failed(opts, cause, exc) from None
    except Exception as exc:  # huggingface_hub raises HTTP, value and runtime errors of many kinds
        raise both_failed(opts, cause, exc) from None
    return Path(path), choice


def both_failed(opts: PullOptions, cause: AgentError, exc: Exception) -> NotAvailableError:
    hub = one_line(f"{type(exc).__name__}: {exc}")
    return NotAvailableError(
        f"{opts.repo_id}@{opts.revision}: bucket: {one_line(str(cause))}; Hub: {hub}",
        hint="stage the model with `simswarm-agent stage`, or check HF_ENDPOINT/HF_TOKEN")


def one_line(text: str, limit: int = 300) -> str:
    """huggingface_hub's messages span lines (request ids, URLs); a pod log wants one short line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def write_back_to_bucket(settings: Settings, opts: PullOptions, result: PullResult, out: Output) -> None:
    """Stage what came from the Hub. A failure here is logged, not fatal: the model is ready to serve."""
    if not settings.storage_enabled:
        out.event("pull.write_back", "write-back skipped: object storage is off (MINIO_ENDPOINT is not set)")
        return
    from agent.store import Store  # boto3, only for the write-back

    try:
        stage_from_cache(Store(settings), settings.hub_cache, opts.repo_id, opts.revision, out)
    except AgentError as exc:
        if exc.exit_code >= 128:  # interrupted: stop here, as everywhere else
            raise
        result.notes.append(f"write-back failed: {exc}")
        out.event("pull.write_back", f"write-back to the bucket failed ({exc}); serving anyway",
                  error=type(exc).__name__)
