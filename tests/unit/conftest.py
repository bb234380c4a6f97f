"""Fixtures for the unit tests of the pull's decisions: a small model in a hub cache, and an in-memory
bucket (`tests.support.fake_store.FakeStore`) it is staged into with the real `stage`. No server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.demo.seed import fake_commit, seed_cache
from agent.manifest import Manifest
from agent.remote import RemoteRepo
from agent.settings import Settings
from agent.stage import stage_from_cache
from tests.support.fake_store import FakeStore
from tests.support.staged import quiet

REPO = "simswarm-test/unit-llama"
COMMIT = fake_commit(REPO)
UNIT_PART = 1 << 16  # parts of 64 KiB (the smallest a sidecar takes): the weights are several


@pytest.fixture(scope="session")
def unit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder: two configs with the same bytes (one blob, two paths), a tokenizer, and weights
    of 270 KiB of noise in two shards (several parts each)."""
    model = tmp_path_factory.mktemp("unit-model")
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "original").mkdir()
    (model / "original" / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (model / "model-00001-of-00002.safetensors").write_bytes(os.urandom(200 * 1024 + 7))
    (model / "model-00002-of-00002.safetensors").write_bytes(os.urandom(70 * 1024))
    return model


@pytest.fixture(scope="session")
def unit_cache(unit_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding `unit_model` as REPO@COMMIT, refs/main pointing at it. Read-only by convention."""
    hub = tmp_path_factory.mktemp("unit-hub") / "hub"
    seed_cache(unit_model, hub, REPO, COMMIT)
    return hub


@pytest.fixture
def store(unit_cache: Path) -> FakeStore:
    """A fresh in-memory bucket with the model staged in compact form (manifest, part digests, ref)."""
    fake = FakeStore()
    stage_from_cache(fake, unit_cache, REPO, "main", quiet(), part_size=UNIT_PART)
    fake.reads.clear()
    return fake


@pytest.fixture
def staged_manifest(store: FakeStore) -> Manifest:
    """The staged model's manifest, as the bucket holds it."""
    snap = RemoteRepo(store, REPO).load()
    store.reads.clear()
    return snap.manifest


@pytest.fixture
def pod_env(tmp_path: Path) -> dict[str, str]:
    """A pod's environment: object storage configured (the fake bucket stands in for it), an empty cache."""
    return {"MINIO_ENDPOINT": "fake-s3.invalid:9000", "MINIO_ACCESS_KEY": "unit-key",
            "MINIO_SECRET_KEY": "unit-secret", "MINIO_BUCKET": "fake-bucket",
            "HF_HOME": str(tmp_path / "hf-home")}


@pytest.fixture
def pod(pod_env: dict[str, str]) -> Settings:
    return Settings.from_env(pod_env)
