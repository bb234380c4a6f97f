"""Pure logic of `agent.artifacts` and `agent.uploader`: URL sets, expiries, proxy rewrite, validation,
no-op mode, no secret in logs. S3 calls go to moto; uploads go to a scripted local HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import posixpath
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.auth
import pytest
import urllib3
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws

from agent.artifacts import (
    DOWNLOAD_EXPIRES,
    MAX_EXPIRES,
    REPORT_FILE,
    SIM_DATA_FILES,
    UPLOAD_EXPIRES,
    ArtifactDecodeError,
    InvalidArtifactRequest,
    SimDataStorage,
    artifact_key,
    proxy_host_header,
    rewrite_to_proxy,
    storage_not_configured,
    validate_artifact_name,
    validate_expires,
    validate_job_id,
)
from agent.errors import EXIT_NOT_AVAILABLE, EXIT_USAGE, AgentError, ConfigError, NotFoundError
from agent.policy import RetryPolicy
from agent.redact import scrub_queries as scrub
from agent.settings import Settings
from agent.store import Store
from agent.uploader import load_url_map, upload_artifacts, with_attempts

ACCESS_KEY = "AKIAUNITTESTKEY00001"
SECRET_KEY = "unit-test-secret-key/NEVER+LOGGED"
INTERNAL = "minio.internal:9000"
# moto recognises the AWS endpoint without a custom-endpoint registration made at import time.
MOTO_ENDPOINT = "https://s3.us-east-1.amazonaws.com"
STORAGE_PAGE_FILES = (
    "market_curves.json", "agent_trajectories.json", "engagement_summary.json", "top_posts.json",
    "posts.json", "trades.json", "social_graph.json", "profiles.json", "chat_log.json", "relations.json",
)


def make_settings(**extra: str) -> Settings:
    env = {"MINIO_ENDPOINT": INTERNAL, "MINIO_ACCESS_KEY": ACCESS_KEY, "MINIO_SECRET_KEY": SECRET_KEY}
    return Settings.from_env({**env, **extra})


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def storage() -> Iterator[SimDataStorage]:
    with mock_aws():
        yield SimDataStorage(make_settings())


@pytest.fixture
def sdk_storage() -> Iterator[SimDataStorage]:
    """Storage whose SDK calls land in moto's in-memory S3, bucket created."""
    with mock_aws():
        settings = make_settings(MINIO_ENDPOINT=MOTO_ENDPOINT)
        store = Store(settings)
        store.client.create_bucket(Bucket=settings.bucket)
        yield SimDataStorage(settings, store=store)


# ----------------------------------------------------------------------------------------- the file list


def test_sim_data_files_is_the_storage_pages_ten_artifacts_in_order() -> None:
    assert STORAGE_PAGE_FILES == SIM_DATA_FILES
    assert len(set(SIM_DATA_FILES)) == 10
    assert REPORT_FILE == "report.md" and REPORT_FILE not in SIM_DATA_FILES


# ------------------------------------------------------------------------------------------------ URLs


def test_upload_urls_cover_every_file_with_sigv4_puts_expiring_in_14_hours(storage: SimDataStorage) -> None:
    urls = storage.generate_upload_urls("job-42")
    assert urls is not None and list(urls) == list(SIM_DATA_FILES)
    for name, url in urls.items():
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("http", INTERNAL)
        assert parts.path == f"/simswarm/sim-data/job-42/{name}"  # path-style, one object per file
        q = query(url)
        assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"  # SigV4, not SigV2's Signature=
        assert q["X-Amz-Expires"] == str(UPLOAD_EXPIRES) == "50400"
        assert q["X-Amz-SignedHeaders"] == "host"
        assert q["X-Amz-Credential"].startswith(ACCESS_KEY + "/")


def test_upload_and_download_urls_differ_by_method(storage: SimDataStorage) -> None:
    up = storage.generate_upload_urls("j")
    down = storage.generate_download_urls("j", True)
    assert up is not None and down is not None
    assert all(query(up[n])["X-Amz-Signature"] != query(down[n])["X-Amz-Signature"] for n in SIM_DATA_FILES)


