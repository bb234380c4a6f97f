"""`pull` against the real SeaweedFS: the cache it writes is one huggingface_hub and safetensors read
offline; legacy buckets (a real `s5cmd cp` of a cache) download each blob once; interrupted pulls
resume; corrupt objects, malformed manifests, an unreachable endpoint and a full disk fail with the
right exit code and never leave a bad blob under its final name; stale pre-seeds end valid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import agent.clean
import agent.verify
from agent.cache import BLOB_RE, PART_SUFFIX, STATE_SUFFIX, RepoCache
from agent.demo.model import generate_model
from agent.demo.seaweed import SeaweedServer
from agent.errors import (
    DiskFullError,
    ManifestError,
    NotAvailableError,
    StorageUnavailableError,
    VerificationError,
)
from agent.fetch import repair_parts, windowed
from agent.manifest import DEFAULT_PART_SIZE, Manifest, parse_manifest
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.remote import RemoteRepo
from agent.settings import MODELS_PREFIX, Settings
from agent.store import Store
from agent.verify import audit_cache
from tests.support.cli import clean_env, kill_group, live_group_members, run_agent, start_agent
from tests.support.fake_hub import FakeHub, read_tree
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import build_hf_cache
from tests.support.staged import (
    assert_no_bad_final_blob,
    bucket_manifest,
    native_available,
    quiet,
    s5cmd_upload,
    stage,
)

BIG_PART = 1 << 20
BIG_REPO = "simswarm-test/resume-llama"


# `auto` picks the native engine when its extension loads; without it `auto` would only repeat `python`.
ENGINES = ["python", *(["auto"] if native_available() else [])]


def pull(settings: Settings, repo_id: str, **options: Any) -> PullResult:
    opts = PullOptions(repo_id, engine=options.pop("engine", "python"),
                       concurrency=options.pop("concurrency", 2), **options)
    return pull_from_store(settings, opts, quiet())


OFFLINE_RESOLVE = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], local_files_only=True, cache_dir=sys.argv[2]))
"""


