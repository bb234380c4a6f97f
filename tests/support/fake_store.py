"""An in-memory bucket behind the agent's storage interface, and an engine that copies from it.

s5cmd tests its commands against storage behind an interface with a generated mock; here `FakeStore` is
that mock, written out: it satisfies `agent.s3read.ObjectStore` (the `ObjectReader` a pull reads through,
plus what `stage` writes), which mypy checks (`_fits` below; tests/unit/test_fake_store.py runs it), so
`stage_from_cache`, `RemoteRepo` and `pull_from_store(..., reader=store, engine=FakeEngine(store))` run on
it in milliseconds, no server anywhere. Faults are plain attributes: `failure` (every call raises
it: the bucket is down), `flip_reads` (the next reads of a key return one byte flipped: a flaky link),
`cut_reads` (the next reads of a key return its first half: an answer cut short but well framed),
`listing` (what the listing shows instead of the objects: keys no real server would keep). Every key read
is logged in `reads`, and `FakeEngine` logs the jobs it was given, so a test can say what was fetched.

What stays against real parts: the bytes on the wire (engines against SeaweedFS and the fault proxy) and
the Hub download (against `tests.support.fake_hub`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from agent.engines.base import BlobJob, Engine, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.errors import AgentError, ConfigError, NotFoundError, VerificationError
from agent.policy import RetryPolicy
from agent.s3read import METADATA_LIMIT, ObjectInfo, ObjectStore
from agent.settings import Settings

URL_BASE = "https://fake-s3.invalid"


class FakeStore:
    """One bucket in a dict. Keys are full object keys (`models/hf-cache/...`), as with the real Store."""

    body_retry = RetryPolicy(max_retries=3, base=0.0, cap=0.0)  # read again at once: no waiting in unit tests

    def __init__(self, bucket: str = "fake-bucket") -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.failure: AgentError | None = None
        self.flip_reads: dict[str, int] = {}  # key -> how many of its next reads come back damaged
        self.cut_reads: dict[str, int] = {}  # key -> how many of its next reads return only its first half
        self.listing: list[ObjectInfo] | None = None
        self.reads: list[str] = []

    # -- what a pull reads (ObjectReader) ------------------------------------------------------------

    def check_bucket(self) -> None:
        self._maybe_fail()

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        self._maybe_fail()
        if self.listing is not None:
            yield from (obj for obj in self.listing if obj.key.startswith(prefix))
            return
        for key in sorted(self.objects):
            if key.startswith(prefix):
                data = self.objects[key]
                yield ObjectInfo(key, len(data), hashlib.md5(data, usedforsecurity=False).hexdigest())

    def list_prefixes(self, prefix: str) -> list[str]:
        self._maybe_fail()
        found = {prefix + key[len(prefix):].split("/", 1)[0] + "/" for key in self.objects
                 if key.startswith(prefix) and "/" in key[len(prefix):]}
        return sorted(found)

    def get_bytes(self, key: str, *, limit: int = METADATA_LIMIT) -> bytes:
        data = self.read(key)
        if len(data) > limit:
            raise ConfigError(f"{key}: {len(data)} bytes is too large for metadata")
        return data

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return {key: self.get_bytes(key) for key in dict.fromkeys(keys)}

    def presign(self, key: str, *, expires: int = 3600) -> str:
        self._maybe_fail()
        return f"{URL_BASE}/{self.bucket}/{quote(key)}?X-Amz-Expires={expires}&X-Amz-Signature=fake"

    # -- what staging writes (ObjectStore) -----------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        self._maybe_fail()
        data = self.objects.get(key)
        return None if data is None else ObjectInfo(key, len(data))

    def head_metadata(self, key: str) -> dict[str, str] | None:
        self._maybe_fail()
        if key not in self.objects:
            return None
        return {**self.metadata.get(key, {}), "content-length": str(len(self.objects[key]))}

    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        self._maybe_fail()
        self.objects[key] = bytes(data)
        self.metadata[key] = dict(metadata or {})

    def upload_file(self, path: Path, key: str, *, metadata: dict[str, str] | None = None,
                    callback: Callable[[int], None] | None = None) -> None:
        data = path.read_bytes()
        self.put_bytes(key, data, metadata=metadata)
        if callback is not None:
            callback(len(data))

    # -- for the fake engine and the tests -----------------------------------------------------------

    def read(self, key: str) -> bytes:
        """An object's bytes as a reader gets them (logged; damaged while `flip_reads` says so)."""
        self._maybe_fail()
        self.reads.append(key)
        if key not in self.objects:
            raise NotFoundError(f"{key}: not found")
        data = self.objects[key]
        if self.flip_reads.get(key, 0) > 0:
            self.flip_reads[key] -= 1
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0xFF
            return bytes(damaged)
        if self.cut_reads.get(key, 0) > 0:
            self.cut_reads[key] -= 1
            return data[:len(data) // 2]
        return data

    def key_of(self, url: str) -> str:
        """The key a URL of `presign` names (a URL of another bucket is a bug in the caller)."""
        parts = urlsplit(url)
        bucket, _, key = parts.path.lstrip("/").partition("/")
        assert f"{parts.scheme}://{parts.netloc}" == URL_BASE and bucket == self.bucket, url
        return unquote(key)

    def _maybe_fail(self) -> None:
        if self.failure is not None:
            raise self.failure


def _fits(store: FakeStore) -> ObjectStore:
    """Never called: mypy checks here that FakeStore provides the whole interface."""
    return store


class FakeEngine:
    """An engine (agent.engines.base.Engine, checked as FakeStore is) that copies each job's parts from a
    FakeStore, by the presigned URL it was given, into the job's temporary file, and checks part digests
    as the real engines do (a mismatch is a VerificationError; they raise it after their retries)."""

    name = "fake"
    reads_urls = True
    writes_in_place = True
    hashes_blobs = False
    records_digests = False
    resumes_in_parts = False

    def __init__(self, store: FakeStore, *, checks_parts: bool = True) -> None:
        self.store = store
        self.checks_parts = checks_parts
        self.calls: list[list[BlobJob]] = []  # the jobs of each fetch, in order

    @classmethod
    def from_settings(cls, settings: Settings | None) -> Engine:
        raise TypeError("a FakeEngine reads a FakeStore: build it with FakeEngine(store)")

    @classmethod
    def available(cls) -> bool:
        return True

    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        self.calls.append(list(jobs))
        for job in jobs:
            data = self.store.read(self.store.key_of(job.url))
            fd = os.open(job.temp_path, os.O_WRONLY)
            try:
                for part in job.parts:
                    chunk = data[part.offset:part.offset + part.length]
                    if self.checks_parts and part.sha256 and hashlib.sha256(chunk).hexdigest() != part.sha256:
                        raise VerificationError(f"{job.blob_name[:12]} bytes {part.offset}+{part.length}: "
                                                "part digest mismatch")
                    os.pwrite(fd, chunk, part.offset)
                    progress(len(chunk))
                    on_part_done(job, part)
            finally:
                os.close(fd)

    def fetched(self) -> list[str]:
        """The blob names of every job, over every fetch (a blob fetched twice is listed twice)."""
        return [job.blob_name for jobs in self.calls for job in jobs]


def _engine_fits(engine: FakeEngine) -> Engine:
    """Never called: mypy checks here that FakeEngine keeps the engine contract."""
    return engine
