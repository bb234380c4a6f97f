"""Network and server faults between the agent and a real S3 server, for every engine that can meet them.

A fault-injecting proxy (`tests.support.fault_server.FaultProxy`) sits in front of SeaweedFS and is the
agent's MINIO_ENDPOINT, so the presigned URLs of the python and native engines and s5cmd's own signed
requests all go through it. For each fault the pull must end in one of two ways: a cache that
huggingface_hub resolves offline and safetensors reads, or the documented error (class, exit code, one
line). Never a blob under its final name with the wrong bytes: every file in blobs/ is hashed after
every run. Credentials (wrong keys, wrong bucket, expired URLs) and a disk that fills up mid-download
are here too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import agent.fetch
import agent.pull
from agent.cache import RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.engines.base import TransferConfig
from agent.errors import AgentError, ConfigError, CredentialsError
from agent.manifest import Manifest
from agent.policy import RetryPolicy
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.s3read import NativeReader, ObjectReader, open_reader
from agent.settings import Deadlines, Settings
from agent.store import Store
from agent.verify import audit_cache
from tests.support.cli import clean_env, run_agent
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache
from tests.support.mounts import tmpfs
from tests.support.staged import ENGINES, NATIVE, assert_no_bad_final_blob, quiet

PRESIGNED_ENGINES = ["python", NATIVE]

# Short timeouts and backoff so every case stays well under 10 s; the logic is the production one.
FAST = TransferConfig(concurrency=2, deadlines=Deadlines(connect=2.0, first_byte=1.0),
                      retry=RetryPolicy(max_retries=3, base=0.05, cap=1.0))


@pytest.fixture
def proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True, stall_seconds=3.0) as p:
        yield p


def via(proxy: FaultProxy, s3_server: SeaweedServer, bucket: str, hf_home: Path, **extra: str) -> Settings:
    return Settings.from_env({**s3_server.env(bucket), "MINIO_ENDPOINT": proxy.endpoint_url,
                              "HF_HOME": str(hf_home), **extra})


def blob_get(name: str) -> Callable[[str, str, str | None], bool]:
    """Matches the GETs of one blob's bytes (not s5cmd's HEAD, which has no body to break)."""
    return lambda method, path, _range: method == "GET" and path.endswith(f"/blobs/{name}")


def pull(settings: Settings, repo_id: str, engine: str, transfer: TransferConfig = FAST) -> PullResult:
    return pull_from_store(settings, PullOptions(repo_id, engine=engine, transfer=transfer), quiet())


def assert_real_client_reads(settings: Settings, repo_id: str, manifest: Manifest, model_dir: Path) -> None:
    """What vLLM does: huggingface_hub resolves the snapshot offline and safetensors reads every tensor."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    cache = RepoCache(settings.hub_cache, repo_id)
    commit = cache.read_ref("main")
    assert commit is not None
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
    assert_clean_cache(settings.hub_cache)
    snapshot = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(settings.hub_cache)))
    assert snapshot == cache.snapshot_dir(commit)
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(snapshot / shard.name), framework="numpy") as got, \
                safe_open(str(shard), framework="numpy") as want:
            for name in want.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert (got.get_tensor(name) == want.get_tensor(name)).all()


def assert_clean_failure(exc: AgentError, codes: set[int], cache: RepoCache, manifest: Manifest) -> None:
    assert exc.exit_code in codes, f"exit {exc.exit_code}: {exc.one_line()}"
    line = exc.one_line()
    assert "\n" not in line and line.startswith("error: ")
    assert "X-Amz-Signature" not in line and "Signature=" not in line and "X-Amz-Credential" not in line
    assert cache.read_ref("main") is None  # nothing claims the snapshot is complete
    assert_no_bad_final_blob(cache, manifest)


# -- one fault, once: every engine recovers ------------------------------------------------------------

