"""One pass over the bytes: verification inside the stream, byte-level checkpoints, repair by reads.

- A sidecar binds its part digests to the blob's identity (`stage` records the whole digests it checked):
  a bound blob is proven by its parts alone; an unbound one is hashed whole as well, so a sidecar whose
  part digests describe corrupt bytes cannot make them pass; a lying part digest never gives a blob its
  final name.
- A pull killed mid-part (SIGKILL) keeps the bytes it wrote: the rerun fetches only the rest, counted
  at a proxy, in a compact bucket (part digests) and a legacy one (whole hash only).
- In a legacy bucket a blob that fails its hash is read again part by part until reads agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import pytest

from agent.cache import BLOB_RE, STATE_SUFFIX, RepoCache
from agent.demo.seaweed import SeaweedServer
from agent.demo.seed import fake_commit, seed_cache
from agent.errors import VerificationError
from agent.manifest import DEFAULT_PART_SIZE, Manifest
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.remote import RemoteRepo
from agent.settings import MODELS_PREFIX, Settings
from agent.stage import stage_from_cache
from agent.store import Store
from agent.verify import audit_cache
from tests.support.cli import clean_env, start_agent
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache, resolve_offline
from tests.support.staged import copy_legacy, quiet

REPO = "simswarm-test/one-pass"
PREFIX = f"{MODELS_PREFIX}models--simswarm-test--one-pass/"
MIB = 1 << 20
WEIGHTS_SIZE = 6 * MIB + 12345
RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def native_or_skip() -> None:
    from agent.engines.native import NativeEngine

    if not NativeEngine.available():
        pytest.skip("the native extension is not built")


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A hub cache holding one model: a config and one weight file of 6 MiB of noise."""
    model = tmp_path_factory.mktemp("one-pass-model")
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(os.urandom(WEIGHTS_SIZE))
    hub = tmp_path_factory.mktemp("one-pass-hub")
    commit = fake_commit("one-pass")
    seed_cache(model, hub, REPO, commit)
    return hub, commit


def stage(store: Store, hub: Path, part_size: int = MIB) -> Manifest:
    stage_from_cache(store, hub, REPO, "main", quiet(), part_size=part_size)
    return RemoteRepo(store, REPO).load().manifest


def stage_legacy(store: Store, hub: Path, commit: str) -> Manifest:
    """The model in legacy form (`copy_legacy`: what `s5cmd cp` of a cache made before 1.0 leaves)."""
    copy_legacy(store, hub, REPO, commit)
    snap = RemoteRepo(store, REPO).load()
    assert snap.form == "legacy" and snap.sidecar is None
    return snap.manifest


def pull(settings: Settings, **options: object) -> PullResult:
    return pull_from_store(settings, PullOptions(REPO, **options), quiet())  # type: ignore[arg-type]


def weights_name(manifest: Manifest) -> str:
    return manifest.files["model.safetensors"].blob_name


class Staged(NamedTuple):
    store: Store
    hub: Path  # the hub cache it was staged from
    commit: str
    manifest: Manifest
    name: str  # the blob of the weight file


def stage_weights(settings: Settings, local: tuple[Path, str], form: str = "compact",
                  part_size: int = MIB) -> Staged:
    """The model of `local` (hub cache, commit) in the test's bucket, compact (part digests of
    `part_size`) or legacy."""
    hub, commit = local
    store = Store(settings)
    manifest = stage(store, hub, part_size) if form == "compact" else stage_legacy(store, hub, commit)
    return Staged(store, hub, commit, manifest, weights_name(manifest))


