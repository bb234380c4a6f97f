"""What an engine is (agent.engines.base): every engine declares the same attributes and is built the same
way, and the orchestration signs a URL only for an engine that reads URLs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.cache import RepoCache
from agent.engines import pick_engine
from agent.engines.base import BlobJob, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.engines.native import NativeEngine
from agent.engines.python import PythonEngine
from agent.engines.s5cmd import S5cmdEngine
from agent.fetch import Fetch
from agent.finish import CheckPolicy
from agent.manifest import FileEntry, Manifest, git_blob_sha1, lfs_pointer
from agent.output import Output
from agent.plan import make_plan
from agent.remote import StagedSnapshot

CONTRACT = ("name", "reads_urls", "writes_in_place", "checks_parts", "hashes_blobs", "records_digests",
            "resumes_in_parts")
DATA = b"weights" * 1000


@pytest.mark.parametrize("engine_cls", [NativeEngine, PythonEngine, S5cmdEngine])
def test_every_engine_declares_the_contract_and_is_built_from_settings(engine_cls: type) -> None:
    engine = engine_cls.from_settings(None)
    assert isinstance(engine, engine_cls)
    assert all(isinstance(getattr(engine, attr), bool) for attr in CONTRACT[1:])
    assert isinstance(engine.available(), bool)
    # Only an engine that reads keys itself writes whole objects: the two differences go together.
    assert engine.reads_urls == engine.writes_in_place


def test_pick_engine_builds_the_python_engine_like_any_other() -> None:
    engine = pick_engine("python")
    assert isinstance(engine, PythonEngine) and engine.reads_urls


class RecordingReader:
    def __init__(self) -> None:
        self.signed: list[str] = []

    def presign(self, key: str, expires: int) -> str:
        self.signed.append(key)
        return f"http://bucket/{key}?X-Amz-Signature=secret"


class CopyEngine:
    """Writes each job's whole object in place, as an engine that reads keys itself would."""

    name = "copy"
    writes_in_place = True
    checks_parts = False
    hashes_blobs = False
    records_digests = False
    resumes_in_parts = False

    def __init__(self, reads_urls: bool) -> None:
        self.reads_urls = reads_urls
        self.urls: list[str] = []

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        for job in jobs:
            self.urls.append(job.url)
            job.temp_path.write_bytes(DATA)
            for part in job.parts:
                on_part_done(job, part)


@pytest.mark.parametrize("reads_urls", [True, False])
def test_a_url_is_signed_only_for_an_engine_that_reads_it(tmp_path: Path, reads_urls: bool) -> None:
    sha = hashlib.sha256(DATA).hexdigest()
    entry = FileEntry(len(DATA), git_blob_sha1(lfs_pointer(sha, len(DATA))), sha, len(DATA))
    snap = StagedSnapshot("org/model", "1" * 40, Manifest({"model.safetensors": entry}),
                          {entry.blob_name: "models/hf-cache/blobs/x"})
    cache = RepoCache(tmp_path / "hub", "org/model")
    reader, engine = RecordingReader(), CopyEngine(reads_urls)
    plan = make_plan(cache, snap, set(), check_parts=True, resume=False)
    fetch = Fetch(reader, cache, snap, engine, TransferConfig(), Output(quiet=True))  # type: ignore[arg-type]

    assert fetch.transfer(plan, CheckPolicy(full=True)) == {}

    assert cache.blob_path(entry.blob_name).read_bytes() == DATA
    if reads_urls:
        assert reader.signed == ["models/hf-cache/blobs/x"] and engine.urls[0].startswith("http://bucket/")
    else:
        assert reader.signed == [] and engine.urls == [""]
