"""Presigned artifact URLs rewritten through MINIO_PROXY_BASE still verify, proven through a real nginx.

The URLs are signed against the internal endpoint and nginx forwards with `proxy_set_header Host <signed
host>` and the request URI unchanged (see `agent.artifacts`). A proxy that passes the client's Host
through instead breaks every signature: that case is here too, so the tests show which setting matters.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import urllib3

from agent.artifacts import SIM_DATA_FILES, SimDataStorage, proxy_host_header
from agent.settings import Settings
from agent.uploader import upload_artifacts
from tests.support.nginx import NginxProxy, nginx_binary

pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (Debian: apt-get install nginx-light)")

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))


@pytest.fixture
def direct(settings_env: dict[str, str]) -> SimDataStorage:
    return SimDataStorage(Settings.from_env(settings_env))


def start_proxy(tmp_path: Path, settings_env: dict[str, str], *, prefix: str = "",
                pass_client_host: bool = False) -> NginxProxy:
    settings = Settings.from_env(settings_env)
    assert settings.endpoint_url is not None
    host = None if pass_client_host else proxy_host_header(settings)
    return NginxProxy(tmp_path / "nginx", settings.endpoint_url, host_header=host, prefix=prefix).start()


def via(settings_env: dict[str, str], proxy: NginxProxy) -> SimDataStorage:
    """The API's storage with MINIO_PROXY_BASE pointing at the proxy."""
    return SimDataStorage(Settings.from_env({**settings_env, "MINIO_PROXY_BASE": proxy.base_url}))


def upload_all(storage: SimDataStorage, job_id: str) -> dict[str, bytes]:
    contents = {name: json.dumps({"file": name, "job": job_id}).encode() for name in SIM_DATA_FILES}
    urls = storage.generate_upload_urls(job_id)
    assert urls is not None
    for name, url in urls.items():
        assert HTTP.request("PUT", url, body=contents[name]).status == 200
    return contents


def test_rewritten_download_urls_verify_through_nginx_setting_the_signed_host(
        tmp_path: Path, settings_env: dict[str, str], direct: SimDataStorage) -> None:
    job_id = "job-" + secrets.token_hex(6)
    contents = upload_all(direct, job_id)
    proxy = start_proxy(tmp_path, settings_env)
    try:
        urls = via(settings_env, proxy).generate_download_urls(job_id, sim_data_available=True)
        assert urls is not None and list(urls) == list(SIM_DATA_FILES)
        for name, url in urls.items():
            assert url.startswith(proxy.base_url + "/")  # the browser only ever sees the proxy
            response = HTTP.request("GET", url)
            assert response.status == 200, (name, response.data[:300], proxy.log_tail())
            assert response.data == contents[name]
        # Still a real signature check behind the proxy: a flipped signature is refused.
        tampered = urls["posts.json"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
        assert HTTP.request("GET", tampered).status == 403
    finally:
        proxy.stop()
    access_log = proxy.log_tail("access.log", limit=100_000)
    assert access_log.count('"GET /') == len(SIM_DATA_FILES) + 1  # every request went through nginx
    assert "X-Amz-Signature" not in access_log  # the example config logs no query strings


def test_a_proxy_base_with_a_path_prefix_and_an_awkward_job_id(
        tmp_path: Path, settings_env: dict[str, str], direct: SimDataStorage) -> None:
    job_id = "job 42+(x)~ü!'*,;=@$&"  # printable, so accepted: must survive percent-encoding via nginx
    contents = upload_all(direct, job_id)
    proxy = start_proxy(tmp_path, settings_env, prefix="/minio")
    try:
        urls = via(settings_env, proxy).generate_download_urls(job_id, True)
        assert urls is not None
        assert urlsplit(urls["trades.json"]).path.startswith("/minio/")
        for name in ("trades.json", "chat_log.json"):
            response = HTTP.request("GET", urls[name])
            assert response.status == 200, (response.data[:300], proxy.log_tail())
            assert response.data == contents[name]
    finally:
        proxy.stop()


def test_passing_the_client_host_through_breaks_the_signature(
        tmp_path: Path, settings_env: dict[str, str], direct: SimDataStorage) -> None:
    job_id = "job-" + secrets.token_hex(6)
    upload_all(direct, job_id)
    # The other common setup, `proxy_set_header Host $http_host`, with URLs signed for the internal host:
    proxy = start_proxy(tmp_path, settings_env, pass_client_host=True)
    try:
        urls = via(settings_env, proxy).generate_download_urls(job_id, True)
        assert urls is not None
        response = HTTP.request("GET", urls["posts.json"])
        assert response.status == 403
        assert b"SignatureDoesNotMatch" in response.data
    finally:
        proxy.stop()


def test_upload_urls_through_the_proxy_take_large_puts(
        tmp_path: Path, settings_env: dict[str, str], direct: SimDataStorage) -> None:
    job_id = "job-" + secrets.token_hex(6)
    proxy = start_proxy(tmp_path, settings_env)
    try:
        urls = via(settings_env, proxy).generate_upload_urls(job_id, via_proxy=True)
        assert urls is not None and all(u.startswith(proxy.base_url + "/") for u in urls.values())
        # 3 MiB: more than nginx's default client_max_body_size (1 MiB), which would answer 413.
        posts = [{"id": i, "text": "x" * 100} for i in range(3 * 1024 * 1024 // 120)]
        artifacts = tmp_path / "out"
        artifacts.mkdir()
        (artifacts / "posts.json").write_text(json.dumps(posts))
        (artifacts / "trades.json").write_text("[]")
        summary = upload_artifacts(artifacts, urls, http=HTTP)
        assert summary.ok, (summary.failed, proxy.log_tail())
        assert sorted(summary.uploaded) == ["posts.json", "trades.json"]
        assert summary.bytes_uploaded > 3 * 1024 * 1024 - 200_000
    finally:
        proxy.stop()
    assert direct.fetch_artifact(job_id, "posts.json") == posts
    assert direct.fetch_artifact(job_id, "trades.json") == []