TRANSIENT = ["reset", "stall", "truncate", "flip", "slowdown", "error500", "range_as_200", "full_200"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", TRANSIENT)
def test_a_transient_fault_on_a_blob_get_is_survived_with_a_valid_cache(
        fault: str, engine: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tiny_model: Path, tmp_path: Path) -> None:
    if (fault, engine) == ("full_200", "s5cmd"):
        pytest.skip("the proxy drops the Range header to force a 200, and s5cmd signs Range (SigV4 "
                    "SignedHeaders): the server answers 403, a test artifact, not the fault")
    repo_id = model_repo[0]
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    big = max(manifest.blobs(), key=lambda n: manifest.blobs()[n].size)
    proxy.add_fault(fault, count=1, match=blob_get(big))  # type: ignore[arg-type]
    started = time.monotonic()
    result = pull(settings, repo_id, engine)
    took = time.monotonic() - started
    assert proxy.count(fault=fault) == 1, "the fault was never applied"
    assert_no_bad_final_blob(RepoCache(settings.hub_cache, repo_id), manifest)
    assert_real_client_reads(settings, repo_id, manifest, tiny_model)
    assert result.bytes_downloaded >= manifest.total_size
    assert took < 10


# -- a fault on the metadata GETs (listing, ref, manifest, sidecar): boto3's side ----------------------------

Matcher = Callable[[str, str, "str | None"], bool]


def _get_of(part: str) -> Callable[[str], Matcher]:
    def for_bucket(bucket: str) -> Matcher:
        if part == "listing":
            return lambda method, path, _range: method == "GET" and path.rstrip("/") == f"/{bucket}"
        return lambda method, path, _range: method == "GET" and f"/{part}/" in path
    return for_bucket


METADATA = {"listing": _get_of("listing"), "ref": _get_of("refs"), "manifest": _get_of("trees"),
            "sidecar": _get_of("parts")}


@pytest.mark.parametrize("what", sorted(METADATA))
@pytest.mark.parametrize("fault", ["reset", "slowdown"])  # truncate, flip end as reset; error500 as slowdown
def test_a_transient_fault_on_a_metadata_get_ends_valid_or_in_a_clean_error(
        fault: str, what: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tiny_model: Path, tmp_path: Path) -> None:
    repo_id = model_repo[0]
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    proxy.add_fault(fault, count=1, match=METADATA[what](staged_bucket))  # type: ignore[arg-type]
    try:
        pull(settings, repo_id, "auto")
    except AgentError as exc:
        print(f"\n{fault} on the {what} GET: exit {exc.exit_code}: {exc.one_line()[:160]}")
        assert_clean_failure(exc, {3, 4}, RepoCache(settings.hub_cache, repo_id), manifest)
    else:
        print(f"\n{fault} on the {what} GET: valid cache")
        assert_real_client_reads(settings, repo_id, manifest, tiny_model)
    assert proxy.count(fault=fault) == 1


@pytest.mark.parametrize("fault", ["reset", "flip"])
def test_a_one_off_body_fault_on_the_manifest_get_is_retried(
        fault: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], tiny_model: Path, tmp_path: Path) -> None:
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    proxy.add_fault(fault, count=1, match=METADATA["manifest"](staged_bucket))  # type: ignore[arg-type]
    pull(settings, model_repo[0], "auto")
    assert_real_client_reads(settings, model_repo[0], manifest, tiny_model)


READERS = ["native", "boto3"]  # the metadata readers: the extension's signer, or boto3 without it


