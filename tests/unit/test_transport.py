"""The deadlines' configuration, the minimum-rate rule, the proxy reading and the retry spread: pure logic."""

from __future__ import annotations

import random

import pytest
import urllib3

from agent.engines.base import TransferConfig
from agent.errors import ConfigError
from agent.policy import RetryPolicy, backoff_delay
from agent.settings import Deadlines, Settings
from agent.transport import Pace, TooSlow, pool_for, proxy_for

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_deadlines_default_to_a_pods_values_and_read_every_variable() -> None:
    assert Settings.from_env({}).deadlines == Deadlines()
    d = Deadlines.from_env({"SIMSWARM_CONNECT_TIMEOUT": "2", "SIMSWARM_FIRST_BYTE_TIMEOUT": "3.5",
                            "SIMSWARM_MIN_RATE_KIB": "128", "SIMSWARM_RATE_WINDOW": "7",
                            "SIMSWARM_STALL_RETRIES": "0", "SIMSWARM_RETRIES": "4"})
    assert d == Deadlines(connect=2, first_byte=3.5, min_rate=128 * 1024, rate_window=7, stall_retries=0,
                          retries=4)


BAD = [("SIMSWARM_CONNECT_TIMEOUT", "0"), ("SIMSWARM_RATE_WINDOW", "-1"),
       ("SIMSWARM_FIRST_BYTE_TIMEOUT", "soon"), ("SIMSWARM_MIN_RATE_KIB", "nan"), ("SIMSWARM_RETRIES", "inf")]


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_deadline_is_a_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_the_limits_of_a_pull_carry_the_deadlines() -> None:
    d = Deadlines(connect=1, first_byte=2, min_rate=3, rate_window=4, stall_retries=5, retries=6)
    limits = TransferConfig.sized(8, d)
    assert (limits.deadlines.connect, limits.deadlines.first_byte, limits.deadlines.min_rate,
            limits.deadlines.rate_window, limits.retry.stall_retries,
            limits.retry.max_retries) == (1, 2, 3, 4, 5, 6)
    assert (TransferConfig.sized(8).deadlines.first_byte == TransferConfig().deadlines.first_byte
            == Deadlines().first_byte)


@pytest.mark.parametrize("bad", [{"max_retries": -1}, {"stall_retries": -1}, {"base": -0.1},
                                 {"cap": float("nan")}, {"cap": float("inf")}])
def test_a_retry_policy_out_of_range_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="retry policy"):
        RetryPolicy(**bad)  # type: ignore[arg-type]


def test_a_transfer_config_needs_at_least_one_stream() -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        TransferConfig(concurrency=0)
    assert TransferConfig.sized(None).concurrency >= 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pace_fails_a_trickle_at_the_end_of_its_window_and_lets_a_fast_body_through() -> None:
    clock = Clock()
    pace = Pace(1024, 20, clock)
    for _ in range(9):  # a byte every 2 s: judged only once the window is over
        clock.now += 2
        pace.add(1)
    clock.now += 2
    with pytest.raises(TooSlow, match="below the minimum of 1 KiB/s over 20 s"):
        pace.add(1)
    fast = Pace(1024, 20, clock)
    for _ in range(10):
        clock.now += 10
        fast.add(1 << 20)  # every window judged, every one fast enough


def test_pace_with_rate_zero_never_judges() -> None:
    clock = Clock()
    pace = Pace(0, 1, clock)
    clock.now += 100
    pace.add(0)


def test_proxies_are_read_as_boto3_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy_for("http://minio:9000/b/k") is None
    monkeypatch.setenv("HTTP_PROXY", "http://upper:1")
    monkeypatch.setenv("http_proxy", "http://lower:2")
    monkeypatch.setenv("HTTPS_PROXY", "proxy:3")
    monkeypatch.setenv("NO_PROXY", "internal.example,10.0.0.5")
    assert proxy_for("http://minio:9000/b/k?X-Amz-Signature=1") == "http://lower:2"  # lower case wins
    assert proxy_for("https://minio/b") == "http://proxy:3"
    assert proxy_for("http://s3.internal.example:9000/") is None
    assert proxy_for("http://10.0.0.5:9000/") is None
    assert proxy_for("http://127.0.0.1:9000/") == "http://lower:2"  # loopback is proxied, as in curl


def test_a_proxy_with_credentials_sends_them_as_proxy_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://user:p%40ss@proxy:3128")
    pool = pool_for("http://minio:9000", connect=1, first_byte=2)
    assert isinstance(pool, urllib3.ProxyManager)
    assert pool.proxy is not None and pool.proxy.host == "proxy" and pool.proxy.auth is None
    assert pool.proxy_headers["proxy-authorization"] == urllib3.make_headers(
        proxy_basic_auth="user:p@ss")["proxy-authorization"]
    monkeypatch.setenv("NO_PROXY", "*")
    assert not isinstance(pool_for("http://minio:9000", connect=1, first_byte=2), urllib3.ProxyManager)


def test_retry_after_is_a_floor_spread_over_as_much_again() -> None:
    rng = random.Random(7)
    waits = [backoff_delay(0, 0.2, 10.0, retry_after=1.0, rng=rng) for _ in range(200)]
    assert all(1.0 <= w < 2.0 for w in waits)
    assert max(waits) - min(waits) > 0.5  # spread, not lock-step
    assert backoff_delay(0, 0.2, 1.5, retry_after=60, rng=rng) == 1.5  # capped


def test_no_answer_is_a_stall_and_a_broken_answer_is_not() -> None:
    from agent.transport import is_stall

    assert is_stall(TooSlow("slow")) and is_stall(urllib3.exceptions.ReadTimeoutError(None, "/", "t"))
    assert is_stall(urllib3.exceptions.ConnectTimeoutError("t"))
    assert is_stall(urllib3.exceptions.NewConnectionError(None, "refused"))  # nobody there
    assert not is_stall(urllib3.exceptions.ProtocolError("reset"))  # a server that answered
