"""The in-memory bucket and engine the unit tests use are faithful stand-ins: mypy finds they fit the
agent's storage interface (`agent.s3read.ObjectStore`) and engine contract, and the bucket answers as the
real readers do."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import NotFoundError, StorageUnavailableError
from tests.support.fake_store import FakeStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_the_fakes_fit_the_storage_interface_and_the_engine_contract_by_mypy() -> None:
    argv = [sys.executable, "-m", "mypy", "--explicit-package-bases", "tests/support/fake_store.py"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_fake_store_lists_reads_and_presigns_like_a_bucket() -> None:
    store = FakeStore()
    store.put_bytes("models/hf-cache/models--a--b/refs/main", b"x" * 40)
    store.put_bytes("models/hf-cache/models--a--b/blobs/k", b"data", metadata={"sha256": "s"})
    store.put_bytes("models/hf-cache/models--c--d/refs/main", b"y" * 40)
    assert store.list_prefixes("models/hf-cache/") == ["models/hf-cache/models--a--b/",
                                                       "models/hf-cache/models--c--d/"]
    assert [o.key for o in store.list_objects("models/hf-cache/models--a--b/")] == [
        "models/hf-cache/models--a--b/blobs/k", "models/hf-cache/models--a--b/refs/main"]
    blob = "models/hf-cache/models--a--b/blobs/k"
    assert store.head_metadata(blob) == {"sha256": "s", "content-length": "4"}
    assert store.head("models/hf-cache/none") is None
    url = store.presign("models/hf-cache/models--a--b/blobs/k")
    assert store.key_of(url) == "models/hf-cache/models--a--b/blobs/k"
    with pytest.raises(NotFoundError):
        store.get_bytes("models/hf-cache/none")
    store.failure = StorageUnavailableError("down")
    with pytest.raises(StorageUnavailableError):
        list(store.list_objects(""))