def reader_for(kind: str, settings: Settings) -> ObjectReader:
    if kind == "boto3":
        return Store(settings)
    reader = open_reader(settings)
    if not isinstance(reader, NativeReader):
        pytest.skip("no native extension: the boto3 reader is the only one here")
    return reader


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("what", sorted(METADATA))
def test_a_metadata_answer_cut_short_once_is_read_again(
        what: str, reader: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """Well framed (Content-Length says the half) but half the body: only what the bytes say can tell,
    and a listing has no checksum. A one-off bad answer is transient: read it again, as a broken body."""
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    proxy.add_fault("halve", count=1, match=METADATA[what](staged_bucket))  # type: ignore[arg-type]
    opts = PullOptions(model_repo[0], engine="auto", transfer=FAST)
    pull_from_store(settings, opts, quiet(), reader=reader_for(reader, settings))
    assert proxy.count(fault="halve") == 1, "the fault was never applied"
    assert_real_client_reads(settings, model_repo[0], manifest, tiny_model)


def test_a_listing_cut_short_on_every_read_ends_in_its_own_error(
        proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """Retries that never get a whole listing end as before: exit 3, not a ListObjectsV2 response."""
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    proxy.add_fault("halve", count=10_000, match=METADATA["listing"](staged_bucket))  # type: ignore[arg-type]
    with pytest.raises(AgentError) as info:
        pull(settings, model_repo[0], "auto")
    assert_clean_failure(info.value, {3}, RepoCache(settings.hub_cache, model_repo[0]), manifest)
    assert "not a ListObjectsV2 response" in info.value.one_line()
    assert proxy.count(fault="halve") == 2  # the same bytes read again are the answer: no more retries


# -- the same fault on every request: a clean, documented failure ----------------------------------------

PERSISTENT = {  # fault -> the exit codes that may end it (truncate behaves as reset: a short body)
    "reset": {3},
    "flip": {3, 4},
    "error500": {3},
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", sorted(PERSISTENT))
def test_a_fault_that_never_clears_fails_cleanly_with_no_bad_blob(
        fault: str, engine: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id = model_repo[0]
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    big = max(manifest.blobs(), key=lambda n: manifest.blobs()[n].size)
    proxy.add_fault(fault, count=10_000, match=blob_get(big))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(AgentError) as info:
        pull(settings, repo_id, engine)
    assert time.monotonic() - started < 15
    print(f"\n{fault} forever ({engine}): exit {info.value.exit_code}: {info.value.one_line()[:200]}")
    assert_clean_failure(info.value, PERSISTENT[fault], RepoCache(settings.hub_cache, repo_id), manifest)


# -- credentials and configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["access-key", "secret-key", "bucket"])
def test_wrong_credentials_or_bucket_fail_with_exit_2(
        what: str, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    wrong = {"access-key": {"MINIO_ACCESS_KEY": "AKIAWRONGWRONG"},
             "secret-key": {"MINIO_SECRET_KEY": "not-the-secret-" + "x" * 20},
             "bucket": {"MINIO_BUCKET": "no-such-bucket-here"}}[what]
    settings = Settings.from_env({**s3_server.env(staged_bucket), "HF_HOME": str(tmp_path / "h"), **wrong})
    with pytest.raises(ConfigError) as info:  # the listing fails first, whatever the engine
        pull(settings, model_repo[0], "auto")
    assert_clean_failure(info.value, {2}, RepoCache(settings.hub_cache, model_repo[0]), manifest)
    print(f"\nwrong {what}: exit {info.value.exit_code}: {info.value.one_line()[:200]}")
    if what != "bucket":
        assert isinstance(info.value, CredentialsError)
    assert "not-the-secret" not in info.value.one_line()


@pytest.mark.parametrize("engine", PRESIGNED_ENGINES)  # s5cmd signs its own requests, they never expire
def test_presigned_urls_that_expire_mid_pull_fail_cleanly(
        engine: str, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str, manifest: Manifest,
        model_repo: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(agent.fetch, "URL_EXPIRY", 1)
    settings = via(proxy, s3_server, staged_bucket, tmp_path / "hf-home")
    proxy.add_fault("stall_head", count=1, match="/blobs/", stall_seconds=2.0)
    patient = TransferConfig(2, Deadlines(first_byte=5.0), RetryPolicy(max_retries=2, base=0.05, cap=0.5))
    with pytest.raises(AgentError) as info:
        pull(settings, model_repo[0], engine, patient)
    print(f"\nexpired URLs ({engine}): exit {info.value.exit_code}: {info.value.one_line()[:200]}")
    # 403 from the server: the URLs' signatures are no longer valid
    assert any(r.status == 403 for r in proxy.requests("GET")) or info.value.exit_code == 2
    assert_clean_failure(info.value, {2, 3}, RepoCache(settings.hub_cache, model_repo[0]), manifest)


# -- the disk fills up while the pull runs ---------------------------------------------------------------

LAUNCHER = """
import sys
import agent.plan
agent.plan.DISK_MARGIN = 0  # the check before the transfer passes on a small disk; the filler comes later
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small-disk", "1536k") as mountpoint:
        yield mountpoint


def fill_when(ready: Callable[[list[str]], bool], blobs: Path, filler: Path, stop: threading.Event) -> None:
    """Once `ready(names in blobs/)`, eat every free byte of the filesystem."""
    while not stop.is_set():
        if blobs.is_dir() and ready(os.listdir(blobs)):
            break
        time.sleep(0.005)
    try:
        with open(filler, "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass


def first_part_landed(names: list[str]) -> bool:
    """The python and native engines: a state file records a landed part (every blob is preallocated)."""
    return any(n.endswith(".simswarm.json") for n in names)


def s5cmd_writing(blob: str) -> Callable[[list[str]], bool]:
    """s5cmd: its own temporary file for `blob` exists (it writes the bytes there, not preallocated)."""
    prefix = f"{blob}.simswarm.part"
    return lambda names: any(n.startswith(prefix) and n[len(prefix):].isdigit() for n in names)


# Which write meets the full disk first is a race for s5cmd: its own (exit 3, the bug pinned down by
# test_s5cmd_reporting_a_full_disk_is_exit_5) or the agent's bookkeeping (exit 5).
DISK_EXITS = {"python": {5}, "native": {5}, "s5cmd": {3, 5}}


def test_s5cmd_reporting_a_full_disk_is_exit_5() -> None:
    from agent.engines.s5cmd import classify

    line = ('ERROR "cp s3://b/k /cache/blobs/abc.simswarm.part123": write /cache/blobs/abc.simswarm.part123: '
            "no space left on device")
    assert classify([line], 1, 1, 1, []).exit_code == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_disk_filling_up_during_the_download_exits_5_and_a_rerun_with_space_completes(
        engine: str, small_disk: Path, proxy: FaultProxy, s3_server: SeaweedServer, staged_bucket: str,
        manifest: Manifest, model_repo: tuple[str, str], tiny_model: Path) -> None:
    import json

    repo_id = model_repo[0]
    proxy.add_fault("stall", count=10_000, match="/blobs/", stall_seconds=0.3)  # time for the filler
    env = clean_env(**{**s3_server.env(staged_bucket), "MINIO_ENDPOINT": proxy.endpoint_url})
    cache = RepoCache(small_disk / "hub", repo_id)
    filler = small_disk / "filler"
    stop = threading.Event()
    big = max(manifest.blobs(), key=lambda n: manifest.blobs()[n].size)
    ready = s5cmd_writing(big) if engine == "s5cmd" else first_part_landed
    thread = threading.Thread(target=fill_when, args=(ready, cache.blobs, filler, stop), daemon=True)
    thread.start()
    argv = ["--log-format", "json", "pull", repo_id, "--engine", engine, "--concurrency", "1", "--hf-home",
            str(small_disk), "--no-fallback"]
    try:
        done = run_agent(*argv, env=env, launcher=LAUNCHER, timeout=60)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert filler.exists(), "the filler never ran: the transfer did not start"
    last_line = done.stderr.strip().splitlines()[-1][:300]
    print(f"\ndisk full mid-pull ({engine}): exit {done.returncode}: {last_line}")
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode in DISK_EXITS[engine], done.stderr[-2000:]
    assert lines[-1]["event"] == "error" and "\n" not in lines[-1]["message"]
    assert "Traceback" not in done.stderr
    assert cache.read_ref("main") is None
    assert_no_bad_final_blob(cache, manifest)

    filler.unlink()
    proxy.clear()
    again = run_agent(*argv, env=env, launcher=LAUNCHER, timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]
    settings = Settings.from_env({"HF_HOME": str(small_disk)})
    assert_real_client_reads(settings, repo_id, manifest, tiny_model)
