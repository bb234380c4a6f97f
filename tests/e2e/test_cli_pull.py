"""The CLI as a process (`python -m agent ...`), as a pod or an engineer runs it: stage, list, pull and
verify against the real SeaweedFS, with JSON log lines on a non-terminal, the documented exit codes,
one line per error, and never a secret or a presigned signature in any output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.demo.seaweed import SeaweedServer
from tests.support.cli import clean_env, run_agent
from tests.support.mounts import tmpfs


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli(settings_env: dict[str, str], s3_server: SeaweedServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run `python -m agent ARGS` with the test's MINIO_* and HF_HOME; checks every output for secrets."""
    base = clean_env(**settings_env)
    secret = s3_server.secret_key

    def run(*args: str, env: dict[str, str] | None = None, report: Path | None = None) -> Run:
        done = run_agent(*args, env={**base, **(env or {})}, stdin=subprocess.DEVNULL)
        texts = [done.stdout, done.stderr] + ([report.read_text()] if report and report.exists() else [])
        for text in texts:
            assert secret not in text
            assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text
        return Run(done.returncode, done.stdout, done.stderr)

    return run


def assert_one_line_error(run: Run, code: int) -> dict[str, object]:
    assert run.code == code, run.stderr[-2000:]
    events = run.json_lines()  # every stderr line is JSON on a non-terminal
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[-1] is events[-1]
    assert errors[0]["exit_code"] == code
    message = str(errors[0]["message"])
    assert message.startswith("error: ") and "\n" not in message and "(" in message  # cause and remedy
    return errors[0]


def test_stage_list_pull_verify_end_to_end(cli, hf_cache: Path, model_repo: tuple[str, str],  # type: ignore[no-untyped-def]
                                           settings_env: dict[str, str], tmp_path: Path) -> None:
    repo_id, commit = model_repo
    staged = cli("stage", repo_id, "--from-cache", str(hf_cache))
    assert staged.code == 0, staged.stderr
    done = [e for e in staged.json_lines() if e["event"] == "stage.done"]
    assert done and done[0]["commit"] == commit and done[0]["uploaded_blobs"]

    listed = cli("list", "--json")
    assert listed.code == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    size = sum(p.stat().st_size for p in RepoCache(hf_cache, repo_id).blobs.iterdir())
    assert [(r["repo_id"], r["commit"], r["size"], r["form"]) for r in rows] == [
        (repo_id, commit, size, "compact")]
    table = cli("list")
    assert table.code == 0 and repo_id in table.stdout and commit[:12] in table.stdout

    report = tmp_path / "report.json"
    pulled = cli("pull", repo_id, "--engine", "python", "--concurrency", "2", "--no-fallback",
                 "--report", str(report), report=report)
    assert pulled.code == 0, pulled.stderr
    events = pulled.json_lines()
    assert {"pull.manifest", "pull.plan", "pull.done"} <= {str(e["event"]) for e in events}
    result = json.loads(report.read_text())
    for key in ("source", "engine", "bytes_downloaded", "seconds", "verified", "snapshot_path"):
        assert key in result
    assert (result["source"], result["engine"], result["bytes_downloaded"]) == ("minio", "python", size)
    hub_cache = Path(settings_env["HF_HOME"]) / "hub"
    assert result["snapshot_path"] == str(RepoCache(hub_cache, repo_id).snapshot_dir(commit))

    warm = cli("pull", repo_id, "--engine", "python", "--no-fallback", "--report", str(report), report=report)
    assert warm.code == 0
    assert json.loads(report.read_text())["source"] == "cache"
    assert json.loads(report.read_text())["bytes_downloaded"] == 0

    verified = cli("verify", repo_id)
    assert verified.code == 0, verified.stdout + verified.stderr
    assert verified.stdout == ""
    assert verified.json_lines()[-1]["event"] == "verify.ok"


