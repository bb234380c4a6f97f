"""`agent.artifacts` and the `presign` / `upload-artifacts` commands against a real S3 server (SeaweedFS).

The pod's side uses a plain HTTP client (urllib3) with the presigned URLs, as a GPU pod without
credentials does; the report task's side uses `fetch_artifact` / `put_report_md` through the SDK.
"""

from __future__ import annotations

import calendar
import json
import secrets
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import urllib3

from agent.artifacts import SIM_DATA_FILES, SimDataStorage
from agent.demo.seaweed import SeaweedServer
from agent.errors import EXIT_NOT_AVAILABLE, EXIT_USAGE, NotFoundError
from agent.settings import Settings
from tests.support.cli import clean_env, run_agent

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))


@pytest.fixture
def storage(settings_env: dict[str, str]) -> SimDataStorage:
    return SimDataStorage(Settings.from_env(settings_env))


@pytest.fixture
def job_id() -> str:
    return "job-" + secrets.token_hex(6)


def artifact_bytes(name: str, job_id: str) -> bytes:
    return json.dumps({"artifact": name, "job": job_id, "rows": list(range(50))}).encode()


def put(url: str, body: bytes) -> urllib3.BaseHTTPResponse:
    return HTTP.request("PUT", url, body=body, headers={"Content-Type": "application/json"})


def get(url: str) -> urllib3.BaseHTTPResponse:
    return HTTP.request("GET", url)


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    q.update(changes)
    return urlunsplit(parts._replace(query=urlencode(q)))