def resolve_offline(repo_id: str, hub_cache: Path, tmp_path: Path) -> Path:
    """What vLLM does with HF_HUB_OFFLINE=1, in a fresh process so no constant is already cached."""
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "unrelated-hf-home"))
    done = subprocess.run([sys.executable, "-c", OFFLINE_RESOLVE, repo_id, str(hub_cache)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def assert_valid_cache(settings: Settings, repo_id: str, manifest: Manifest, tmp_path: Path) -> Path:
    from huggingface_hub import scan_cache_dir

    cache = RepoCache(settings.hub_cache, repo_id)
    commit = cache.read_ref("main")
    assert commit is not None
    assert cache.ref_path("main").read_bytes() == commit.encode()
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
    report = scan_cache_dir(settings.hub_cache)
    assert report.warnings == []
    snapshot = resolve_offline(repo_id, settings.hub_cache, tmp_path)
    assert snapshot == cache.snapshot_dir(commit)
    return snapshot


@pytest.fixture
def staged(settings: Settings, hf_cache: Path, model_repo: tuple[str, str]) -> Manifest:
    """Overrides conftest's `staged`: these tests want the staged manifest, and parts of 64 KiB."""
    stage(settings, hf_cache, model_repo[0])
    return bucket_manifest(settings, model_repo[0])


# -- the result is a cache huggingface_hub and safetensors read ----------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_pull_writes_a_cache_huggingface_hub_resolves_offline_with_identical_tensors(
        engine: str, settings: Settings, staged: Manifest, model_repo: tuple[str, str], tiny_model: Path,
        tmp_path: Path) -> None:
    from safetensors import safe_open

    repo_id, commit = model_repo
    result = pull(settings, repo_id, engine=engine)
    assert (result.source, result.commit) == ("minio", commit)
    assert result.engine == ("python" if engine == "python" else "native")
    assert result.bytes_downloaded == staged.total_size
    assert result.blobs_fetched == len(staged.blobs())
    snapshot = assert_valid_cache(settings, repo_id, staged, tmp_path)
    assert result.snapshot_path == str(snapshot)
    params = (snapshot / "original" / "params.json").read_bytes()
    assert params == (tiny_model / "original/params.json").read_bytes()
    assert os.readlink(snapshot / "original" / "params.json").startswith("../../../blobs/")
    shards = sorted(p.name for p in tiny_model.glob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:
        with safe_open(str(snapshot / shard), framework="numpy") as got, \
                safe_open(str(tiny_model / shard), framework="numpy") as want:
            assert sorted(got.keys()) == sorted(want.keys())
            for name in want.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert (got.get_tensor(name) == want.get_tensor(name)).all()
    # no bookkeeping left beside the blobs
    blobs_dir = RepoCache(settings.hub_cache, repo_id).blobs
    assert not [p for p in blobs_dir.iterdir() if not BLOB_RE.match(p.name)]


def test_second_pull_is_warm_downloads_nothing_and_rehash_rehashes(
        settings: Settings, staged: Manifest, model_repo: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo_id, _ = model_repo
    pull(settings, repo_id)
    hashed: list[str] = []
    real_check = agent.verify.check_content

    def counting(path: Path, entry: Any, *, full: bool = True) -> str | None:
        hashed.append(path.name)
        return real_check(path, entry, full=full)

    monkeypatch.setattr(agent.clean, "check_content", counting)
    warm = pull(settings, repo_id)
    assert (warm.source, warm.bytes_downloaded, warm.blobs_fetched) == ("cache", 0, 0)
    assert warm.blobs_present == len(staged.blobs())
    assert hashed == []  # verified before and unchanged since: not re-read
    rehashed = pull(settings, repo_id, rehash=True)
    assert (rehashed.source, rehashed.bytes_downloaded) == ("cache", 0)
    assert sorted(hashed) == sorted(staged.blobs())


def test_a_blob_changed_on_disk_after_a_pull_is_found_and_refetched(
        settings: Settings, staged: Manifest, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, _ = model_repo
    pull(settings, repo_id)
    cache = RepoCache(settings.hub_cache, repo_id)
    name = max(staged.blobs(), key=lambda n: staged.blobs()[n].size)
    blob = cache.blob_path(name)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = pull(settings, repo_id)
    assert again.blobs_fetched == 1 and again.bytes_downloaded == staged.blobs()[name].size
    assert_valid_cache(settings, repo_id, staged, tmp_path)


def test_size_mode_pull_is_valid_too(settings: Settings, staged: Manifest, model_repo: tuple[str, str],
                                     tmp_path: Path) -> None:
    result = pull(settings, model_repo[0], verify="size")
    assert result.verified == "size"
    assert_valid_cache(settings, model_repo[0], staged, tmp_path)


# -- legacy buckets: a real `s5cmd cp` of a cache --------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("with_trees", [True, False], ids=["with-trees", "no-trees"])
def test_legacy_bucket_pull_downloads_each_distinct_blob_once(
        with_trees: bool, engine: str, s3_server: SeaweedServer, settings_env: dict[str, str], bucket: str,
        hf_cache: Path, model_repo: tuple[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    s5cmd_upload(s3_server, hf_cache, bucket)
    client = s3_server.client()
    prefix = f"{MODELS_PREFIX}models--simswarm-test--tiny-llama/"
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert any(k.startswith(prefix + "snapshots/") for k in listed)  # s5cmd followed the links
    if not with_trees:
        for key in [k for k in listed if k.startswith(prefix + "trees/")]:
            client.delete_object(Bucket=bucket, Key=key)
    expected = parse_manifest(RepoCache(hf_cache, repo_id).tree_path(commit).read_bytes())

    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        snap = RemoteRepo(Store(settings), repo_id).load("main")
        assert snap.form == "legacy" and snap.manifest.files == expected.files
        proxy.clear()
        result = pull(settings, repo_id, engine=engine)
        data_gets = [r.path for r in proxy.requests("GET") if "/blobs/" in r.path or "/snapshots/" in r.path]
    assert sorted(data_gets) == sorted(f"/{bucket}/{prefix}blobs/{n}" for n in expected.blobs())
    assert result.bytes_downloaded == expected.total_size
    assert_valid_cache(settings, repo_id, expected, tmp_path)


# -- interrupted pulls ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory: pytest.TempPathFactory, fake_hub: FakeHub) -> Path:
    """A ~20 MiB model (2 shards) in a cache written by huggingface_hub."""
    source = tmp_path_factory.mktemp("big-model")
    generate_model(source, shards=2, shard_bytes=10 << 20, seed=7)
    fake_hub.add_repo(BIG_REPO, read_tree(source))
    cache_dir = tmp_path_factory.mktemp("big-hf-home") / "hub"
    build_hf_cache(fake_hub, BIG_REPO, cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def big_bucket(s3_server: SeaweedServer, big_cache: Path) -> str:
    bucket = s3_server.create_bucket("t-big-resume")
    stage(Settings.from_env(s3_server.env(bucket)), big_cache, BIG_REPO, part_size=BIG_PART)
    return bucket


@pytest.fixture
def slow_proxy(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    """Every blob GET stalls a moment mid-body: a pull of the big model takes a few seconds."""
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("stall", count=10_000, match="/blobs/", stall_seconds=0.2)
        yield proxy


def progress_on_disk(cache: RepoCache, manifest: Manifest) -> int:
    """Bytes already safe on disk: final blobs plus parts a state file records as done."""
    done = 0
    if not cache.blobs.is_dir():
        return 0
    for path in cache.blobs.iterdir():
        if BLOB_RE.match(path.name):
            done += path.stat().st_size
        elif path.name.endswith(STATE_SUFFIX):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            done += len(state.get("done", [])) * int(state.get("part_size", 0))
    return done


class BigPull(NamedTuple):
    hf_home: Path
    settings: Settings  # for the cache at hf_home, the bucket reached directly
    manifest: Manifest
    cache: RepoCache
    proc: subprocess.Popen[str]


@pytest.fixture
def big_pull(s3_server: SeaweedServer, big_bucket: str, slow_proxy: FaultProxy,
             tmp_path: Path) -> Iterator[BigPull]:
    """`pull` of the big model as a process, one stream through the slow proxy, into an empty cache;
    its whole process group is killed at the end, whatever the test did."""
    hf_home = tmp_path / "hf-home"
    settings = Settings.from_env({**s3_server.env(big_bucket), "HF_HOME": str(hf_home)})
    env = clean_env(**{**s3_server.env(big_bucket), "MINIO_ENDPOINT": slow_proxy.endpoint_url})
    proc = start_agent("pull", BIG_REPO, "--engine", "python", "--concurrency", "1", "--hf-home",
                       str(hf_home), "--no-fallback", env=env)
    try:
        yield BigPull(hf_home, settings, bucket_manifest(settings, BIG_REPO),
                      RepoCache(settings.hub_cache, BIG_REPO), proc)
    finally:
        kill_group(proc)


def wait_for_progress(proc: subprocess.Popen[str], cache: RepoCache, manifest: Manifest,
                      fraction: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while progress_on_disk(cache, manifest) < fraction * manifest.total_size:
        assert proc.poll() is None, f"pull ended early: {proc.returncode}"
        assert time.monotonic() < deadline, "pull made no progress"
        time.sleep(0.02)


def test_pull_killed_with_sigkill_resumes_without_refetching_what_landed(
        s3_server: SeaweedServer, big_bucket: str, big_pull: BigPull, tmp_path: Path) -> None:
    hf_home, settings, manifest, cache, proc = big_pull
    try:
        wait_for_progress(proc, cache, manifest, 0.5)
    finally:
        kill_group(proc)  # the whole pod dies: the agent and its workers
    assert proc.returncode == -signal.SIGKILL
    assert list(cache.blobs.glob("*" + PART_SUFFIX)), "the kill should land mid-transfer"
    assert_no_bad_final_blob(cache, manifest)

    report = tmp_path / "report.json"
    rerun = run_agent("pull", BIG_REPO, "--engine", "python", "--hf-home", str(hf_home), "--no-fallback",
                      "--report", str(report), env=clean_env(**s3_server.env(big_bucket)))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(report.read_text())
    assert 0 < result["bytes_downloaded"] < 0.6 * manifest.total_size
    assert_valid_cache(settings, BIG_REPO, manifest, tmp_path)


def test_sigterm_exits_143_promptly_and_leaves_no_unverified_final_blob(big_pull: BigPull) -> None:
    _, _, manifest, cache, proc = big_pull
    try:
        wait_for_progress(proc, cache, manifest, 0.2)
        os.kill(proc.pid, signal.SIGTERM)  # only the agent, as the kubelet signals PID 1
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - started
        # the workers went with it: nothing of the agent's process group is left writing into the cache
        # (dead, unreaped entries do not count: this container's init does not reap them at once)
        assert live_group_members(proc.pid) == []
    finally:
        kill_group(proc)
    assert proc.returncode == 143
    assert took < 5
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert json.loads(lines[-1])["event"] == "error" and "interrupted" in lines[-1]
    assert_no_bad_final_blob(cache, manifest)
    assert not cache.ref_path("main").exists()  # nothing claims the snapshot is complete


# -- failures: exit codes, and nothing bad under a final name ------------------------------------------


def corrupt_object(s3_server: SeaweedServer, bucket: str, key: str) -> None:
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sidecar", [True, False], ids=["part-digests", "whole-blob-only"])
def test_a_corrupt_object_in_the_bucket_fails_with_exit_4_and_no_bad_blob(
        sidecar: bool, engine: str, settings: Settings, staged: Manifest, model_repo: tuple[str, str],
        s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, commit = model_repo
    remote = RemoteRepo(Store(settings), repo_id)
    name = max(staged.blobs(), key=lambda n: staged.blobs()[n].size)
    corrupt_object(s3_server, bucket, remote.blob_key(name))
    if not sidecar:
        s3_server.client().delete_object(Bucket=bucket, Key=remote.parts_key(commit))
    with pytest.raises(VerificationError) as info:
        pull(settings, repo_id, engine=engine)
    assert info.value.exit_code == 4
    cache = RepoCache(settings.hub_cache, repo_id)
    assert not cache.blob_path(name).exists()
    assert_no_bad_final_blob(cache, staged)
    assert cache.read_ref("main") is None


def test_a_malformed_manifest_fails_with_exit_4(settings: Settings, staged: Manifest,
                                                model_repo: tuple[str, str], s3_server: SeaweedServer,
                                                bucket: str) -> None:
    repo_id, commit = model_repo
    key = RemoteRepo(Store(settings), repo_id).tree_key(commit)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"format_version": 1, "files": {"../x": 1}}')
    with pytest.raises(ManifestError) as info:
        pull(settings, repo_id)
    assert info.value.exit_code == 4
    assert "\n" not in info.value.one_line()


def test_an_unreachable_endpoint_fails_with_exit_3(settings_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": f"127.0.0.1:{port}"})
    started = time.monotonic()
    with pytest.raises(NotAvailableError) as info:
        pull(settings, "org/model")
    assert isinstance(info.value, StorageUnavailableError)
    assert info.value.exit_code == 3
    assert time.monotonic() - started < 30


def test_a_model_not_staged_fails_with_exit_3(settings: Settings) -> None:
    with pytest.raises(NotAvailableError) as info:
        pull(settings, "org/not-staged")
    assert info.value.exit_code == 3


Usage = namedtuple("Usage", "total used free")


def test_not_enough_disk_fails_with_exit_5_before_any_transfer(
        settings: Settings, staged: Manifest, model_repo: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(DiskFullError) as info:
        pull(settings, model_repo[0])
    assert info.value.exit_code == 5
    blobs = RepoCache(settings.hub_cache, model_repo[0]).blobs
    assert not blobs.exists() or list(blobs.iterdir()) == []


# -- stale pre-seeds -----------------------------------------------------------------------------------


def test_stale_preseed_is_cleaned_and_the_pull_ends_valid(settings: Settings, staged: Manifest,
                                                          model_repo: tuple[str, str], hf_cache: Path,
                                                          tmp_path: Path) -> None:
    repo_id, commit = model_repo
    settings = settings.with_hf_home(hf_cache.parent)  # the pre-seeded cache, as a baked image has it
    cache = RepoCache(hf_cache, repo_id)
    blobs = staged.blobs()
    big = max(blobs, key=lambda n: blobs[n].size)
    small = min(blobs, key=lambda n: blobs[n].size)
    # temporary files of every kind
    (cache.blobs / f"{small}.incomplete").write_bytes(b"hf partial")
    (cache.blobs / f"{big}{PART_SUFFIX}").write_bytes(b"\0" * 100)
    (cache.blobs / f"{big}{STATE_SUFFIX}").write_text('{"size": 1, "part_size": 65536, "done": [0]}')
    (cache.blobs / ".config.json.abc.tmp").write_bytes(b"x")
    # a truncated blob
    os.chmod(cache.blob_path(big), 0o644)
    os.truncate(cache.blob_path(big), blobs[big].size // 3)
    # a dangling link, and an old commit of the same model with a ref
    snap = cache.snapshot_dir(commit)
    os.symlink("../../blobs/" + "f" * 64, snap / "dangling.safetensors")
    old = "0" * 40
    shutil.copytree(snap, cache.snapshot_dir(old), symlinks=True)
    cache.write_ref("old-branch", old)
    cache.ref_path("main").write_text(commit + "\n")  # the newline that breaks offline resolution

    result = pull(settings, repo_id)
    assert result.blobs_fetched == 1
    assert result.bytes_downloaded == blobs[big].size  # everything else verified and was kept
    assert_valid_cache(settings, repo_id, staged, tmp_path)
    assert not (snap / "dangling.safetensors").is_symlink()


# -- a second S3 implementation: rclone answers ranged GETs with 200 + Content-Range ----------------------


@pytest.fixture
def rclone_s3(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import secrets
    import socket

    if shutil.which("rclone") is None:
        pytest.skip("rclone is not installed")
    root = tmp_path / "rclone-root"
    root.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key, secret = "rc" + secrets.token_hex(4), secrets.token_hex(16)
    env = clean_env(RCLONE_CONFIG="/dev/null")
    proc = subprocess.Popen(["rclone", "serve", "s3", "--addr", f"127.0.0.1:{port}",
                             "--auth-key", f"{key},{secret}", str(root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "rclone serve s3 did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}|{key}|{secret}", root
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.parametrize("engine", ENGINES)
def test_pull_from_a_server_that_answers_ranges_with_200(
        engine: str, rclone_s3: tuple[str, Path], settings: Settings, staged: Manifest,
        model_repo: tuple[str, str], s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    repo_id, _ = model_repo
    spec, root = rclone_s3
    endpoint, key, secret = spec.split("|")
    # copy the compact staging byte for byte into rclone's bucket folder
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:
        dest = root / "staged" / obj["Key"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    rclone = Settings.from_env({"MINIO_ENDPOINT": endpoint, "MINIO_ACCESS_KEY": key,
                                "MINIO_SECRET_KEY": secret, "MINIO_BUCKET": "staged",
                                "HF_HOME": str(tmp_path / "rclone-home")})
    # the quirk under test: a ranged GET answered 200 with a Content-Range header, not 206
    from agent.demo.seaweed import s3_client

    some_blob = RemoteRepo(Store(rclone), repo_id).blob_key(max(staged.blobs()))
    answer = s3_client(endpoint, key, secret).get_object(Bucket="staged", Key=some_blob, Range="bytes=5-9")
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert answer["ContentRange"].startswith("bytes 5-9/")
    result = pull(rclone, repo_id, engine=engine)
    assert result.bytes_downloaded == staged.total_size
    assert_valid_cache(rclone, repo_id, staged, tmp_path)


@pytest.mark.parametrize("sidecar", [True, False], ids=["part-digests", "whole-blob-only"])
def test_an_object_whose_size_lies_fails_with_exit_4_before_any_transfer(
        sidecar: bool, settings: Settings, staged: Manifest, model_repo: tuple[str, str],
        s3_server: SeaweedServer, bucket: str) -> None:
    repo_id, commit = model_repo
    remote = RemoteRepo(Store(settings), repo_id)
    name = max(staged.blobs(), key=lambda n: staged.blobs()[n].size)
    key = remote.blob_key(name)
    data = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 2])
    if not sidecar:
        s3_server.client().delete_object(Bucket=bucket, Key=remote.parts_key(commit))
    with pytest.raises(VerificationError, match="bytes") as info:
        pull(settings, repo_id)
    assert info.value.exit_code == 4
    assert_no_bad_final_blob(RepoCache(settings.hub_cache, repo_id), staged)


def test_a_preseed_of_plain_copies_is_adopted_without_downloading(
        settings: Settings, staged: Manifest, model_repo: tuple[str, str], hf_cache: Path,
        tmp_path: Path) -> None:
    """A cache copied with links followed (`cp -rL`, or s5cmd down from a legacy bucket): every snapshot
    file a full copy, no blobs. The copies become the blobs; nothing is fetched; no byte is stored twice."""
    repo_id, commit = model_repo
    cache = RepoCache(hf_cache, repo_id)
    for _, path in list(cache.snapshot_entries(commit)):
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    shutil.rmtree(cache.blobs)
    result = pull(settings.with_hf_home(hf_cache.parent), repo_id)
    assert (result.source, result.bytes_downloaded) == ("cache", 0)
    assert_valid_cache(settings.with_hf_home(hf_cache.parent), repo_id, staged, tmp_path)
    assert all(path.is_symlink() for _, path in cache.snapshot_entries(commit))
    assert sorted(p.name for p in cache.blobs.iterdir()) == sorted(staged.blobs())


def test_odd_repositories_round_trip_empty_shared_and_deeply_nested_files(
        settings: Settings, fake_hub: FakeHub, tmp_path: Path) -> None:
    """An empty file, two paths with one blob (fetched once, stored once), a deep path, a dotfile."""
    repo_id = "simswarm-test/odd-files"
    weights = bytes(range(256)) * 1024
    fake_hub.add_repo(repo_id, {
        "empty.txt": b"", "a/b/c/d/deep.json": b'{"deep": true}\n', ".hidden": b"dot\n",
        "model.safetensors": weights, "copy/model.safetensors": weights, "same1.txt": b"same\n",
        "same2.txt": b"same\n",
    })
    cache_dir = tmp_path / "odd-seed" / "hub"
    build_hf_cache(fake_hub, repo_id, cache_dir)
    stage(settings, cache_dir, repo_id)
    manifest = bucket_manifest(settings, repo_id)
    assert len(manifest.files) == 7 and len(manifest.blobs()) == 5
    result = pull(settings, repo_id)
    assert result.blobs_fetched == 5
    assert result.bytes_downloaded == manifest.total_size == len(weights) + 15 + 4 + 5
    snapshot = assert_valid_cache(settings, repo_id, manifest, tmp_path)
    assert (snapshot / "empty.txt").read_bytes() == b""
    assert os.readlink(snapshot / "a/b/c/d/deep.json").startswith("../../../../../../blobs/")
    assert (snapshot / "copy/model.safetensors").read_bytes() == weights
    assert len(list(RepoCache(settings.hub_cache, repo_id).blobs.iterdir())) == 5


@pytest.mark.parametrize("sidecar", [True, False], ids=["part-digests", "whole-blob-only"])
def test_bytes_flipped_in_transit_once_are_refetched_and_the_pull_succeeds(
        sidecar: bool, settings_env: dict[str, str], settings: Settings, staged: Manifest,
        model_repo: tuple[str, str], s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    repo_id, commit = model_repo
    if not sidecar:
        key = RemoteRepo(Store(settings), repo_id).parts_key(commit)
        s3_server.client().delete_object(Bucket=bucket, Key=key)
    name = max(staged.blobs(), key=lambda n: staged.blobs()[n].size)
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("flip", count=1, match=f"/blobs/{name}")
        via_proxy = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        result = pull(via_proxy, repo_id)
        assert proxy.count(fault="flip") == 1
    # only the damaged part (or, without part digests, the damaged blob, with the windows of one round of
    # repair reads) was fetched twice
    extra = result.bytes_downloaded - staged.total_size
    size = staged.blobs()[name].size
    reads = [windowed(p, size, 1) for p in repair_parts(size, DEFAULT_PART_SIZE)]
    windows = sum(w.lead + w.trail for w in reads)
    assert extra == (0 if sidecar else size + windows)
    assert result.retries == (1 if sidecar else 0)
    assert_valid_cache(via_proxy, repo_id, staged, tmp_path)