def test_verify_lists_every_problem_and_exits_4(cli, hf_cache: Path,  # type: ignore[no-untyped-def]
                                                model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    hf_home = str(hf_cache.parent)
    assert cli("verify", repo_id, "--hf-home", hf_home).code == 0  # huggingface_hub's own cache is clean
    cache = RepoCache(hf_cache, repo_id)
    snap = cache.snapshot_dir(commit)
    blobs = sorted(cache.blobs.iterdir(), key=lambda p: p.stat().st_size)
    cache.ref_path("main").write_text(commit + "\n")
    (snap / "config.json").unlink()
    os.chmod(blobs[-1], 0o644)
    with open(blobs[-1], "r+b") as fh:  # same size, one byte flipped
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    blobs[0].unlink()  # a missing blob
    (cache.blobs / (blobs[1].name + ".incomplete")).write_bytes(b"")
    run = cli("verify", repo_id, "--hf-home", hf_home)
    error = assert_one_line_error(run, 4)
    problems = run.stdout.splitlines()
    assert len(problems) == 5, problems
    assert str(len(problems)) in str(error["message"])
    text = run.stdout
    assert "refs/main" in text and "trailing newline" in text
    assert "config.json: missing link" in text
    assert f"blobs/{blobs[-1].name}: content hash" in text
    assert f"blobs/{blobs[0].name}: missing blob" in text
    assert ".incomplete: stray temporary file" in text


def test_verify_uses_the_buckets_manifest_when_the_cache_has_none(  # type: ignore[no-untyped-def]
        cli, hf_cache: Path, model_repo: tuple[str, str]) -> None:
    repo_id, commit = model_repo
    assert cli("stage", repo_id, "--from-cache", str(hf_cache)).code == 0
    cache = RepoCache(hf_cache, repo_id)
    cache.tree_path(commit).unlink()
    (cache.snapshot_dir(commit) / "config.json").unlink()
    run = cli("verify", repo_id, "--hf-home", str(hf_cache.parent))
    assert_one_line_error(run, 4)
    assert run.stdout.splitlines() == [f"snapshots/{commit[:12]}/config.json: missing link"]
    assert any(e.get("manifest") == "bucket" for e in run.json_lines())


def test_verify_of_a_model_not_in_the_cache_exits_4(cli) -> None:  # type: ignore[no-untyped-def]
    run = cli("verify", "org/absent", env={"MINIO_ENDPOINT": ""})
    assert_one_line_error(run, 4)
    assert "refs/main" in run.stdout


def test_pull_errors_have_one_line_and_the_documented_exit_codes(  # type: ignore[no-untyped-def]
        cli, hf_cache: Path, model_repo: tuple[str, str], s3_server: SeaweedServer, bucket: str,
        tmp_path: Path) -> None:
    repo_id, commit = model_repo
    # not staged, fallback off: 3
    assert_one_line_error(cli("pull", repo_id, "--engine", "python", "--no-fallback"), 3)
    # unreachable endpoint: 3
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = cli("pull", repo_id, "--engine", "python", "--no-fallback",
                      env={"MINIO_ENDPOINT": f"127.0.0.1:{port}"})
    assert_one_line_error(unreachable, 3)
    # malformed manifest: 4
    assert cli("stage", repo_id, "--from-cache", str(hf_cache)).code == 0
    key = f"models/hf-cache/models--simswarm-test--tiny-llama/trees/{commit}.json"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"{not json")
    report = tmp_path / "r.json"
    malformed = cli("pull", repo_id, "--engine", "python", "--no-fallback", "--report", str(report),
                    report=report)
    error = assert_one_line_error(malformed, 4)
    assert "manifest" in str(error["message"])
    # usage errors: 2
    assert cli("pull", "../etc", "--no-fallback").code == 2
    assert cli("pull", repo_id, "--engine", "warp", "--no-fallback").code == 2
    assert cli("pull", repo_id, "--no-fallback", env={"MINIO_ENDPOINT": "ftp://x"}).code == 2


def test_wrong_credentials_never_echo_the_secret(cli, hf_cache: Path,  # type: ignore[no-untyped-def]
                                                 model_repo: tuple[str, str]) -> None:
    repo_id, _ = model_repo
    run = cli("stage", repo_id, "--from-cache", str(hf_cache), env={"MINIO_SECRET_KEY": "wrong-secret-value"})
    assert run.code == 2
    assert "wrong-secret-value" not in run.stdout + run.stderr


@pytest.fixture
def tiny_filesystem(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs, where this machine lets the tests mount one (root in a container); else skip."""
    with tmpfs(tmp_path / "small-disk", "1m") as mountpoint:
        yield mountpoint


def test_pull_onto_a_disk_too_small_exits_5(cli, tiny_filesystem: Path, hf_cache: Path,  # type: ignore[no-untyped-def]
                                            model_repo: tuple[str, str]) -> None:
    repo_id, _ = model_repo
    assert cli("stage", repo_id, "--from-cache", str(hf_cache)).code == 0
    run = cli("pull", repo_id, "--engine", "python", "--no-fallback", "--hf-home", str(tiny_filesystem))
    error = assert_one_line_error(run, 5)
    assert "disk" in str(error["message"])
    blobs = RepoCache(tiny_filesystem / "hub", repo_id).blobs
    assert not blobs.exists() or list(blobs.iterdir()) == []


@pytest.mark.parametrize("unset", [("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"), ("MINIO_SECRET_KEY",)])
@pytest.mark.parametrize("fallback", [[], ["--no-fallback"]])
def test_an_endpoint_without_keys_is_a_configuration_error_that_names_the_variables(  # type: ignore[no-untyped-def]
        cli, model_repo: tuple[str, str], unset: tuple[str, ...], fallback: list[str]) -> None:
    """Not a server problem (botocore's NoCredentialsError read as one, exit 3): the pod's setup is
    wrong, so exit 2, no fallback, and the line says which variables to set."""
    run = cli("pull", model_repo[0], "--engine", "python", *fallback, env=dict.fromkeys(unset, ""))
    error = assert_one_line_error(run, 2)
    message = str(error["message"])
    assert f"{' / '.join(unset)} {'are' if len(unset) == 2 else 'is'} not set" in message
    assert "NoCredentialsError" not in message and "server is up" not in message
    assert not any(e["event"] == "pull.fallback" for e in run.json_lines())


def test_pull_help_names_the_variables_that_configure_it(cli) -> None:  # type: ignore[no-untyped-def]
    for command in ("pull", "serve"):
        run = cli(command, "--help")
        assert run.code == 0
        for variable in ("MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "MINIO_BUCKET",
                         "MINIO_SECURE", "HF_HOME", "HF_TOKEN"):
            assert variable in run.stdout, (command, variable)
