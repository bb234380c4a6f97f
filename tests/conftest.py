"""Shared fixtures: a real S3 server (SeaweedFS), a fake Hugging Face Hub, a tiny real model, and a
Hugging Face cache written by huggingface_hub itself.

Expensive things are session-scoped and lazy: the S3 server starts only when a test asks for it
(about 4-10 s), once per session; each test then gets its own bucket and its own HF_HOME, so tests
never see each other's objects or files. A module whose tests only read a staged model shares one
(`staged_bucket`, staged once per module).
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.support` must import however pytest was started (`pytest` or `python -m pytest`).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.model import generate_model  # noqa: E402
from agent.demo.seaweed import SeaweedServer  # noqa: E402
from agent.manifest import Manifest  # noqa: E402
from agent.settings import DEFAULT_BUCKET, Settings  # noqa: E402
from agent.stage import stage_from_cache  # noqa: E402
from agent.store import Store  # noqa: E402
from tests.support.fake_hub import FakeHub, read_tree  # noqa: E402
from tests.support.hf_cache import build_hf_cache  # noqa: E402
from tests.support.staged import bucket_manifest, quiet, stage  # noqa: E402
from tests.support.tls import TlsEndpoint  # noqa: E402

TINY_REPO_ID = "simswarm-test/tiny-llama"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the whole session, with the default bucket `simswarm` created."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket(DEFAULT_BUCKET)
        yield server


@pytest.fixture
def bucket(s3_server: SeaweedServer) -> str:
    """A fresh, empty bucket of this test's own on the session's server."""
    return s3_server.create_bucket(f"t-{secrets.token_hex(6)}")


@pytest.fixture
def settings_env(s3_server: SeaweedServer, bucket: str, tmp_path: Path) -> dict[str, str]:
    """The agent's environment for this test: MINIO_* for `bucket`, HF_HOME inside tmp_path."""
    return {**s3_server.env(bucket=bucket), "HF_HOME": str(tmp_path / "hf-home")}


@pytest.fixture
def settings(settings_env: dict[str, str]) -> Settings:
    return Settings.from_env(settings_env)


@pytest.fixture(scope="session")
def fake_hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a generated tiny Llama (2 shards of ~256 KiB). Read-only by convention."""
    dest = tmp_path_factory.mktemp("tiny-model")
    generate_model(dest)
    return dest


@pytest.fixture(scope="session")
def model_repo(fake_hub: FakeHub, tiny_model: Path) -> tuple[str, str]:
    """The tiny model published on the fake Hub: (repo_id, commit)."""
    return TINY_REPO_ID, fake_hub.add_repo(TINY_REPO_ID, read_tree(tiny_model))


@pytest.fixture(scope="session")
def hf_cache_ro(fake_hub: FakeHub, model_repo: tuple[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache dir ($HF_HOME/hub) holding the tiny model, written by the real snapshot_download.
    Shared by the session: never modify it; use `hf_cache` for a private copy."""
    cache_dir = tmp_path_factory.mktemp("hf-home-ro") / "hub"
    build_hf_cache(fake_hub, model_repo[0], cache_dir)
    return cache_dir


@pytest.fixture
def hf_cache(hf_cache_ro: Path, tmp_path: Path) -> Path:
    """A private copy of `hf_cache_ro`, symlinks kept, at tmp_path/seed-hf-home/hub: mutate freely.

    Deliberately not the HF_HOME of `settings_env`, so stage-then-pull tests start from an empty cache;
    `settings.with_hf_home(hf_cache.parent)` points the agent at this one instead."""
    cache_dir = tmp_path / "seed-hf-home" / "hub"
    shutil.copytree(hf_cache_ro, cache_dir, symlinks=True)
    return cache_dir


@pytest.fixture(scope="module")
def staged_bucket(s3_server: SeaweedServer, hf_cache_ro: Path, model_repo: tuple[str, str]) -> str:
    """A bucket of this module's own holding the tiny model, staged once (compact form, 64 KiB part
    digests), for tests that only read it or put back what they change."""
    bucket = s3_server.create_bucket(f"t-{secrets.token_hex(6)}")
    stage(Settings.from_env(s3_server.env(bucket)), hf_cache_ro, model_repo[0])
    return bucket


@pytest.fixture(scope="module")
def manifest(s3_server: SeaweedServer, staged_bucket: str, model_repo: tuple[str, str]) -> Manifest:
    """The manifest of the model in `staged_bucket`."""
    return bucket_manifest(Settings.from_env(s3_server.env(staged_bucket)), model_repo[0])


@pytest.fixture
def staged(settings: Settings, hf_cache: Path, model_repo: tuple[str, str]) -> tuple[str, str]:
    """The tiny model staged in this test's own bucket (default part size): (repo_id, commit)."""
    stage_from_cache(Store(settings), hf_cache, model_repo[0], "main", quiet())
    return model_repo


@pytest.fixture(scope="session")
def tls_endpoint(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEndpoint]:
    """nginx terminating TLS in front of the session's SeaweedFS, with a certificate for 127.0.0.1 from a CA
    made here (tests/support/tls.py); the client's Host passes through, as SigV4 signed it."""
    from tests.support.nginx import NginxProxy, nginx_binary
    from tests.support.tls import make_pki, openssl_available

    if nginx_binary() is None or not openssl_available():
        pytest.skip("nginx or openssl is not installed")
    root = tmp_path_factory.mktemp("tls")
    pki = make_pki(root / "pki")
    with NginxProxy(root / "nginx", s3_server.endpoint_url, host_header=None,
                    tls=(pki.certificate, pki.key)) as proxy:
        yield TlsEndpoint(proxy.base_url, pki)