def test_download_urls_last_one_hour_and_only_when_sim_data_is_available(storage: SimDataStorage) -> None:
    assert storage.generate_download_urls("job-42", False) is None
    urls = storage.generate_download_urls("job-42", True)
    assert urls is not None and list(urls) == list(SIM_DATA_FILES)
    assert {query(u)["X-Amz-Expires"] for u in urls.values()} == {str(DOWNLOAD_EXPIRES)} == {"3600"}


def test_download_urls_are_rewritten_through_the_proxy_base_keeping_path_and_query() -> None:
    with mock_aws():
        storage = SimDataStorage(make_settings(MINIO_PROXY_BASE="https://app.example.com/minio/"))
        urls = storage.generate_download_urls("job-42", True)
        uploads = storage.generate_upload_urls("job-42")
    assert urls is not None and uploads is not None
    for name, url in urls.items():
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("https", "app.example.com")
        assert parts.path == f"/minio/simswarm/sim-data/job-42/{name}"
        assert query(url)["X-Amz-Expires"] == "3600"
    # By default the pod's upload URLs stay on the internal endpoint.
    assert {urlsplit(u).netloc for u in uploads.values()} == {INTERNAL}


def test_upload_urls_go_through_the_proxy_only_when_asked() -> None:
    with mock_aws():
        storage = SimDataStorage(make_settings(MINIO_PROXY_BASE="https://app.example.com"))
        urls = storage.generate_upload_urls("j", via_proxy=True)
        direct = storage.generate_download_urls("j", True, via_proxy=False)
    assert urls is not None and direct is not None
    assert {urlsplit(u).netloc for u in urls.values()} == {"app.example.com"}
    assert {urlsplit(u).netloc for u in direct.values()} == {INTERNAL}


def test_rewrite_replaces_only_the_origin_byte_for_byte() -> None:
    signed = "http://minio:9000/simswarm/sim-data/j%20b/posts.json?X-Amz-Date=1&X-Amz-Signature=ab%2Fcd"
    assert rewrite_to_proxy(signed, "https://proxy.example") == (
        "https://proxy.example/simswarm/sim-data/j%20b/posts.json?X-Amz-Date=1&X-Amz-Signature=ab%2Fcd")
    assert rewrite_to_proxy(signed, "https://proxy.example:8443/s3/").startswith(
        "https://proxy.example:8443/s3/simswarm/sim-data/j%20b/posts.json?X-Amz-Date=1&")


@pytest.mark.parametrize(("endpoint", "host"), [
    ("minio:9000", "minio:9000"),
    ("http://MinIO.Internal:80", "minio.internal"),
    ("https://s3.example:443", "s3.example"),
    ("https://s3.example:9443", "s3.example:9443"),
    ("http://[::1]:9000", "[::1]:9000"),
])
def test_proxy_host_header_is_the_host_botocore_signs(endpoint: str, host: str) -> None:
    settings = Settings.from_env({"MINIO_ENDPOINT": endpoint})
    assert proxy_host_header(settings) == host
    assert proxy_host_header(settings) == botocore.auth._host_from_url(settings.endpoint_url)  # type: ignore[attr-defined]


def test_expiry_is_bounded_to_sigv4_limits(storage: SimDataStorage) -> None:
    for bad in (0, -1, MAX_EXPIRES + 1, True, 1.5, "60"):
        with pytest.raises(InvalidArtifactRequest):
            validate_expires(bad)
    assert validate_expires(1) == 1
    urls = storage.generate_download_urls("j", True, expires=MAX_EXPIRES)
    assert urls is not None and query(urls["posts.json"])["X-Amz-Expires"] == "604800"
    with pytest.raises(InvalidArtifactRequest):
        storage.generate_upload_urls("j", expires=MAX_EXPIRES + 1)


# ------------------------------------------------------------------------------------------ validation

