"""The one retry policy of the Python side: full-jitter exponential backoff that honours Retry-After.

Full jitter spreads hundreds of pods that hit `503 SlowDown` at once over the whole window instead of
letting them retry in lock-step; a `Retry-After` is a floor, spread over as much again for the same reason.
"""

from __future__ import annotations

import random


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
