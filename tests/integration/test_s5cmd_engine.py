"""The s5cmd engine against a real S3 server (SeaweedFS) and the real s5cmd binary.

`pull_from_store` hands its Settings to the engine; tests that build a bare engine put MINIO_* in the
environment with monkeypatch, as the CLI's process environment would hold them.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from huggingface_hub import scan_cache_dir

from agent.demo.seaweed import SeaweedServer
from agent.demo.seed import fake_commit, seed_cache
from agent.engines import s5cmd as s5cmd_module
from agent.engines.base import BlobJob, Part, TransferConfig
from agent.engines.s5cmd import S5cmdEngine, classify, command_line, scrub
from agent.errors import CredentialsError, NotFoundError, StorageUnavailableError
from agent.finish import Finisher
from agent.policy import RetryPolicy
from agent.pull import PullOptions, pull_from_store
from agent.settings import Deadlines, Settings
from agent.stage import stage_from_cache
from agent.store import Store
from tests.support.staged import quiet, s5cmd_upload

REPO_ID = "simswarm-test/s5cmd-llama"
COMMIT = fake_commit(REPO_ID)
NO_RETRY = TransferConfig(retry=RetryPolicy(max_retries=0))

pytestmark = pytest.mark.skipif(not S5cmdEngine.available(), reason="s5cmd is not on PATH")


@pytest.fixture
def seeded_cache(tiny_model: Path, tmp_path: Path) -> Path:
    """A dev box's hub cache holding the tiny model, as huggingface_hub lays it out."""
    hub = tmp_path / "dev-cache"
    seed_cache(tiny_model, hub, REPO_ID, COMMIT)
    return hub


@pytest.fixture
def staged(settings: Settings, seeded_cache: Path) -> Settings:
    stage_from_cache(Store(settings), seeded_cache, REPO_ID, "main", quiet())
    return settings


@pytest.fixture
def agent_env(settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    return settings_env


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[str], dict[str, str]]]]:
    """Every (argv, env) the engine starts s5cmd with, the real process still running."""
    calls: list[tuple[list[str], dict[str, str]]] = []
    real_popen = subprocess.Popen

    def recording_popen(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append((list(argv), dict(kwargs.get("env") or {})))
        return real_popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)  # the engine calls subprocess.Popen
    yield calls


def assert_cache_complete(settings: Settings, tiny_model: Path) -> None:
    info = scan_cache_dir(settings.hub_cache)
    assert info.warnings == []
    snapshot = settings.hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    for source in (p for p in tiny_model.rglob("*") if p.is_file()):
        placed = snapshot / source.relative_to(tiny_model)
        assert placed.is_symlink(), placed
        assert placed.read_bytes() == source.read_bytes()
    blobs = snapshot.parent.parent / "blobs"
    assert not [p.name for p in blobs.iterdir() if not p.is_file() or "." in p.name]  # no temporaries


def test_pull_with_s5cmd_fills_a_cache_that_verifies(
        staged: Settings, agent_env: dict[str, str], tiny_model: Path,
        recorded: list[tuple[list[str], dict[str, str]]]) -> None:
    result = pull_from_store(staged, PullOptions(REPO_ID, engine="s5cmd"), quiet())

    assert result.engine == "s5cmd"
    assert result.source == "minio" and result.commit == COMMIT
    assert result.bytes_downloaded == sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    assert_cache_complete(staged, tiny_model)
    assert len(recorded) == 1  # one s5cmd process for the whole model


def test_the_secret_key_travels_only_in_the_environment(
        staged: Settings, agent_env: dict[str, str],
        recorded: list[tuple[list[str], dict[str, str]]]) -> None:
    pull_from_store(staged, PullOptions(REPO_ID, engine="s5cmd"), quiet())

    (argv, env), = recorded
    secret = agent_env["MINIO_SECRET_KEY"]
    assert not any(secret in word for word in argv)
    assert "--endpoint-url" in argv and staged.endpoint_url in argv
    assert env["AWS_SECRET_ACCESS_KEY"] == secret
    assert env["AWS_ACCESS_KEY_ID"] == agent_env["MINIO_ACCESS_KEY"]
    assert "MINIO_SECRET_KEY" not in env  # only the variable s5cmd reads carries it
    commands = Path(argv[-1])
    assert not commands.exists()  # the commands file (keys and paths only) is gone with its folder