BAD_IDS = ["", ".", "..", "../x", "a..b", "a/b", "/abs", "a\\b", "a\x00b", "line\nbreak", "tab\t", "\x7f",
           "zero\u200bwidth", "nb\u00a0sp", " lead", "trail ", "x" * 129]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_unsafe_job_ids_are_refused(bad: str, storage: SimDataStorage) -> None:
    with pytest.raises(InvalidArtifactRequest) as info:
        storage.generate_upload_urls(bad)
    assert isinstance(info.value, ValueError) and info.value.exit_code == EXIT_USAGE
    with pytest.raises(InvalidArtifactRequest):
        storage.fetch_artifact(bad, "posts.json")


@pytest.mark.parametrize("good", ["job-42", "0b6f6c1e-8d5c-4a43-9d7b-2a3c0b1d9e7f", "x" * 128, "ünï cödé",
                                  "a.b"])
def test_plain_job_ids_are_accepted(good: str) -> None:
    assert validate_job_id(good) == good
    assert artifact_key(good, "posts.json") == f"sim-data/{good}/posts.json"


@pytest.mark.parametrize("bad", ["../posts.json", "posts.json/", "evil.json", "POSTS.JSON", "", "report.txt",
                                 "sim-data/j/posts.json", 7])
def test_only_known_artifact_names_are_accepted(bad: Any) -> None:
    with pytest.raises(InvalidArtifactRequest):
        validate_artifact_name(bad)


def test_refusal_messages_do_not_echo_control_characters() -> None:
    with pytest.raises(InvalidArtifactRequest) as info:
        validate_job_id("evil\x1b[2Jterm")
    assert "\x1b" not in str(info.value) and "\n" not in info.value.one_line()


def _acceptable(value: str) -> bool:
    return (0 < len(value) <= 128 and value.isprintable() and value != "." and ".." not in value
            and "/" not in value and "\\" not in value and value == value.strip())


@given(st.text(max_size=140) | st.sampled_from(BAD_IDS)
       | st.from_regex(r"[A-Za-z0-9._ /\\-]{0,12}", fullmatch=True))
def test_validator_accepts_exactly_the_names_that_stay_inside_their_prefix(value: str) -> None:
    try:
        validate_job_id(value)
    except InvalidArtifactRequest:
        assert not _acceptable(value)
        return
    assert _acceptable(value)
    key = artifact_key(value, "chat_log.json")
    # The key has exactly three segments and no normalisation (by a client, proxy or server) can move it.
    assert key.split("/") == ["sim-data", value, "chat_log.json"]
    assert posixpath.normpath(key) == key and not key.startswith("/")


# ----------------------------------------------------------------------------------------- no-op mode


def test_without_minio_endpoint_the_generators_return_none_and_the_api_gets_404() -> None:
    storage = SimDataStorage(Settings.from_env({}))
    assert not storage.enabled
    assert storage.generate_upload_urls("job-42") is None
    assert storage.generate_download_urls("job-42", True) is None
    assert storage_not_configured() == (404, {"detail": "Object storage not configured"})
    with pytest.raises(ConfigError) as info:
        storage.fetch_artifact("job-42", "posts.json")
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(ConfigError):
        storage.put_report_md("job-42", "# report")


