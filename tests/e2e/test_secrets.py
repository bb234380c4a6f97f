"""No secret and no presigned signature leaks, whatever a command prints, logs, writes or runs.

Every command runs as a subprocess with `--log-format json --debug` (tracebacks on) against SeaweedFS
configured with a recognisable secret (the server's generated secret key; HF_TOKEN gets one too). Checked:
stdout, stderr (the JSON log), the `--report` file, and the argv of every process in the agent's tree,
sampled from /proc while a throttled pull runs (python workers, the native engine, s5cmd). Failures are
exercised too, since error paths are where URLs slip into messages. `presign` exists to print presigned
URLs: only its stdout may hold a signature.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.demo.seaweed import SeaweedServer
from tests.support.cli import clean_env, start_agent
from tests.support.fault_server import FaultProxy

HF_TOKEN = "hf_RecognisableTokenValue0123456789"
SIGNATURE_MARKERS = ("X-Amz-Signature", "Signature=", "X-Amz-Credential", "x-amz-signature")

STUB_VLLM = """#!{python}
import json, os, sys
with open(os.environ["VLLM_STUB_RECORD"], "w") as record:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, record)
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    argvs: list[str]


class Leaks:
    """Runs the agent and checks everything it shows for the secret, the token and signatures."""

    def __init__(self, env: dict[str, str], secret: str) -> None:
        self.env = env
        self.secrets = (secret, HF_TOKEN)

    def check(self, text: str, where: str, *, signatures: bool = True) -> None:
        for secret in self.secrets:
            assert secret not in text, f"a secret in {where}"
        if signatures:
            for marker in SIGNATURE_MARKERS:
                assert marker not in text, f"{marker!r} in {where}: {text[:3000]}"

    def run(self, *args: str, env: dict[str, str] | None = None, report: Path | None = None,
            signed_stdout: bool = False, timeout: float = 90) -> Run:
        proc = start_agent("--log-format", "json", "--debug", *args, env={**self.env, **(env or {})},
                           stdin=subprocess.DEVNULL)
        argvs: set[str] = set()
        deadline = time.monotonic() + timeout
        try:
            # Sample the process tree's argv while it runs (the pipes are drained afterwards: the
            # outputs here are small).
            while proc.poll() is None:
                argvs.update(tree_argvs(proc.pid))
                assert time.monotonic() < deadline, f"{args[0]} did not finish"
                time.sleep(0.02)
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.check(stdout, f"stdout of {args[0]}", signatures=not signed_stdout)
        self.check(stderr, f"stderr of {args[0]}")
        for line in argvs:
            self.check(line, f"a child's argv ({line[:200]})")
        if report is not None and report.exists():
            self.check(report.read_text(), "the report file")
        return Run(proc.returncode, stdout, stderr, sorted(argvs))


def tree_argvs(pid: int) -> set[str]:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    found = set()
    for process in processes:
        try:
            found.add("\0".join(process.cmdline()))
        except psutil.Error:
            continue
    return found


@pytest.fixture
def leaks(settings_env: dict[str, str], s3_server: SeaweedServer) -> Leaks:
    base = clean_env(**settings_env, HF_TOKEN=HF_TOKEN, HF_ENDPOINT="http://127.0.0.1:9",
                     HF_HUB_DISABLE_XET="1")
    return Leaks(base, s3_server.secret_key)


@pytest.fixture
def staged(leaks: Leaks, hf_cache_ro: Path, model_repo: tuple[str, str]) -> str:
    run = leaks.run("stage", model_repo[0], "--from-cache", str(hf_cache_ro))
    assert run.code == 0, run.stderr[-2000:]
    return model_repo[0]