def wait_past_expiry(url: str, margin: float = 1.2) -> None:
    """Sleep until the URL's X-Amz-Date + X-Amz-Expires has passed by `margin` seconds."""
    q = parse_qs(urlsplit(url).query)
    signed_at = calendar.timegm(time.strptime(q["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    time.sleep(max(0.0, signed_at + int(q["X-Amz-Expires"][0]) + margin - time.time()))


def run_cli(*args: str, env: dict[str, str] | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m agent ARGS` with only the given MINIO_* variables (none of the caller's)."""
    return run_agent("--log-format", "json", *args, env=clean_env(**(env or {})), cwd=cwd)


# ------------------------------------------------------------------------------------------ the URLs


def test_pod_puts_every_artifact_and_the_browser_gets_each_back(storage: SimDataStorage, job_id: str) -> None:
    uploads = storage.generate_upload_urls(job_id)
    assert uploads is not None and list(uploads) == list(SIM_DATA_FILES)
    for name, url in uploads.items():
        response = put(url, artifact_bytes(name, job_id))
        assert response.status == 200, (name, response.data[:300])
    downloads = storage.generate_download_urls(job_id, sim_data_available=True)
    assert downloads is not None and list(downloads) == list(SIM_DATA_FILES)
    for name, url in downloads.items():
        response = get(url)
        assert response.status == 200, (name, response.data[:300])
        assert response.data == artifact_bytes(name, job_id)
    assert storage.generate_download_urls(job_id, sim_data_available=False) is None


def test_tampered_urls_are_refused(storage: SimDataStorage, job_id: str) -> None:
    uploads = storage.generate_upload_urls(job_id)
    assert uploads is not None
    assert put(uploads["posts.json"], b"[]").status == 200
    downloads = storage.generate_download_urls(job_id, True)
    assert downloads is not None
    url = downloads["posts.json"]
    assert get(url).status == 200
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    other_job = url.replace(f"/sim-data/{job_id}/", "/sim-data/someone-else/")
    other_file = url.replace("/posts.json?", "/trades.json?")
    for tampered in (with_query(url, **{"X-Amz-Signature": flipped}),
                     with_query(url, **{"X-Amz-Expires": "604800"}),
                     other_job, other_file):
        response = get(tampered)
        assert response.status == 403, response.data[:300]
    # An upload URL cannot be used to read, nor a download URL to overwrite.
    assert get(uploads["posts.json"]).status == 403
    assert put(url, b"overwritten").status == 403
    assert get(url).data == b"[]"


def test_expired_urls_are_refused(storage: SimDataStorage, job_id: str) -> None:
    upload = (storage.generate_upload_urls(job_id, expires=2) or {})["chat_log.json"]
    assert put(upload, b"[1]").status == 200
    download = (storage.generate_download_urls(job_id, True, expires=1) or {})["chat_log.json"]
    wait_past_expiry(upload)
    wait_past_expiry(download)
    assert get(download).status == 403
    assert put(upload, b"[2]").status == 403
    fresh = (storage.generate_download_urls(job_id, True) or {})["chat_log.json"]
    assert get(fresh).data == b"[1]"


# ------------------------------------------------------------------------------ the report task's side


def test_report_task_fetches_artifacts_and_writes_report_md(
        s3_server: SeaweedServer, settings_env: dict[str, str], storage: SimDataStorage, job_id: str) -> None:
    chat = [{"round": 1, "agent": "a-1", "text": "Prix élevé ✓"}]
    uploads = storage.generate_upload_urls(job_id)
    assert uploads is not None
    assert put(uploads["chat_log.json"], json.dumps(chat).encode()).status == 200

    assert storage.fetch_artifact(job_id, "chat_log.json") == chat
    report = "# Report\n\nThe market moved — 12% ✓\n"
    key = storage.put_report_md(job_id, report)
    assert key == f"sim-data/{job_id}/report.md"
    assert storage.fetch_artifact(job_id, "report.md") == report.encode("utf-8")
    head = s3_server.client().head_object(Bucket=settings_env["MINIO_BUCKET"], Key=key)
    assert head["ContentType"] == "text/markdown; charset=utf-8"


def test_missing_artifact_is_not_found(storage: SimDataStorage, job_id: str) -> None:
    with pytest.raises(NotFoundError) as info:
        storage.fetch_artifact(job_id, "relations.json")
    assert job_id in str(info.value) and "relations.json" in str(info.value)
    assert info.value.exit_code == EXIT_NOT_AVAILABLE


# --------------------------------------------------------------------------------- the CLI, end to end


def test_presign_and_upload_artifacts_end_to_end(
        settings_env: dict[str, str], job_id: str, tmp_path: Path) -> None:
    presigned = run_cli("presign", job_id, "--upload", env=settings_env, cwd=tmp_path)
    assert presigned.returncode == 0, presigned.stderr
    upload_map = json.loads(presigned.stdout)
    assert list(upload_map) == list(SIM_DATA_FILES)
    assert {parse_qs(urlsplit(u).query)["X-Amz-Expires"][0] for u in upload_map.values()} == {"50400"}
    assert "X-Amz-Signature" not in presigned.stderr  # URLs go to stdout only
    urls_file = tmp_path / "urls.json"
    urls_file.write_text(presigned.stdout)

    artifacts = tmp_path / "out"
    artifacts.mkdir()
    present = [n for n in SIM_DATA_FILES if n not in {"relations.json", "profiles.json"}]
    for name in present:
        (artifacts / name).write_bytes(artifact_bytes(name, job_id))
    uploaded = run_cli("upload-artifacts", str(artifacts), "--urls", str(urls_file), env={}, cwd=tmp_path)
    assert uploaded.returncode == 0, uploaded.stderr
    summary = json.loads(uploaded.stdout)
    assert summary["ok"] is True and summary["failed"] == {}
    assert summary["uploaded"] == present
    assert summary["missing"] == ["profiles.json", "relations.json"]
    assert "X-Amz" not in uploaded.stdout + uploaded.stderr
    events = [json.loads(line)["event"] for line in uploaded.stderr.splitlines()]
    assert events.count("uploaded") == len(present)

    downloaded = run_cli("presign", job_id, env=settings_env, cwd=tmp_path)
    assert downloaded.returncode == 0, downloaded.stderr
    download_map = json.loads(downloaded.stdout)
    for name in present:
        assert get(download_map[name]).data == artifact_bytes(name, job_id)
    assert get(download_map["relations.json"]).status == 404


def test_upload_artifacts_with_expired_urls_fails_with_exit_3(
        settings_env: dict[str, str], job_id: str, tmp_path: Path) -> None:
    presigned = run_cli("presign", job_id, "--upload", "--expires", "1", env=settings_env, cwd=tmp_path)
    assert presigned.returncode == 0, presigned.stderr
    urls_file = tmp_path / "urls.json"
    urls_file.write_text(presigned.stdout)
    (tmp_path / "posts.json").write_text("[]")
    wait_past_expiry(json.loads(presigned.stdout)["posts.json"])
    result = run_cli("upload-artifacts", str(tmp_path), "--urls", str(urls_file), env={}, cwd=tmp_path)
    assert result.returncode == EXIT_NOT_AVAILABLE == 3
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and summary["uploaded"] == []
    assert summary["failed"]["posts.json"].startswith("HTTP 403")
    assert "X-Amz" not in result.stdout + result.stderr
    assert json.loads(result.stderr.splitlines()[-1])["event"] == "error"


def test_presign_without_storage_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    result = run_cli("presign", "job-1", env=None, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MINIO_ENDPOINT" in json.loads(lines[0])["message"]


def test_presign_refuses_an_unsafe_job_id_or_expiry(settings_env: dict[str, str], tmp_path: Path) -> None:
    for args in (["../other-job"], ["job-1", "--expires", "0"], ["job-1", "--upload", "--expires", "604801"]):
        result = run_cli("presign", *args, env=settings_env, cwd=tmp_path)
        assert result.returncode == EXIT_USAGE and result.stdout == "", args