def test_constructed_without_arguments_it_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MINIO_ENDPOINT", "MINIO_PROXY_BASE", "MINIO_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    assert not SimDataStorage().enabled
    monkeypatch.setenv("MINIO_ENDPOINT", INTERNAL)
    monkeypatch.setenv("MINIO_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("MINIO_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("MINIO_BUCKET", "other-bucket")
    with mock_aws():
        urls = SimDataStorage().generate_upload_urls("j")
    assert urls is not None and urlsplit(urls["posts.json"]).path == "/other-bucket/sim-data/j/posts.json"


# ------------------------------------------------------------------------------------- SDK access (moto)


def test_fetch_artifact_parses_json_and_returns_report_bytes(sdk_storage: SimDataStorage) -> None:
    store = sdk_storage._store
    assert store is not None
    store.put_bytes("sim-data/j/chat_log.json", json.dumps([{"agent": "a", "text": "hé"}]).encode())
    assert sdk_storage.fetch_artifact("j", "chat_log.json") == [{"agent": "a", "text": "hé"}]
    key = sdk_storage.put_report_md("j", "# Report\n\nÜnïcode ✓\n")
    assert key == "sim-data/j/report.md"
    assert sdk_storage.fetch_artifact("j", "report.md") == "# Report\n\nÜnïcode ✓\n".encode()
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ContentType"] == "text/markdown; charset=utf-8"


def test_missing_artifact_is_a_not_found_error_naming_the_object(sdk_storage: SimDataStorage) -> None:
    with pytest.raises(NotFoundError) as info:
        sdk_storage.fetch_artifact("job-7", "relations.json")
    assert isinstance(info.value, FileNotFoundError) and info.value.exit_code == EXIT_NOT_AVAILABLE
    assert "relations.json" in str(info.value) and "job-7" in str(info.value)


def test_malformed_json_artifact_is_a_decode_error(sdk_storage: SimDataStorage) -> None:
    store = sdk_storage._store
    assert store is not None
    store.put_bytes("sim-data/j/posts.json", b"{not json")
    with pytest.raises(ArtifactDecodeError):
        sdk_storage.fetch_artifact("j", "posts.json")
    store.put_bytes("sim-data/j/trades.json", b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactDecodeError):
        sdk_storage.fetch_artifact("j", "trades.json")


def test_report_text_must_be_str(sdk_storage: SimDataStorage) -> None:
    with pytest.raises(InvalidArtifactRequest):
        sdk_storage.put_report_md("j", b"# bytes")  # type: ignore[arg-type]


def test_no_secret_or_signature_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, botocore's signing steps, urllib3's request lines
    with mock_aws():
        settings = make_settings(MINIO_ENDPOINT=MOTO_ENDPOINT, MINIO_PROXY_BASE="https://proxy.example")
        store = Store(settings)
        store.client.create_bucket(Bucket=settings.bucket)
        storage = SimDataStorage(settings, store=store)
        urls = {**(storage.generate_upload_urls("j") or {}),
                **(storage.generate_download_urls("j", True) or {})}
        storage.put_report_md("j", "# r")
        storage.fetch_artifact("j", "report.md")
        with pytest.raises(NotFoundError):
            storage.fetch_artifact("j", "posts.json")
    signatures = {query(u)["X-Amz-Signature"] for u in urls.values()}
    everything = "\n".join(r.getMessage() for r in caplog.records)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("agent"))
    assert "presigned 10 get_object URLs" in ours  # the module does log, just never the secrets
    assert "Signature:\n<redacted>" in everything  # botocore logged its signing steps, redacted
    for secret in (SECRET_KEY, *signatures):
        assert secret not in everything
    assert "X-Amz-Credential" not in ours and "X-Amz-Signature" not in ours


