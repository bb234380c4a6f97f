"""The one failure policy: which answers are tried again, how long to wait before each retry, and which
`AgentError` (so which exit code) an HTTP answer means. Every reader and writer of the bucket uses it:
the engines, the metadata readers (`agent.s3read`, `agent.store`) and the artifact uploader.

`native/src/policy.rs` mirrors the retryable statuses and the default policy for the Rust engine;
`agent._native.retryable_statuses()` and `retry_defaults()` expose its values, so a unit test keeps the
two sides equal.

Full jitter spreads hundreds of pods that hit `503 SlowDown` at once over the whole window instead of
letting them retry in lock-step; a `Retry-After` is a floor, spread over as much again for the same reason.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import (
    AgentError,
    ConfigError,
    CredentialsError,
    NotFoundError,
    StorageUnavailableError,
    VerificationError,
)

if TYPE_CHECKING:
    from agent.settings import Deadlines

# Answers that ask to be tried again: timeout, slow down, and every server error.
RETRYABLE_STATUSES = frozenset({408, 429, *range(500, 600)})

# S3 error codes that decide the error whatever the status says.
MISSING_CODES = frozenset({"NoSuchKey", "NotFound"})
CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"})
# Refusals a person fixes in the pod's configuration, not by waiting for the server: no fallback.
CONFIG_CODES = {"RequestTimeTooSkewed": "the pod's clock is off by minutes: fix its time sync (NTP)",
                "AuthorizationHeaderMalformed": "the signing region is wrong: set MINIO_REGION",
                "InvalidBucketName": "check MINIO_BUCKET"}


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is tried again and how long to wait before each retry.

    `max_retries` retries follow the first try of a transient failure (a 503, a reset, a short body);
    a try that got no usable answer at all (nobody there, too slow, wrong bytes) gets only
    `stall_retries`. Before retry n+1 the wait is uniform(0, min(cap, base * 2**n)) seconds."""

    max_retries: int = 5
    base: float = 0.2
    cap: float = 10.0
    stall_retries: int = 1

    def __post_init__(self) -> None:
        counts_ok = self.max_retries >= 0 and self.stall_retries >= 0
        seconds_ok = all(math.isfinite(s) and s >= 0 for s in (self.base, self.cap))
        if not (counts_ok and seconds_ok):
            raise ConfigError(f"retry policy out of range: {self}")

    @classmethod
    def from_deadlines(cls, deadlines: Deadlines) -> RetryPolicy:
        """The policy of a pull: the retry counts come from the settings (SIMSWARM_RETRIES, ...)."""
        return cls(max_retries=deadlines.retries, stall_retries=deadlines.stall_retries)

    @property
    def attempts(self) -> int:
        """Tries in all, the first included."""
        return self.max_retries + 1

    def gives_up(self, retries_done: int, stalls: int = 0) -> bool:
        """True when a request that failed after `retries_done` retries (`stalls` of its tries got no
        usable answer) must not be tried again."""
        return retries_done >= self.max_retries or stalls > self.stall_retries

    def delay(self, attempt: int, rng: random.Random | None = None, *,
              retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return backoff_delay(attempt, self.base, self.cap, retry_after, rng)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based)."""
    source = rng or random
    delay = source.uniform(0, min(cap, base * (2**attempt)))
    if retry_after is not None:
        # At least what the server asked, spread over as much again: pods that got the same 503 at once
        # would otherwise all come back together exactly `retry_after` later.
        delay = max(delay, min(cap, retry_after * (1 + source.random())))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds; the HTTP-date form is rare from S3 servers and is treated as absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


def error_for_status(status: int, what: str, *, code: str = "", message: str | None = None) -> AgentError:
    """The agent's error for an HTTP error answer about `what`, from its status and the S3 error code of
    its body when there is one. `message` replaces the default text (the native engine's own, which
    already names the part). Whether to try again first is `is_retryable`'s question, not this one's."""
    shown = code or str(status)
    if code == "NoSuchBucket":
        return ConfigError(message or f"{what}: the bucket does not exist", hint="check MINIO_BUCKET")
    if code in MISSING_CODES or status == 404:
        return NotFoundError(message or f"{what}: not found")
    if code in CREDENTIAL_CODES or status in (401, 403):
        return CredentialsError(message or f"{what}: access denied by the server ({shown})")
    if code in CONFIG_CODES:
        return ConfigError(message or f"{what}: the server refused the request ({code})",
                           hint=CONFIG_CODES[code])
    if status == 416:
        return VerificationError(message or f"{what}: the server has fewer bytes than asked for ({shown})",
                                 hint="the object is shorter than the manifest says; re-stage the model")
    return StorageUnavailableError(message or f"{what}: server answered {shown}")
