"""The fallback's decisions with the bucket in memory: when the Hub may be used, when a local copy is
served, which error and exit code a pod ends with otherwise. The Hub download itself is tested against
the fake Hub server (tests/integration/test_fallback.py); here it is replaced by a recorder, so each
decision is seen without a download."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import pytest

import agent.fallback
from agent.engines.base import BlobJob, PartDoneFn, ProgressFn, TransferConfig, TransferHooks
from agent.errors import (
    AgentError,
    ConfigError,
    CredentialsError,
    NotAvailableError,
    NotFoundError,
    ResourceLimitError,
    StorageUnavailableError,
    VerificationError,
)
from agent.fallback import FallbackResult, fallback_refusal, pull_with_fallback, try_bucket
from agent.pull import PullOptions, PullResult
from agent.remote import RemoteRepo
from agent.settings import Settings
from tests.support.fake_store import FakeEngine, FakeStore
from tests.support.staged import quiet
from tests.unit.conftest import COMMIT, REPO

DOWN = StorageUnavailableError("listing 'models/hf-cache/': cannot connect to the object storage endpoint")


class HubRecorder:
    """Stands in for `agent.fallback.pull_from_hub`: records that the Hub was chosen, and why."""

    def __init__(self) -> None:
        self.calls: list[tuple[PullOptions, str, AgentError]] = []

    def __call__(self, settings: Settings, opts: PullOptions, out: object, *, reason: str,
                 cause: AgentError) -> FallbackResult:
        self.calls.append((opts, reason, cause))
        return FallbackResult("hub", "huggingface_hub", opts.repo_id, opts.revision, fallback_reason=reason)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> HubRecorder:
    recorder = HubRecorder()
    monkeypatch.setattr(agent.fallback, "pull_from_hub", recorder)
    return recorder


def run(settings: Settings, store: FakeStore, *, allow: bool = True,
        engine: FakeEngine | None = None) -> PullResult:
    return pull_with_fallback(settings, PullOptions(REPO), quiet(), allow_fallback=allow, write_back=False,
                              reader=store, engine=engine or FakeEngine(store))


def break_bucket(store: FakeStore, failure: str) -> None:
    """`down`: every request fails; `not-staged`: the bucket is empty; `corrupt`: every read of one blob
    comes back damaged, so the repair round cannot help."""
    if failure == "down":
        store.failure = DOWN
    elif failure == "not-staged":
        store.objects.clear()
    else:
        snap = RemoteRepo(store, REPO).load()
        store.flip_reads[snap.sources[max(snap.manifest.blobs())]] = 1000


# -- what the bucket's outcome is ---------------------------------------------------------------------


def test_a_bucket_that_cannot_be_reached_is_an_outcome_not_a_raise(pod: Settings, store: FakeStore) -> None:
    store.failure = DOWN
    outcome = try_bucket(pod, PullOptions(REPO), quiet(), reader=store, engine=FakeEngine(store))
    assert outcome is DOWN and outcome.exit_code == 3


def test_storage_off_is_an_outcome_saying_so(tmp_path: Path, store: FakeStore) -> None:
    off = Settings.from_env({"HF_HOME": str(tmp_path / "hf-home")})
    outcome = try_bucket(off, PullOptions(REPO), quiet(), reader=store, engine=FakeEngine(store))
    assert isinstance(outcome, ConfigError) and "MINIO_ENDPOINT is not set" in str(outcome)
    assert store.reads == []


def test_refused_credentials_are_raised_the_hub_is_no_cure(pod: Settings, store: FakeStore) -> None:
    store.failure = CredentialsError("listing 'models/hf-cache/': access denied by the server (403)")
    with pytest.raises(CredentialsError) as info:
        try_bucket(pod, PullOptions(REPO), quiet(), reader=store, engine=FakeEngine(store))
    assert info.value.exit_code == 2


class OutOfFiles(FakeEngine):
    def fetch(self, jobs: Sequence[BlobJob], config: TransferConfig, progress: ProgressFn,
              on_part_done: PartDoneFn, hooks: TransferHooks | None = None) -> None:
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_engine_failing_for_an_unlisted_reason_becomes_an_outcome_the_hub_may_answer(
        pod: Settings, store: FakeStore) -> None:
    outcome = try_bucket(pod, PullOptions(REPO), quiet(), reader=store, engine=OutOfFiles(store))
    assert isinstance(outcome, ResourceLimitError) and outcome.exit_code == 3
    assert isinstance(outcome.__cause__, OSError)  # --debug shows the original


# -- may the Hub be used? -----------------------------------------------------------------------------


def test_the_refusal_names_what_forbids_the_hub(pod_env: dict[str, str]) -> None:
    offline = Settings.from_env({**pod_env, "HF_HUB_OFFLINE": "1"})
    assert fallback_refusal(True, Settings.from_env(pod_env)) is None
    assert "--no-fallback" in str(fallback_refusal(False, offline))
    assert "HF_HUB_OFFLINE" in str(fallback_refusal(True, offline))


# -- the decisions, end to end ----------------------------------------------------------------------


def test_the_bucket_delivering_never_asks_the_hub(pod: Settings, store: FakeStore, hub: HubRecorder) -> None:
    result = run(pod, store)
    assert (result.source, result.commit) == ("minio", COMMIT) and hub.calls == []


@pytest.mark.parametrize("failure", ["down", "not-staged", "corrupt"])
def test_a_bucket_that_cannot_deliver_sends_the_pull_to_the_hub_with_the_reason(
        failure: str, pod: Settings, store: FakeStore, hub: HubRecorder) -> None:
    break_bucket(store, failure)
    result = run(pod, store)
    [(opts, reason, cause)] = hub.calls
    assert result.source == "hub" and opts.repo_id == REPO
    expected = {"down": StorageUnavailableError, "not-staged": NotFoundError, "corrupt": VerificationError}
    assert isinstance(cause, expected[failure])
    assert reason.startswith("bucket could not deliver: ") and "\n" not in reason


@pytest.mark.parametrize(("env", "allow", "says"), [({}, False, "--no-fallback"),
                                                    ({"HF_HUB_OFFLINE": "1"}, True, "HF_HUB_OFFLINE")],
                         ids=["no-fallback", "hub-offline"])
@pytest.mark.parametrize(("failure", "error", "code"), [("down", StorageUnavailableError, 3),
                                                        ("not-staged", NotFoundError, 3),
                                                        ("corrupt", VerificationError, 4)])
def test_without_the_hub_the_bucket_error_is_raised_with_its_exit_code_and_why(
        failure: str, error: type[AgentError], code: int, env: dict[str, str], allow: bool, says: str,
        pod_env: dict[str, str], store: FakeStore, hub: HubRecorder) -> None:
    break_bucket(store, failure)
    with pytest.raises(error) as info:
        run(Settings.from_env({**pod_env, **env}), store, allow=allow)
    assert info.value.exit_code == code
    line = info.value.one_line()
    assert says in line and "\n" not in line
    assert hub.calls == []


def test_storage_off_and_no_fallback_is_exit_3_saying_how_to_fill_the_cache(
        tmp_path: Path, store: FakeStore, hub: HubRecorder) -> None:
    off = Settings.from_env({"HF_HOME": str(tmp_path / "hf-home")})
    with pytest.raises(NotAvailableError) as info:
        run(off, store, allow=False)
    assert info.value.exit_code == 3 and "the cache holds no complete copy" in str(info.value)
    assert "fill the cache" in info.value.hint and hub.calls == []


def test_a_complete_copy_in_the_cache_is_served_when_the_bucket_is_down(
        pod: Settings, store: FakeStore, hub: HubRecorder) -> None:
    run(pod, store)
    store.failure = DOWN
    result = run(pod, store, allow=False)
    assert (result.source, result.commit, result.bytes_downloaded) == ("cache", COMMIT, 0)
    assert isinstance(result, FallbackResult) and "holds a complete copy" in result.fallback_reason
    assert hub.calls == []


def test_a_damaged_copy_in_the_cache_is_not_served_the_hub_is_asked(
        pod: Settings, store: FakeStore, hub: HubRecorder) -> None:
    run(pod, store)
    blob = next(p for p in (pod.hub_cache / "models--simswarm-test--unit-llama" / "blobs").iterdir())
    blob.chmod(0o644)
    blob.write_bytes(b"not the blob")
    store.failure = DOWN
    assert run(pod, store).source == "hub" and len(hub.calls) == 1
