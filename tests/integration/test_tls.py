"""TLS with a private CA: one rule of trust for every command and engine, through a real nginx.

nginx terminates TLS in front of the session's SeaweedFS with a certificate for 127.0.0.1 from a CA made
in the test (`tls_endpoint`, tests/support/tls.py); `MINIO_ENDPOINT` is its https URL. The rule
(README "Configuration", TLS): `AWS_CA_BUNDLE` wins; else `SSL_CERT_FILE` with `SSL_CERT_DIR`; else the
system store. A certificate that is not trusted is a setting a person must fix: exit 2, one line naming
the certificate problem and `AWS_CA_BUNDLE`, no retry, no Hub fallback.

The environment of every agent run is built from scratch for the trust variables: this machine's own
environment sets all three to the system store.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import urllib3

from agent.artifacts import SimDataStorage
from agent.demo.seaweed import SeaweedServer
from agent.engines.native import NativeEngine
from agent.engines.python import PythonEngine
from agent.engines.s5cmd import S5cmdEngine
from agent.errors import UntrustedCertificateError
from agent.pull import PullOptions, pull_from_store
from agent.settings import TRUST_ENV, Settings
from tests.support.cli import clean_env, hub_agent_env, run_agent
from tests.support.fake_hub import FakeHub
from tests.support.hf_cache import assert_clean_cache
from tests.support.staged import NATIVE, S5CMD, quiet
from tests.support.tls import TlsEndpoint

ENGINES = ["auto", NATIVE, "python", S5CMD]
CA_HINT = "set AWS_CA_BUNDLE to the PEM file of the CA"


def tls_env(s3_server: SeaweedServer, tls: TlsEndpoint, bucket: str, *, endpoint: str | None = None,
            **trust: str) -> dict[str, str]:
    """The agent's environment for `bucket` behind nginx's https, trusting exactly `trust`."""
    env = {k: v for k, v in clean_env().items() if k not in TRUST_ENV}
    env.update(s3_server.env(bucket), MINIO_ENDPOINT=endpoint or tls.url, MINIO_SECURE="true", **trust)
    return env


def trust_of(tls: TlsEndpoint, variable: str) -> dict[str, str]:
    """The CA in `variable`, or (`none`) nowhere: the system store, which does not hold it."""
    return {} if variable == "none" else {variable: str(tls.pki.ca)}


def pull(env: dict[str, str], repo_id: str, engine: str, home: Path,
         *extra: str) -> subprocess.CompletedProcess[str]:
    return run_agent("--log-format", "json", "pull", repo_id, "--engine", engine, "--hf-home", str(home),
                     "--report", str(home / "report.json"), *extra, env=env, timeout=60)


def assert_untrusted(done: subprocess.CompletedProcess[str], problem: str = "not trusted") -> str:
    """Exit 2 and one error line naming the certificate problem and how trust is given."""
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"event": "error"' in line]
    assert len(errors) == 1, done.stderr[-3000:]
    message = f"{errors[0]['message']} ({errors[0].get('hint', '')})"
    assert "TLS certificate is not trusted" in message and problem in message and CA_HINT in message, message
    assert "X-Amz-Signature" not in done.stderr and "stalled" not in message, message
    return message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variable", ["AWS_CA_BUNDLE", "SSL_CERT_FILE", "none"])
def test_every_engine_trusts_the_ca_named_by_the_rule(
        engine: str, variable: str, tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], fake_hub: FakeHub, tmp_path: Path) -> None:
    """The CA in AWS_CA_BUNDLE or SSL_CERT_FILE: the pull (listing, manifest and bytes) succeeds. The CA
    nowhere: exit 2 at once, with the Hub fallback allowed and a Hub that holds the model."""
    env = tls_env(s3_server, tls_endpoint, staged_bucket, **trust_of(tls_endpoint, variable))
    if variable == "none":
        hub = {k: v for k, v in hub_agent_env(fake_hub, tmp_path, env).items() if k not in TRUST_ENV}
        env = {**hub, **env}  # a Hub that would deliver the model, were it asked
        asked = fake_hub.count(path_contains=model_repo[0])
        started = time.monotonic()
        done = pull(env, model_repo[0], engine, tmp_path)
        message = assert_untrusted(done, "signed by a CA that is not trusted")
        assert "the system store" in message
        assert fake_hub.count(path_contains=model_repo[0]) == asked  # the Hub was never asked
        assert time.monotonic() - started < 20  # no retries, no stall deadline waited out
        return
    done = pull(env, model_repo[0], engine, tmp_path, "--no-fallback")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == "minio" and report["bytes_downloaded"] > 0
    assert_clean_cache(tmp_path / "hub")


@pytest.mark.parametrize("engine", ["native", "python", S5CMD])
def test_each_engine_refuses_the_certificate_itself(
        engine: str, tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """The listing trusts the CA, the engine does not: its own refusal is exit 2's error too, at once
    (above, the listing refuses first and the engine never runs)."""
    env = tls_env(s3_server, tls_endpoint, staged_bucket, AWS_CA_BUNDLE=str(tls_endpoint.pki.ca),
                  HF_HOME=str(tmp_path))
    trusting = Settings.from_env(env)
    other = Settings.from_env({**env, "AWS_CA_BUNDLE": str(tls_endpoint.pki.other_ca)})
    classes = {"native": NativeEngine, "python": PythonEngine, "s5cmd": S5cmdEngine}
    untrusting = classes[engine].from_settings(other)
    started = time.monotonic()
    with pytest.raises(UntrustedCertificateError) as raised:
        pull_from_store(trusting, PullOptions(model_repo[0], engine=engine), quiet(), engine=untrusting)
    assert "signed by a CA that is not trusted" in str(raised.value)
    assert f"AWS_CA_BUNDLE={tls_endpoint.pki.other_ca}" in str(raised.value)
    assert "?" not in str(raised.value)  # no presigned query string
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("engine", ["native", "python", S5CMD])
def test_aws_ca_bundle_wins_over_ssl_cert_file(
        engine: str, tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """AWS_CA_BUNDLE naming another CA is what counts, even with the right one in SSL_CERT_FILE."""
    env = tls_env(s3_server, tls_endpoint, staged_bucket, AWS_CA_BUNDLE=str(tls_endpoint.pki.other_ca),
                  SSL_CERT_FILE=str(tls_endpoint.pki.ca))
    message = assert_untrusted(pull(env, model_repo[0], engine, tmp_path, "--no-fallback"))
    assert f"AWS_CA_BUNDLE={tls_endpoint.pki.other_ca}" in message


@pytest.mark.parametrize("engine", ["native", "python", S5CMD])
def test_ssl_cert_dir_alone_is_trusted(
        engine: str, tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    folder = tls_endpoint.pki.hashed_folder(tmp_path / "certs")
    env = tls_env(s3_server, tls_endpoint, staged_bucket, SSL_CERT_DIR=str(folder))
    done = pull(env, model_repo[0], engine, tmp_path / "home", "--no-fallback")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("engine", ["native", "python", S5CMD])
def test_a_certificate_for_another_host_is_refused(
        engine: str, tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """The certificate names 127.0.0.1 only: reached as `localhost`, it is a host name mismatch."""
    endpoint = tls_endpoint.url.replace("127.0.0.1", "localhost")
    env = tls_env(s3_server, tls_endpoint, staged_bucket, endpoint=endpoint,
                  AWS_CA_BUNDLE=str(tls_endpoint.pki.ca))
    assert_untrusted(pull(env, model_repo[0], engine, tmp_path, "--no-fallback"), "another host name")


def test_a_ca_bundle_that_is_not_a_pem_file_is_a_configuration_error(
        tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str],
        tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("")
    for bundle, why in ((tmp_path / "missing.pem", "cannot read it"), (tmp_path / "empty.pem", "no PEM")):
        env = tls_env(s3_server, tls_endpoint, staged_bucket, AWS_CA_BUNDLE=str(bundle))
        done = pull(env, model_repo[0], "auto", tmp_path)
        assert done.returncode == 2 and why in done.stderr and CA_HINT in done.stderr, done.stderr[-2000:]


def test_stage_list_and_verify_trust_aws_ca_bundle(
        tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, bucket: str, hf_cache: Path,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """stage (boto3: HEADs, PUTs, multipart), list and verify (the bucket's manifest) over https."""
    repo_id, _ = model_repo
    env = tls_env(s3_server, tls_endpoint, bucket, AWS_CA_BUNDLE=str(tls_endpoint.pki.ca))
    bare = tls_env(s3_server, tls_endpoint, bucket)
    assert_untrusted(run_agent("--log-format", "json", "stage", repo_id, "--from-cache", str(hf_cache),
                               env=bare, timeout=60))
    done = run_agent("--log-format", "json", "stage", repo_id, "--from-cache", str(hf_cache), env=env,
                     timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = run_agent("--log-format", "json", "list", "--json", env=env, timeout=60)
    assert listed.returncode == 0 and repo_id in listed.stdout, listed.stderr[-3000:]
    assert_untrusted(run_agent("--log-format", "json", "list", env=bare, timeout=60))

    home = tmp_path / "home"
    assert pull(env, repo_id, "auto", home, "--no-fallback").returncode == 0
    for tree in (home / "hub").glob("models--*/trees/*.json"):
        tree.unlink()  # so verify reads the manifest from the bucket
    checked = run_agent("--log-format", "json", "verify", repo_id, "--hf-home", str(home), env=env,
                        timeout=60)
    assert checked.returncode == 0 and "manifest from bucket" in checked.stderr, checked.stderr[-3000:]
    assert_untrusted(run_agent("--log-format", "json", "verify", repo_id, "--hf-home", str(home), env=bare,
                               timeout=60))


def test_stage_trusts_ssl_cert_dir_alone(
        tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, bucket: str, hf_cache: Path,
        model_repo: tuple[str, str], tmp_path: Path) -> None:
    """botocore's `verify=` takes a file only: the folder is given to its uploads' connections too."""
    folder = tls_endpoint.pki.hashed_folder(tmp_path / "certs")
    env = tls_env(s3_server, tls_endpoint, bucket, SSL_CERT_DIR=str(folder))
    done = run_agent("--log-format", "json", "stage", model_repo[0], "--from-cache", str(hf_cache), env=env,
                     timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


def test_presign_and_the_artifacts_module_trust_aws_ca_bundle(
        tls_endpoint: TlsEndpoint, s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """`presign` prints https URLs that a client trusting the same CA uses (a GPU pod's PUT, a browser's
    GET); the API's module reads and writes artifacts through boto3 over https, and refuses at once
    (no minute of botocore retries) when it does not trust the certificate."""
    job_id = "job-" + secrets.token_hex(6)
    env = tls_env(s3_server, tls_endpoint, bucket, AWS_CA_BUNDLE=str(tls_endpoint.pki.ca))
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(tls_endpoint.pki.ca), retries=False)
    body = json.dumps({"job": job_id}).encode()

    uploads = run_agent("--log-format", "json", "presign", job_id, "--upload", env=env, timeout=60)
    assert uploads.returncode == 0, uploads.stderr[-3000:]
    put_url = json.loads(uploads.stdout)["market_curves.json"]
    assert put_url.startswith(tls_endpoint.url + "/")
    assert http.request("PUT", put_url, body=body).status == 200
    downloads = run_agent("--log-format", "json", "presign", job_id, "--direct", env=env, timeout=60)
    assert downloads.returncode == 0, downloads.stderr[-3000:]
    answer = http.request("GET", json.loads(downloads.stdout)["market_curves.json"])
    assert answer.status == 200 and answer.data == body

    storage = SimDataStorage(Settings.from_env(env))
    assert storage.fetch_artifact(job_id, "market_curves.json") == {"job": job_id}
    storage.put_report_md(job_id, "# report\n")
    assert storage.fetch_artifact(job_id, "report.md") == b"# report\n"
    untrusting = SimDataStorage(Settings.from_env(tls_env(s3_server, tls_endpoint, bucket)))
    started = time.monotonic()
    with pytest.raises(UntrustedCertificateError, match="signed by a CA that is not trusted"):
        untrusting.fetch_artifact(job_id, "report.md")
    with pytest.raises(UntrustedCertificateError, match="signed by a CA that is not trusted"):
        untrusting.put_report_md(job_id, "# other\n")
    assert time.monotonic() - started < 10
