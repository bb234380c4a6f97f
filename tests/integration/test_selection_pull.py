"""`pull --files vllm` against the real SeaweedFS, for the four repo shapes that carry weights vLLM never
reads: only the selected blobs cross the wire (counted at a proxy in front of the server), each once;
the snapshot, trees/<commit>.json and the verified stamps hold exactly the selected files, so
huggingface_hub resolves it offline and scan_cache_dir() is clean; a later wider pull fetches exactly
what was skipped, and a narrower one deletes no blob."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.cli import main
from agent.demo.seaweed import SeaweedServer
from agent.demo.shapes import generate_shape
from agent.manifest import Manifest, parse_manifest
from agent.pull import PullOptions, PullResult, pull_from_store
from agent.remote import RemoteRepo
from agent.selection import Selection
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from tests.support.cli import hub_agent_env, run_agent
from tests.support.fake_hub import FakeHub, read_tree
from tests.support.fault_server import FaultProxy
from tests.support.hf_cache import assert_clean_cache, build_hf_cache, resolve_offline
from tests.support.staged import quiet

# What vLLM 0.32.0 leaves unread in each shape: the spec of the rules, written out by hand.
SKIPPED = {
    "llama3": {"original/consolidated.00.pth", "original/params.json", "original/tokenizer.model"},
    "bin-and-safetensors": {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                            "pytorch_model.bin.index.json"},
    "mistral": {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"},
    "bin-only": {"training_args.bin"},
}


@pytest.fixture(scope="module")
def shapes(fake_hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """Each shape published on the fake Hub and downloaded by huggingface_hub: shape -> (repo, cache)."""
    found = {}
    for shape in SKIPPED:
        source = tmp_path_factory.mktemp(f"shape-{shape}")
        generate_shape(source, shape, shard_bytes=64 * 1024)
        repo_id = f"simswarm-test/shape-{shape}"
        fake_hub.add_repo(repo_id, read_tree(source))
        cache_dir = tmp_path_factory.mktemp(f"shape-hf-{shape}") / "hub"
        build_hf_cache(fake_hub, repo_id, cache_dir)
        found[shape] = (repo_id, cache_dir)
    return found


def staged(settings: Settings, shapes: dict[str, tuple[str, Path]], shape: str) -> tuple[str, Manifest]:
    repo_id, cache_dir = shapes[shape]
    stage_from_cache(Store(settings), cache_dir, repo_id, "main", quiet(), part_size=1 << 16)
    return repo_id, RemoteRepo(Store(settings), repo_id).load("main").manifest


def pull(settings: Settings, repo_id: str, files: str = "vllm", **selection: tuple[str, ...]) -> PullResult:
    opts = PullOptions(repo_id, engine="python", concurrency=2, selection=Selection(files, **selection))
    return pull_from_store(settings, opts, quiet())


def blob_gets(proxy: FaultProxy) -> list[str]:
    """The blobs read through the proxy (a blob may take several ranged GETs; the byte count shows that
    none was read twice)."""
    return sorted({r.path.rsplit("/", 1)[-1] for r in proxy.requests("GET") if "/blobs/" in r.path})


def size_of(manifest: Manifest, paths: set[str]) -> int:
    return sum(e.size for e in Manifest({p: manifest.files[p] for p in paths}).blobs().values())


def assert_snapshot_holds(settings: Settings, repo_id: str, paths: set[str], *, stamps: bool = True) -> None:
    """Links, local trees file and stamps (the bucket path writes them) agree on `paths`; huggingface_hub
    resolves it offline."""
    cache = RepoCache(settings.hub_cache, repo_id)
    commit = cache.read_ref("main")
    assert commit is not None
    assert {rel for rel, _ in cache.snapshot_entries(commit)} == paths
    tree = parse_manifest(cache.tree_path(commit).read_bytes())
    assert set(tree.files) == paths
    if stamps:
        assert {p.name for p in (cache.state / "verified").iterdir()} == set(tree.blobs())
    assert_clean_cache(settings.hub_cache)
    assert resolve_offline(settings.hub_cache, repo_id) == cache.snapshot_dir(commit)


@pytest.mark.parametrize("shape", list(SKIPPED))
def test_vllm_selection_fetches_only_the_selected_bytes_and_resolves_offline(
        shape: str, shapes: dict[str, tuple[str, Path]], s3_server: SeaweedServer,
        settings_env: dict[str, str]) -> None:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        repo_id, manifest = staged(settings, shapes, shape)
        proxy.clear()
        result = pull(settings, repo_id)
        kept = set(manifest.files) - SKIPPED[shape]
        kept_blobs = Manifest({p: manifest.files[p] for p in kept}).blobs()
        assert blob_gets(proxy) == sorted(kept_blobs)  # the safetensors index among them, read once
        assert proxy.body_bytes("GET", "/blobs/") == result.bytes_downloaded == size_of(manifest, kept)
    assert set(result.skipped) == SKIPPED[shape]
    assert result.bytes_skipped == manifest.total_size - size_of(manifest, kept) > 0
    assert result.selection["resolved_load_format"] == ("mistral" if shape == "mistral" else "hf")
    assert_snapshot_holds(settings, repo_id, kept)


def test_a_wider_pull_fetches_exactly_what_was_skipped(
        shapes: dict[str, tuple[str, Path]], s3_server: SeaweedServer, settings_env: dict[str, str]) -> None:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        repo_id, manifest = staged(settings, shapes, "llama3")
        json_files = {p for p in manifest.files if p.endswith(".json")}  # original/params.json among them
        only_json = pull(settings, repo_id, "all", include=("*.json",))
        assert_snapshot_holds(settings, repo_id, json_files)
        proxy.clear()
        vllm = pull(settings, repo_id, "vllm")  # not a superset of *.json: drops original/params.json
        added = set(manifest.files) - SKIPPED["llama3"] - json_files
        assert blob_gets(proxy) == sorted(Manifest({p: manifest.files[p] for p in added}).blobs())
        assert vllm.bytes_downloaded == size_of(manifest, added) == proxy.body_bytes("GET", "/blobs/")
        proxy.clear()
        everything = pull(settings, repo_id, "all")
        rest = SKIPPED["llama3"] - json_files  # original/params.json's blob stayed on disk, unlinked
        assert blob_gets(proxy) == sorted(Manifest({p: manifest.files[p] for p in rest}).blobs())
        assert everything.bytes_downloaded == size_of(manifest, rest) == proxy.body_bytes("GET", "/blobs/")
    total = only_json.bytes_downloaded + vllm.bytes_downloaded + everything.bytes_downloaded
    assert total == manifest.total_size
    assert everything.skipped == [] and everything.files == len(manifest.files)
    assert_snapshot_holds(settings, repo_id, set(manifest.files))


def test_a_narrower_pull_keeps_the_other_blobs_for_the_next_wide_one(
        shapes: dict[str, tuple[str, Path]], s3_server: SeaweedServer, settings_env: dict[str, str]) -> None:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        repo_id, manifest = staged(settings, shapes, "bin-and-safetensors")
        pull(settings, repo_id, "all")
        narrow = pull(settings, repo_id, "vllm")
        kept = set(manifest.files) - SKIPPED["bin-and-safetensors"]
        assert_snapshot_holds(settings, repo_id, kept)
        cache = RepoCache(settings.hub_cache, repo_id)
        assert {p.name for p in cache.blobs.iterdir()} == set(manifest.blobs())  # unlinked, not deleted
        proxy.clear()
        wide = pull(settings, repo_id, "all")
        assert blob_gets(proxy) == []
    assert (narrow.source, narrow.bytes_downloaded) == ("cache", 0)
    assert (wide.source, wide.bytes_downloaded) == ("cache", 0)
    assert_snapshot_holds(settings, repo_id, set(manifest.files))


def test_verify_checks_what_the_snapshot_holds_and_names_what_was_skipped(
        shapes: dict[str, tuple[str, Path]], settings: Settings, settings_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    repo_id, _ = staged(settings, shapes, "llama3")
    pull(settings, repo_id, "vllm")
    for key, value in settings_env.items():
        monkeypatch.setenv(key, value)
    cache = RepoCache(settings.hub_cache, repo_id)
    commit = cache.read_ref("main")
    assert commit is not None
    assert main(["--log-format", "json", "verify", repo_id]) == 0
    assert "skipped on purpose" in capsys.readouterr().err
    cache.tree_path(commit).unlink()  # now the bucket's full manifest is the reference
    assert main(["--log-format", "json", "verify", repo_id]) == 0
    err = capsys.readouterr().err
    assert "original/consolidated.00.pth" in err and '"event": "verify.ok"' in err
    next(cache.snapshot_dir(commit).glob("*.safetensors")).unlink()  # a selected file missing is a problem
    assert main(["--log-format", "json", "verify", repo_id]) == 4
    assert "missing link" in capsys.readouterr().out


def test_an_index_read_for_the_rules_but_excluded_is_not_kept(
        shapes: dict[str, tuple[str, Path]], s3_server: SeaweedServer, settings_env: dict[str, str]) -> None:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        settings = Settings.from_env({**settings_env, "MINIO_ENDPOINT": proxy.endpoint_url})
        repo_id, manifest = staged(settings, shapes, "bin-and-safetensors")
        proxy.clear()
        result = pull(settings, repo_id, "vllm", exclude=("*.json",))
        kept = {p for p in manifest.files if not p.endswith(".json")} - SKIPPED["bin-and-safetensors"]
        index = manifest.files["model.safetensors.index.json"].size  # read to apply the index filter
        sent = proxy.body_bytes("GET", "/blobs/")
        assert result.bytes_downloaded == size_of(manifest, kept) + index == sent
    assert_snapshot_holds(settings, repo_id, kept)


def test_the_hub_fallback_downloads_only_the_selection_too(
        shapes: dict[str, tuple[str, Path]], fake_hub: FakeHub, tmp_path: Path) -> None:
    repo_id, _ = shapes["llama3"]
    hf_home = tmp_path / "hf-home"
    fake_hub.clear_requests()
    fake_hub.available = True
    report = tmp_path / "report.json"
    done = run_agent("--log-format", "json", "pull", repo_id, "--files", "vllm", "--report", str(report),
                     env=hub_agent_env(fake_hub, hf_home))  # storage off: the Hub
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["source"] == "hub" and set(data["skipped"]) == SKIPPED["llama3"]
    fetched = {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in fake_hub.requests
               if method == "GET" and "/resolve/" in path}
    assert fetched and not fetched & SKIPPED["llama3"]
    settings = Settings.from_env({"HF_HOME": str(hf_home)})
    kept = {rel for rel, _ in RepoCache(settings.hub_cache, repo_id).snapshot_entries(data["commit"])}
    assert kept == fetched and not kept & SKIPPED["llama3"]
    assert_snapshot_holds(settings, repo_id, kept, stamps=False)


def test_a_narrowed_local_copy_does_not_stand_in_for_a_wider_pull_when_the_bucket_is_down(
        shapes: dict[str, tuple[str, Path]], fake_hub: FakeHub, settings: Settings,
        settings_env: dict[str, str], tmp_path: Path) -> None:
    repo_id, manifest = staged(settings, shapes, "llama3")
    pull(settings, repo_id, "all", include=("*.json",))
    fake_hub.available = True
    down = hub_agent_env(fake_hub, settings.hf_home, {**settings_env, "MINIO_ENDPOINT": "127.0.0.1:9"})
    report = tmp_path / "report.json"
    done = run_agent("--log-format", "json", "pull", repo_id, "--files", "all", "--report", str(report),
                     env=down)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(report.read_text())["source"] == "hub"  # not "cache": that copy holds *.json only
    assert_snapshot_holds(settings, repo_id, set(manifest.files), stamps=False)