@pytest.fixture
def throttle(s3_server: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("stall", count=10_000, match="/blobs/", stall_seconds=0.15)
        yield proxy


def engines() -> list[str]:
    from agent.engines.native import NativeEngine
    from agent.engines.s5cmd import S5cmdEngine

    return ["python", *(["native"] if NativeEngine.available() else []),
            *(["s5cmd"] if S5cmdEngine.available() else [])]


@pytest.mark.parametrize("engine", engines())
def test_a_throttled_pull_leaks_nothing_in_output_report_or_any_childs_argv(
        engine: str, leaks: Leaks, staged: str, throttle: FaultProxy, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = leaks.run("pull", staged, "--engine", engine, "--concurrency", "2", "--no-fallback",
                    "--report", str(report), report=report, env={"MINIO_ENDPOINT": throttle.endpoint_url})
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(report.read_text())["engine"] == engine
    if engine == "s5cmd":  # the sampling did see the child whose command line matters most
        assert any("s5cmd" in argv and "--endpoint-url" in argv for argv in run.argvs), run.argvs
    if engine == "python":
        assert len(run.argvs) > 1, "no worker process was sampled"


@pytest.mark.parametrize("engine", engines())
def test_a_pull_that_fails_on_every_blob_get_leaks_nothing_even_with_tracebacks(
        engine: str, leaks: Leaks, staged: str, s3_server: SeaweedServer, tmp_path: Path) -> None:
    with FaultProxy(s3_server.endpoint_url, preserve_host=True) as proxy:
        proxy.add_fault("reset", count=10_000, match="/blobs/")
        run = leaks.run("pull", staged, "--engine", engine, "--concurrency", "2", "--no-fallback",
                        env={"MINIO_ENDPOINT": proxy.endpoint_url, "SIMSWARM_RETRIES": "2"})
    assert run.code == 3, run.stderr[-2000:]
    assert "Traceback" in run.stderr  # --debug: the error paths' tracebacks were shown, and checked
    assert json.loads(run.stderr.strip().splitlines()[-1])["event"] == "error"


def test_wrong_credentials_leak_nothing(leaks: Leaks, staged: str) -> None:
    wrong = "Wrong" + "Secret" * 6
    run = leaks.run("pull", staged, "--engine", "python", "--no-fallback", env={"MINIO_SECRET_KEY": wrong})
    assert run.code == 2, run.stderr[-2000:]
    assert wrong not in run.stdout + run.stderr


def test_list_verify_and_serve_leak_nothing(leaks: Leaks, staged: str, tmp_path: Path) -> None:
    assert leaks.run("list").code == 0
    assert leaks.run("list", "--json").code == 0
    assert leaks.run("pull", staged, "--no-fallback").code == 0
    verified = leaks.run("verify", staged)
    assert verified.code == 0, verified.stdout + verified.stderr
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    (stub_dir / "vllm").write_text(STUB_VLLM.format(python=sys.executable))
    (stub_dir / "vllm").chmod(0o755)
    record = tmp_path / "vllm.json"
    served = leaks.run("serve", staged, "--no-fallback", "--", "--api-key", "vllm-key-123",
                       env={"PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}",
                            "VLLM_STUB_RECORD": str(record)})
    assert served.code == 0, served.stderr[-2000:]
    assert "vllm-key-123" not in served.stderr  # the log shows vLLM's argv with the key hidden
    seen = json.loads(record.read_text())
    leaks.check(json.dumps(seen["argv"]), "vLLM's argv")
    leaks.check(json.dumps({k: v for k, v in seen["env"].items() if k != "HF_TOKEN"}), "vLLM's environment")
    assert "MINIO_SECRET_KEY" not in seen["env"] and "AWS_SECRET_ACCESS_KEY" not in seen["env"]


def test_presign_and_upload_artifacts_leak_signatures_only_to_presigns_stdout(
        leaks: Leaks, tmp_path: Path) -> None:
    download = leaks.run("presign", "job-42", signed_stdout=True)
    assert download.code == 0, download.stderr[-2000:]
    assert "X-Amz-Signature" in download.stdout  # its purpose; never in its log
    upload = leaks.run("presign", "job-42", "--upload", signed_stdout=True)
    assert upload.code == 0
    urls = json.loads(upload.stdout)
    (tmp_path / "urls.json").write_text(json.dumps(urls))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in list(urls)[:3]:
        (artifacts / name).write_text('{"ok": true}\n')
    done = leaks.run("upload-artifacts", str(artifacts), "--urls", str(tmp_path / "urls.json"))
    assert done.code == 0, done.stdout + done.stderr
    assert len(json.loads(done.stdout)["uploaded"]) == 3

    # failures: a tampered signature (403) and a server that is gone (connection refused)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = list(urls)[:2]
    broken = {names[0]: urls[names[0]].replace("X-Amz-Signature=", "X-Amz-Signature=0"),
              names[1]: f"http://127.0.0.1:{port}/" + urls[names[1]].split("/", 3)[3]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    failed = leaks.run("upload-artifacts", str(artifacts), "--urls", str(tmp_path / "broken.json"),
                       "--attempts", "2")
    assert failed.code == 3, failed.stdout + failed.stderr
    assert sorted(json.loads(failed.stdout)["failed"]) == sorted(names)
