"""A cache on a read-only mount, and a model folder damaged in ways that used to fail every rerun.

Root ignores file modes, so "read-only" here is a real read-only bind mount (`mount --bind` then
`mount -o remount,ro,bind`), as a ReadOnlyMany volume is in a pod: every write fails with EROFS. The
agent runs as a process (`python -m agent pull|serve`) against the real SeaweedFS, with a recording
stub `vllm` for `serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.demo.model import generate_model
from agent.demo.seed import fake_commit, seed_cache
from agent.pull import PullOptions, pull_from_store
from agent.settings import Settings
from agent.stage import stage_from_cache
from agent.store import Store
from tests.support import cli
from tests.support.cli import hub_agent_env
from tests.support.fake_hub import FakeHub
from tests.support.hf_cache import assert_clean_cache, resolve_offline, tree_state
from tests.support.staged import ENGINES, quiet

STUB = """#!{python}
import json, os, sys
with open(os.environ["VLLM_STUB_RECORD"], "w") as record:
    json.dump({{"argv": sys.argv}}, record)
"""


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` remounted read-only onto itself for the duration; skips where mounting is refused."""
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True,
                          check=False)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root where mounting is allowed): {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True,
                            check=False)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        probe = path / ".write-probe"
        with pytest.raises(OSError):  # the mount really refuses writes, for root too
            probe.write_text("x")
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def run_agent(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli.run_agent("--log-format", "text", *args, env=env)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return line


@pytest.fixture
def hub(fake_hub: FakeHub, model_repo: tuple[str, str]) -> FakeHub:
    fake_hub.clear_requests()
    return fake_hub


@pytest.fixture
def filled(settings: Settings, staged: tuple[str, str], tmp_path: Path) -> Path:
    """An HF_HOME the agent filled from the bucket (blobs stamped as verified), its own folder."""
    hf_home = tmp_path / "volume"
    hf_home.mkdir()
    pull_from_store(settings.with_hf_home(hf_home), PullOptions(staged[0], engine="python"), quiet())
    return hf_home


@pytest.mark.parametrize("verify", ["full", "size"])
def test_a_complete_cache_on_a_read_only_mount_is_pulled_and_served_without_writing(
        hub: FakeHub, staged: tuple[str, str], filled: Path, settings_env: dict[str, str], tmp_path: Path,
        verify: str) -> None:
    repo_id, commit = staged
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    (stub_dir / "vllm").write_text(STUB.format(python=sys.executable))
    (stub_dir / "vllm").chmod(0o755)
    record, report = tmp_path / "record.json", tmp_path / "report.json"
    env = hub_agent_env(hub, filled, settings_env)
    env.update(PATH=f"{stub_dir}{os.pathsep}{env['PATH']}", VLLM_STUB_RECORD=str(record))
    before = tree_state(filled)
    with read_only(filled):
        pulled = run_agent(env, "pull", repo_id, "--verify", verify, "--report", str(report))
        served = run_agent(env, "serve", repo_id, "--verify", verify, "--", "--port", "8001")
        after = tree_state(filled)
    assert pulled.returncode == 0, pulled.stderr
    data = json.loads(report.read_text())
    assert (data["source"], data["commit"], data["bytes_downloaded"]) == ("cache", commit, 0)
    assert served.returncode == 0, served.stderr
    assert json.loads(record.read_text())["argv"][1:] == ["serve", repo_id, "--served-model-name", repo_id,
                                                          "--port", "8001"]
    assert after == before
    assert hub.requests == []
    assert resolve_offline(filled / "hub", repo_id) == RepoCache(filled / "hub", repo_id).snapshot_dir(commit)


def test_a_read_only_cache_huggingface_hub_wrote_has_no_stamps_so_full_verification_hashes_it(
        hub: FakeHub, staged: tuple[str, str], hf_cache: Path, settings_env: dict[str, str],
        tmp_path: Path) -> None:
    """No stamp can be written on a read-only cache: each blob is hashed, and one flipped byte is found."""
    repo_id, _ = staged
    hf_home = hf_cache.parent
    env = hub_agent_env(hub, hf_home, settings_env)
    with read_only(hf_home):
        good = run_agent(env, "pull", repo_id, "--report", str(tmp_path / "r.json"))
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "r.json").read_text())["source"] == "cache"

    blob = max(RepoCache(hf_cache, repo_id).blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with read_only(hf_home):
        corrupt = run_agent(env, "pull", repo_id)
        sized = run_agent(env, "pull", repo_id, "--verify", "size")  # sizes only: trusts the volume
    assert corrupt.returncode == 2
    line = error_line(corrupt)
    assert "read-only" in line and "content hash" in line and blob.name in line
    assert sized.returncode == 0, sized.stderr
    assert hub.requests == []


@pytest.mark.parametrize("storage", ["off", "down"])
def test_a_complete_read_only_cache_is_served_when_the_bucket_cannot_deliver(
        hub: FakeHub, staged: tuple[str, str], filled: Path, tmp_path: Path, storage: str) -> None:
    repo_id, commit = staged
    minio = {} if storage == "off" else {"MINIO_ENDPOINT": "127.0.0.1:9", "MINIO_ACCESS_KEY": "k",
                                         "MINIO_SECRET_KEY": "s"}
    with read_only(filled):
        proc = run_agent(hub_agent_env(hub, filled, minio), "pull", repo_id, "--no-fallback", "--report",
                         str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["source"], data["commit"]) == ("cache", commit)


def test_a_read_only_cache_of_an_older_commit_serves_it_and_says_why(
        hub: FakeHub, staged: tuple[str, str], filled: Path, settings: Settings, settings_env: dict[str, str],
        tmp_path: Path) -> None:
    """The bucket's main moved on; the volume cannot take the new commit: its own complete copy is
    served, as with the bucket down, and the report says why."""
    repo_id, old = staged
    generate_model(tmp_path / "v2", seed=1)
    new = fake_commit("v2")
    seed_cache(tmp_path / "v2", tmp_path / "dev" / "hub", repo_id, new)
    stage_from_cache(Store(settings), tmp_path / "dev" / "hub", repo_id, "main", quiet())
    with read_only(filled):
        proc = run_agent(hub_agent_env(hub, filled, settings_env), "pull", repo_id, "--report",
                         str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["source"], data["commit"]) == ("cache", old)
    assert "read-only" in data["fallback_reason"] and new[:12] in data["fallback_reason"]
    assert hub.requests == []


@pytest.mark.parametrize("storage", ["on", "off"])
def test_an_incomplete_read_only_cache_fails_in_one_line_with_exit_2_and_never_asks_the_hub(
        hub: FakeHub, staged: tuple[str, str], filled: Path, settings_env: dict[str, str],
        storage: str) -> None:
    repo_id, _ = staged
    cache = RepoCache(filled / "hub", repo_id)
    missing = min(cache.blobs.iterdir(), key=lambda p: p.stat().st_size)
    missing.unlink()
    env = hub_agent_env(hub, filled, settings_env if storage == "on" else None)
    with read_only(filled):
        proc = run_agent(env, "pull", repo_id)  # the fallback is allowed: it could not write either
    assert proc.returncode == 2
    line = error_line(proc)
    assert "read-only" in line and "--hf-home" in line
    if storage == "on":
        assert f"blobs/{missing.name}: missing blob" in line
    assert hub.requests == []


DAMAGE = {
    "refs/main is a folder": lambda c, commit: _folder_for(c.ref_path("main")),
    "trees/<commit>.json is a folder": lambda c, commit: _folder_for(c.tree_path(commit)),
    ".simswarm/verified is a file": lambda c, commit: _file_for(c.stamps),
}


def _folder_for(path: Path) -> None:
    path.unlink()
    (path / "inside").mkdir(parents=True)
    (path / "inside" / "junk").write_text("junk")


def _file_for(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a folder")


@pytest.mark.parametrize("rehash", [False, True], ids=["plain", "rehash"])  # --rehash drops stamps first
@pytest.mark.parametrize("engine", ENGINES)  # every repair must hold whichever engine pulls
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_agent_repairs_damage_in_its_own_model_folder_and_touches_nothing_outside(
        settings: Settings, staged: tuple[str, str], damage: str, engine: str, rehash: bool) -> None:
    repo_id, commit = staged
    pull_from_store(settings, PullOptions(repo_id, engine=engine), quiet())
    cache = RepoCache(settings.hub_cache, repo_id)
    DAMAGE[damage](cache, commit)
    # The same damage in another model's folder, and a file beside the cache: not ours to touch.
    other = RepoCache(settings.hub_cache, "someone/else")
    _folder_for_new(other.ref_path("main"))
    beside = settings.hub_cache / "notes.txt"
    beside.write_text("keep me")
    before = tree_state(other.repo_dir)

    again = pull_from_store(settings, PullOptions(repo_id, engine=engine, rehash=rehash), quiet())
    third = pull_from_store(settings, PullOptions(repo_id, engine=engine), quiet())

    assert (again.source, again.bytes_downloaded) == ("cache", 0)
    assert third.source == "cache"
    assert cache.ref_path("main").read_text() == commit
    assert cache.tree_path(commit).is_file() and cache.stamps.is_dir()
    assert sorted(p.name for p in cache.stamps.iterdir()) == sorted(p.name for p in cache.blobs.iterdir())
    assert resolve_offline(settings.hub_cache, repo_id) == cache.snapshot_dir(commit)
    assert tree_state(other.repo_dir) == before and beside.read_text() == "keep me"
    shutil.rmtree(other.repo_dir)
    beside.unlink()
    assert_clean_cache(settings.hub_cache)


def _folder_for_new(path: Path) -> None:
    (path / "inside").mkdir(parents=True)
    (path / "inside" / "junk").write_text("junk")


def test_refs_and_manifests_are_readable_by_every_user(settings: Settings, staged: tuple[str, str]) -> None:
    """A volume filled by one user is served by another (the image runs as uid 10001): a 0600 ref,
    mkstemp's mode, would make huggingface_hub fail offline for everyone else."""
    repo_id, commit = staged
    pull_from_store(settings, PullOptions(repo_id, engine="python"), quiet())
    cache = RepoCache(settings.hub_cache, repo_id)
    for path in (cache.ref_path("main"), cache.tree_path(commit)):
        assert path.stat().st_mode & 0o044 == 0o044, oct(path.stat().st_mode)