def test_upload_logs_no_signature_even_at_debug(
        tmp_path: Path, scripted: tuple[str, type[ScriptedS3]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    base, _ = scripted
    signature = "ab12" * 16
    url = f"{base}/b/posts.json?X-Amz-Credential=AKIA&X-Amz-Signature={signature}"
    assert upload_artifacts(_artifacts(tmp_path, ["posts.json"]), {"posts.json": url}).ok
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "X-Amz-Signature=<redacted>" in everything  # urllib3's request line, rewritten
    assert signature not in everything


# ------------------------------------------------------------------------------------------- uploader


class ScriptedS3(http.server.BaseHTTPRequestHandler):
    """Answers PUTs with the next status of `script` (then 200), recording each request."""

    script: list[int] = []
    seen: list[tuple[str, str, bytes]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.path, self.headers.get("Content-Type", ""), body))
        status = type(self).script.pop(0) if type(self).script else 200
        payload = b"" if status == 200 else b"<Error><Code>AccessDenied</Code></Error>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[ScriptedS3]]]:
    handler = type("Handler", (ScriptedS3,), {"script": [], "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def _artifacts(tmp_path: Path, names: list[str]) -> Path:
    for name in names:
        (tmp_path / name).write_text(json.dumps({"file": name}))
    return tmp_path


def test_uploader_puts_present_files_and_reports_missing_ones(
        tmp_path: Path, scripted: tuple[str, type[ScriptedS3]]) -> None:
    base, handler = scripted
    urls = {name: f"{base}/b/{name}?X-Amz-Signature=s3cr3t" for name in SIM_DATA_FILES}
    directory = _artifacts(tmp_path, ["posts.json", "chat_log.json"])
    summary = upload_artifacts(directory, urls, sleep=lambda _: None)
    assert summary.ok and sorted(summary.uploaded) == ["chat_log.json", "posts.json"]
    assert summary.missing == [n for n in SIM_DATA_FILES if n not in {"posts.json", "chat_log.json"}]
    assert {(p.split("?")[0], ctype) for p, ctype, _ in handler.seen} == {
        ("/b/posts.json", "application/json"), ("/b/chat_log.json", "application/json")}
    assert summary.bytes_uploaded == sum(len(b) for _, _, b in handler.seen)


def test_uploader_retries_server_errors_with_jittered_backoff(
        tmp_path: Path, scripted: tuple[str, type[ScriptedS3]]) -> None:
    base, handler = scripted
    handler.script = [500, 503]
    sleeps: list[float] = []
    policy = RetryPolicy(max_retries=2, base=0.5, cap=10.0)
    summary = upload_artifacts(_artifacts(tmp_path, ["posts.json"]), {"posts.json": f"{base}/b/posts.json"},
                               policy=policy, sleep=sleeps.append)
    assert summary.uploaded == ["posts.json"] and len(handler.seen) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_uploader_does_not_retry_a_refused_url_and_never_reports_its_query(
        tmp_path: Path, scripted: tuple[str, type[ScriptedS3]]) -> None:
    base, handler = scripted
    handler.script = [403]
    url = f"{base}/b/posts.json?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef"
    events: list[tuple[str, str, Any]] = []
    summary = upload_artifacts(_artifacts(tmp_path, ["posts.json"]), {"posts.json": url},
                               sleep=lambda _: None, on_event=lambda *e: events.append(e))
    assert not summary.ok and summary.failed == {"posts.json": "HTTP 403 (AccessDenied)"}
    assert len(handler.seen) == 1
    text = json.dumps(summary.as_dict()) + repr(events)
    assert "deadbeef" not in text and "X-Amz" not in text


def test_uploader_retries_connection_errors_then_fails(tmp_path: Path) -> None:
    with urllib3.PoolManager() as http_pool:
        sleeps: list[float] = []
        url = "http://127.0.0.1:1/b/posts.json?X-Amz-Signature=deadbeef"  # port 1: connection refused
        summary = upload_artifacts(_artifacts(tmp_path, ["posts.json"]), {"posts.json": url}, http=http_pool,
                                   policy=with_attempts(4), sleep=sleeps.append)
    assert len(sleeps) == 3
    reason = summary.failed["posts.json"]
    assert reason.startswith("connection error") and "after 4 attempts" in reason and "deadbeef" not in reason


def test_retry_delay_is_full_jitter_capped() -> None:
    policy = RetryPolicy(base=1.0, cap=4.0)
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(8) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays) and max(delays) > 3.0 and min(delays) < 0.5


def test_url_map_is_checked_before_any_file_is_read(tmp_path: Path) -> None:
    good = tmp_path / "urls.json"
    good.write_text(json.dumps({"posts.json": "http://h/b/posts.json?sig=1"}))
    assert load_url_map(good) == {"posts.json": "http://h/b/posts.json?sig=1"}
    bad_maps: list[Any] = [{"../etc/passwd": "http://h/x"}, {"posts.json": "file:///etc/passwd"},
                           {"posts.json": 3}, [], {}]
    for bad in bad_maps:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(AgentError) as info:
            load_url_map(path)
        assert info.value.exit_code == EXIT_USAGE
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError):
        load_url_map(tmp_path / "broken.json")


def test_scrub_removes_query_strings_from_messages() -> None:
    text = "Max retries exceeded with url: /b/k?X-Amz-Signature=abc&X-Amz-Credential=AKIA (Caused by x)"
    assert "abc" not in scrub(text) and "AKIA" not in scrub(text) and "(Caused by x)" in scrub(text)