def corrupt_weights(staged: Staged) -> bytes:
    """The weight object in the bucket with one bit flipped; returns its new bytes."""
    bad = bytearray(RepoCache(staged.hub, REPO).blob_path(staged.name).read_bytes())
    bad[len(bad) // 3] ^= 0x01
    staged.store.put_bytes(PREFIX + f"blobs/{staged.name}", bytes(bad))
    return bytes(bad)


def assert_valid(settings: Settings, manifest: Manifest) -> None:
    cache = RepoCache(settings.hub_cache, REPO)
    commit = cache.read_ref("main")
    assert commit is not None
    assert [str(p) for p in audit_cache(cache, commit, manifest, "main")] == []
    assert_clean_cache(settings.hub_cache)
    assert resolve_offline(settings.hub_cache, REPO) == cache.snapshot_dir(commit)


def blob_bytes_requested(proxy: FaultProxy) -> int:
    total = 0
    for request in proxy.requests("GET"):
        if "/blobs/" in request.path or "/snapshots/" in request.path:
            match = RANGE.match(request.range or "")
            assert match, f"a blob GET without a byte range: {request}"
            total += int(match.group(2)) - int(match.group(1)) + 1
    return total


def edit_sidecar(store: Store, commit: str, change: object) -> None:
    key = PREFIX + f"parts/{commit}.json"
    doc = json.loads(store.get_bytes(key))
    change(doc)  # type: ignore[operator]
    store.put_bytes(key, json.dumps(doc).encode())


# -- 1. bound part digests ----------------------------------------------------------------------------


def test_stage_binds_each_blobs_part_digests_to_its_identity(settings: Settings,
                                                             local_cache: tuple[Path, str]) -> None:
    hub, _ = local_cache
    manifest = stage(Store(settings), hub)
    sidecar = RemoteRepo(Store(settings), REPO).load().sidecar
    assert sidecar is not None
    for name, entry in manifest.blobs().items():
        assert sidecar.is_bound(name, entry.size), name
        data = RepoCache(hub, REPO).blob_path(name).read_bytes()
        expected = tuple(blake3.blake3(data[o:o + MIB]).hexdigest() for o in range(0, max(1, len(data)), MIB))
        assert sidecar.blake3_for(name, entry.size) == expected, name  # the BLAKE3s of the same parts


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_bound_compact_pull_is_fully_verified_by_its_parts(
        engine: str, settings: Settings, local_cache: tuple[Path, str]) -> None:
    if engine == "native":
        native_or_skip()
    hub, _ = local_cache
    manifest = stage(Store(settings), hub)
    result = pull(settings, engine=engine)
    assert result.verified == "full"
    assert_valid(settings, manifest)
    cache = RepoCache(settings.hub_cache, REPO)
    assert all(cache.verified_unchanged(name) for name in manifest.blobs())  # stamped as fully checked


@pytest.mark.parametrize("unbind", ["no-whole-digests", "other-whole-digest"])
def test_a_sidecar_not_bound_to_the_blob_cannot_vouch_for_corrupt_bytes(
        unbind: str, settings: Settings, local_cache: tuple[Path, str]) -> None:
    """The object and its part digests agree with each other but not with the blob's name: only the
    whole hash can tell, and it runs because the sidecar is not bound."""
    native_or_skip()
    staged = stage_weights(settings, local_cache)
    store, _, commit, _, name = staged
    bad = corrupt_weights(staged)

    def rewrite(doc: dict[str, object]) -> None:
        entry = doc["blobs"][name]  # type: ignore[index]
        entry["parts"] = [hashlib.sha256(bad[o:o + MIB]).hexdigest() for o in range(0, len(bad), MIB)]
        entry["blake3_parts"] = [blake3.blake3(bad[o:o + MIB]).hexdigest() for o in range(0, len(bad), MIB)]
        if unbind == "no-whole-digests":
            entry.pop("sha256")
            entry.pop("git_sha1")
        else:
            entry["sha256"] = hashlib.sha256(bad).hexdigest()

    edit_sidecar(store, commit, rewrite)
    with pytest.raises(VerificationError):
        pull(settings, engine="native")
    assert not RepoCache(settings.hub_cache, REPO).blob_path(name).exists()


@pytest.mark.parametrize(("engine", "lie_in"), [
    ("native", "blake3_parts"),  # what the native engine checks when the sidecar has it
    ("native", "parts-only"),  # a sidecar from before BLAKE3 part digests: sha256 is checked
    ("python", "parts"),
])
def test_a_lying_part_digest_never_gives_the_blob_its_final_name(
        engine: str, lie_in: str, settings: Settings, local_cache: tuple[Path, str]) -> None:
    if engine == "native":
        native_or_skip()
    store, _, commit, _, name = stage_weights(settings, local_cache)

    def lie(doc: dict[str, Any]) -> None:
        if lie_in == "parts-only":
            for entry in doc["blobs"].values():
                entry.pop("blake3_parts")
        doc["blobs"][name][lie_in.removesuffix("-only")][2] = "0" * 64

    edit_sidecar(store, commit, lie)
    with pytest.raises(VerificationError):
        pull(settings, engine=engine)
    cache = RepoCache(settings.hub_cache, REPO)
    assert not cache.blob_path(name).exists()
    assert cache.read_ref("main") is None


def test_rehash_hashes_whole_blobs_even_when_their_parts_prove_them(
        settings: Settings, local_cache: tuple[Path, str]) -> None:
    """A sidecar that says it is bound while its object is corrupt is the one thing parts cannot catch
    (the bucket vouches for both); `--rehash` is for whoever wants both checks."""
    native_or_skip()
    staged = stage_weights(settings, local_cache)
    store, _, commit, _, name = staged
    bad = corrupt_weights(staged)
    edit_sidecar(store, commit, lambda doc: doc["blobs"][name].__setitem__(
        "parts", [hashlib.sha256(bad[o:o + MIB]).hexdigest() for o in range(0, len(bad), MIB)]))
    with pytest.raises(VerificationError):
        pull(settings, engine="native", rehash=True)
    assert not RepoCache(settings.hub_cache, REPO).blob_path(name).exists()


# -- 2. byte-level checkpoints ------------------------------------------------------------------------


def checkpointed(cache: RepoCache, name: str) -> int:
    try:
        state = json.loads((cache.blobs / (name + STATE_SUFFIX)).read_text())
    except (OSError, ValueError):
        return 0
    return sum(end - start for start, end in state.get("have", []))


@pytest.mark.parametrize("form", ["compact", "legacy"])
def test_sigkill_mid_part_keeps_the_written_bytes_and_the_rerun_fetches_only_the_rest(
        form: str, s3_server: SeaweedServer, settings_env: dict[str, str], settings: Settings,
        local_cache: tuple[Path, str], tmp_path: Path) -> None:
    """One stream; the weight file's response stalls after half its bytes. The checkpoint shows them
    on disk within a fraction of a second; SIGKILL; the rerun asks the proxy for the other half only,
    re-checks the kept half (part digest or whole hash) and ends in a valid cache."""
    native_or_skip()
    # compact: one 8 MiB part, so the kill lands inside a part, never on a part boundary
    _, _, _, manifest, name = stage_weights(settings, local_cache, form, part_size=8 * MIB)
    cache = RepoCache(settings.hub_cache, REPO)
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("stall", count=1, match=f"/blobs/{name}", stall_seconds=60)
        env = clean_env(**{**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        proc = start_agent("--log-format", "json", "pull", REPO, "--engine", "native", "--concurrency", "1",
                           "--no-fallback", env=env, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while checkpointed(cache, name) < WEIGHTS_SIZE // 3:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "no checkpoint of the stalled part"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        kept = checkpointed(cache, name)
        assert not any(BLOB_RE.match(p.name) and p.name == name for p in cache.blobs.iterdir())
        proxy.clear()
        proxied = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        result = pull(proxied, engine="native", concurrency=16)  # another stream count: still kept
        refetched = blob_bytes_requested(proxy)
    print(f"\n{form}: kept {kept} of {WEIGHTS_SIZE} B; the rerun fetched {refetched} B "
          f"({refetched / manifest.total_size:.2f} of the model)")
    assert WEIGHTS_SIZE - kept <= refetched <= manifest.total_size - kept
    assert refetched <= 0.55 * manifest.total_size
    assert result.bytes_downloaded == refetched
    assert_valid(settings, manifest)


def test_a_kept_part_that_fails_its_digest_is_fetched_again_and_only_it(
        s3_server: SeaweedServer, settings_env: dict[str, str], settings: Settings,
        local_cache: tuple[Path, str]) -> None:
    """A checkpoint claims bytes whose content was damaged afterwards: the engine re-reads them into
    the part's digest, finds the mismatch, and fetches that part again, and no other."""
    native_or_skip()
    _, hub, _, manifest, name = stage_weights(settings, local_cache)
    data = RepoCache(hub, REPO).blob_path(name).read_bytes()
    cache = RepoCache(settings.hub_cache, REPO)
    cache.ensure_dirs()
    partial = bytearray(data[: 3 * MIB])
    partial[MIB + 7] ^= 0xFF  # in part 1
    cache.part_path(name).write_bytes(bytes(partial) + b"\0" * (len(data) - len(partial)))
    cache.part_state_path(name).write_text(json.dumps({"size": len(data), "have": [[0, 3 * MIB]]}))
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxied = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        pull(proxied, engine="native")
        weight_ranges = sorted(r.range for r in proxy.requests("GET") if name in r.path)
    assert f"bytes={MIB}-{2 * MIB - 1}" in weight_ranges  # the damaged kept part, again
    assert f"bytes=0-{MIB - 1}" not in weight_ranges and f"bytes={2 * MIB}-{3 * MIB - 1}" not in weight_ranges
    assert_valid(settings, manifest)


# -- 3. repair by agreeing reads ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_part_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A model whose weights span three parts of the fixed legacy part size."""
    model = tmp_path_factory.mktemp("three-part-model")
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(os.urandom(2 * DEFAULT_PART_SIZE + 3 * MIB))
    hub = tmp_path_factory.mktemp("three-part-hub")
    commit = fake_commit("three-part")
    seed_cache(model, hub, REPO, commit)
    return hub, commit


def test_a_legacy_blob_whose_reads_are_flipped_one_in_four_is_repaired_by_agreeing_reads(
        s3_server: SeaweedServer, settings_env: dict[str, str], settings: Settings,
        three_part_cache: tuple[Path, str]) -> None:
    """Every fourth GET of the weights has a flipped byte, so the whole hash fails round after round
    until each part's last read agrees with an earlier one; then it passes."""
    native_or_skip()
    _, _, _, manifest, name = stage_weights(settings, three_part_cache, "legacy")
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        reads = 0

        def every_fourth_read(method: str, path: str, _range: str | None) -> bool:
            nonlocal reads
            if method != "GET" or not path.endswith(f"/blobs/{name}"):
                return False
            reads += 1
            return reads % 4 == 1
        proxy.add_fault("flip", count=10_000, match=every_fourth_read)
        proxied = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        result = pull(proxied, engine="native", concurrency=1)
        flipped = proxy.count(fault="flip")
    print(f"\n{reads} reads of the weights' parts, {flipped} flipped; "
          f"{result.bytes_downloaded / manifest.total_size:.2f}x the model downloaded")
    assert flipped >= 2 and reads > 2 * 3  # more than the first pass and one more read of each part
    assert result.bytes_downloaded > manifest.total_size
    assert_valid(settings, manifest)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_part_read_through_a_window_asks_for_it_and_writes_only_the_part(
        engine: str, s3_server: SeaweedServer, settings: Settings, tmp_path: Path) -> None:
    """Each windowed part is a request of its own (adjacent ones too, which the native engine would
    otherwise fetch together) for the window's bytes; only the part's own bytes are written."""
    if engine == "native":
        native_or_skip()
    from agent.engines import pick_engine
    from agent.engines.base import BlobJob, Part, TransferConfig

    store, size, piece = Store(settings), 8 * 8192, 8192
    data = os.urandom(size)
    store.put_bytes("windows/blob", data)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        url = proxy.url_for(store.presign("windows/blob"))
        for every in (1, 2):  # every part; then every other, its windows reaching into the others
            parts = tuple(Part(i, i * piece, piece, lead=0 if i == 0 else 100 + i, trail=0 if i == 7 else 200)
                          for i in range(0, 8, every))
            path = tmp_path / f"blob-{every}"
            path.write_bytes(b"\xaa" * size)
            job = BlobJob("blob", "windows/blob", url, size, path, parts)
            pick_engine(engine).fetch([job], TransferConfig(concurrency=1), lambda _n: None,
                                      lambda _j, _p: None)
            written = path.read_bytes()
            for i in range(8):
                want = data if i % every == 0 else b"\xaa" * size
                assert written[i * piece:(i + 1) * piece] == want[i * piece:(i + 1) * piece], (every, i)
            asked = sorted(r.range or "" for r in proxy.requests("GET"))
            assert asked == sorted(f"bytes={p.offset - p.lead}-{p.offset + p.length + p.trail - 1}"
                                   for p in parts)
            proxy.clear()


@pytest.fixture(scope="module")
def eight_part_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A model of 128 MiB of weights (eight parts of the legacy part size) and a config."""
    model = tmp_path_factory.mktemp("eight-part-model")
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(os.urandom(8 * DEFAULT_PART_SIZE))
    hub = tmp_path_factory.mktemp("eight-part-hub")
    commit = fake_commit("eight-part")
    seed_cache(model, hub, REPO, commit)
    return hub, commit


def blob_gets(method: str, path: str, _range: str | None) -> bool:
    return method == "GET" and ("/blobs/" in path or "/snapshots/" in path)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_legacy_pull_through_a_hop_that_damages_every_fourth_body_the_same_way_is_repaired(
        engine: str, s3_server: SeaweedServer, settings_env: dict[str, str], settings: Settings,
        eight_part_cache: tuple[Path, str]) -> None:
    """A faulty middlebox is deterministic: it flips the byte at one third of every fourth body. Two
    reads of one range through it can agree on the same wrong byte; reads of other shapes cannot, so
    only the bucket's bytes agree, and the bytes moved stay within 3x the model."""
    if engine == "native":
        native_or_skip()
    manifest = stage_weights(settings, eight_part_cache, "legacy").manifest
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("flip_third", count=10_000, match=blob_gets, every=4)
        proxied = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        result = pull(proxied, engine=engine)
        moved = proxy.body_bytes(path_contains="/blobs/")
        flipped = proxy.count(fault="flip_third")
    print(f"\n{engine}: {flipped} bodies flipped; {moved / manifest.total_size:.2f}x the model moved "
          f"({moved >> 20} MiB for {manifest.total_size >> 20} MiB)")
    assert flipped >= 2
    assert_valid(settings, manifest)
    assert result.bytes_downloaded <= moved <= 3 * manifest.total_size


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_legacy_object_corrupt_in_the_bucket_ends_in_exit_4_after_reads_agree(
        engine: str, s3_server: SeaweedServer, settings_env: dict[str, str], settings: Settings,
        local_cache: tuple[Path, str]) -> None:
    """The blob and its snapshot copy hold the same wrong bytes (so the listing still pairs them by
    size and ETag): every read agrees, the hash still fails, and that is the bucket's fault."""
    if engine == "native":
        native_or_skip()
    staged = stage_weights(settings, local_cache, "legacy")
    name = staged.name
    bad = corrupt_weights(staged)
    staged.store.put_bytes(PREFIX + f"snapshots/{staged.commit}/model.safetensors", bad)
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy, \
            pytest.raises(VerificationError) as info:
        pull(Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url}), engine=engine)
    assert info.value.exit_code == 4
    assert f"blob {name[:12]}" in info.value.one_line() and "still fails its check" in info.value.one_line()
    cache = RepoCache(settings.hub_cache, REPO)
    assert not cache.blob_path(name).exists() and not cache.part_path(name).exists()
    moved = proxy.body_bytes(path_contains="/blobs/")
    size = staged.manifest.files["model.safetensors"].size
    assert 2 * size <= moved <= 3 * staged.manifest.total_size  # the first read and one that agrees