def test_wrong_credentials_fail_with_a_clear_one_line_error(
        staged: Settings, agent_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "not-the-secret-" + "x" * 20
    # Only the engine gets the wrong secret, so the listing still works and s5cmd meets the refusal.
    engine = S5cmdEngine(replace(staged, secret_key=wrong))
    monkeypatch.setattr("agent.pull.pick_engine", lambda name, settings=None: engine)

    with pytest.raises(CredentialsError) as caught:
        pull_from_store(staged, PullOptions(REPO_ID, engine="s5cmd"), quiet())

    line = caught.value.one_line()
    assert "\n" not in line
    assert "403" in line or "Signature" in line
    assert wrong not in line and agent_env["MINIO_SECRET_KEY"] not in line
    assert "MINIO_SECRET_KEY" in line  # the hint says what to check
    repo_dir = staged.hub_cache / f"models--{REPO_ID.replace('/', '--')}"
    assert not (repo_dir / "refs" / "main").exists()
    leftovers = [p.name for p in (repo_dir / "blobs").iterdir() if not p.name.endswith((".part", ".json"))]
    assert leftovers == []


def test_a_missing_object_is_not_found(settings: Settings, tmp_path: Path) -> None:
    target = tmp_path / "blob.simswarm.part"
    target.write_bytes(b"\0" * 10)
    job = BlobJob("0" * 64, "models/hf-cache/nothing-here", "http://unused", 10, target, (Part(0, 0, 10),))

    with pytest.raises(NotFoundError, match="fetched 0 of 1 blobs"):
        S5cmdEngine(settings).fetch([job], NO_RETRY, lambda n: None, lambda j, p: None)


def test_an_unreachable_endpoint_is_storage_unavailable(settings: Settings, tmp_path: Path) -> None:
    dead = replace(settings, endpoint_url="http://127.0.0.1:9")
    target = tmp_path / "blob.simswarm.part"
    target.write_bytes(b"\0" * 10)
    job = BlobJob("0" * 64, "models/x", "http://unused", 10, target, (Part(0, 0, 10),))

    with pytest.raises(StorageUnavailableError) as caught:
        S5cmdEngine(dead).fetch([job], NO_RETRY, lambda n: None, lambda j, p: None)
    assert settings.secret_key not in str(caught.value)  # type: ignore[operator]


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a stalled object store."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in [*held, server]:
        conn.close()


def test_a_stalled_server_fails_the_fetch_and_stops_the_child(
        settings: Settings, silent_endpoint: str, tmp_path: Path,
        recorded: list[tuple[list[str], dict[str, str]]]) -> None:
    target = tmp_path / "blob.simswarm.part"
    target.write_bytes(b"\0" * 10)
    job = BlobJob("0" * 64, "models/x", "http://unused", 10, target, (Part(0, 0, 10),))
    engine = S5cmdEngine(replace(settings, endpoint_url=silent_endpoint))
    started = time.monotonic()

    with pytest.raises(StorageUnavailableError, match="no progress"):
        impatient = TransferConfig(deadlines=Deadlines(first_byte=0.5), retry=RetryPolicy(max_retries=0))
        engine.fetch([job], impatient, lambda n: None, lambda j, p: None)
    assert time.monotonic() - started < 15
    assert not [p for p in psutil.Process().children(recursive=True) if "s5cmd" in p.name()]


def test_legacy_prefix_uploaded_by_s5cmd_is_pulled_with_s5cmd(
        settings: Settings, seeded_cache: Path, agent_env: dict[str, str], tiny_model: Path,
        s3_server: SeaweedServer) -> None:
    """The old start.sh world: `s5cmd cp $HF_HOME/hub/ s3://bucket/models/hf-cache/` (links followed)."""
    s5cmd_upload(s3_server, seeded_cache, settings.bucket)

    result = pull_from_store(settings, PullOptions(REPO_ID, engine="s5cmd"), quiet())

    assert result.commit == COMMIT
    assert_cache_complete(settings, tiny_model)


def test_interrupt_stops_the_child_and_leaves_no_temporaries(
        staged: Settings, agent_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_stop = s5cmd_module._stop

    def remember(proc: subprocess.Popen[bytes]) -> None:
        started.append(proc)
        real_stop(proc)

    monkeypatch.setattr(s5cmd_module, "_stop", remember)

    def interrupt(self: object, job: BlobJob, part: Part) -> None:
        raise KeyboardInterrupt  # what SIGINT raises in the main thread

    monkeypatch.setattr(Finisher, "on_part_done", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pull_from_store(staged, PullOptions(REPO_ID, engine="s5cmd"), quiet())

    (proc,) = started
    assert proc.poll() is not None  # the child is gone
    blobs = staged.hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"
    assert not [p.name for p in blobs.iterdir() if re.search(r"\.simswarm\.part\d+$", p.name)]


# -- the pieces, without a server ---------------------------------------------------------------------

def test_command_lines_quote_keys_and_disable_wildcards(tmp_path: Path) -> None:
    job = BlobJob("a" * 64, "models/hf-cache/m/snapshots/c/odd name*?.json", "", 5, tmp_path / "p q",
                  (Part(0, 0, 5),))
    line = command_line("simswarm", job, per_object=4)
    assert line.startswith("cp --raw -c 1 ")
    assert "'s3://simswarm/models/hf-cache/m/snapshots/c/odd name*?.json'" in line
    assert f"'{tmp_path / 'p q'}'" in line


def test_errors_are_classified_and_scrubbed() -> None:
    secret = "s3cr3t-value"
    forbidden = ('{"operation":"cp","error":"SignatureDoesNotMatch: bad. status code: 403, '
                 'request id: ABC, host id: "}')
    assert isinstance(classify([forbidden], 1, 1, 1, [secret]), CredentialsError)
    assert isinstance(classify(['{"error":"NoSuchKey: x. status code: 404"}'], 1, 1, 2, []), NotFoundError)
    failure = classify([f"ERROR dial tcp http://h/k?X-Amz-Signature=zz {secret}\nsecond"], 1, 2, 2, [secret])
    assert isinstance(failure, StorageUnavailableError)
    text = str(failure)
    assert secret not in text and "zz" not in text and "\n" not in text
    assert "request id" not in scrub(forbidden, [])
