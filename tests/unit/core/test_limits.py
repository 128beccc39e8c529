"""Token buckets and the per-key rate limiter (p2pml.core.limits)."""

from __future__ import annotations

import pytest

from p2pml.core.limits import RateLimit, RateLimiter, TokenBucket, WarnGate
from p2pml.errors import ConfigError


def test_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(10.0, 5.0, now=0.0)
    assert [bucket.take(1, now=0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(1, now=0.1)  # 0.1 s at 10/s
    assert not bucket.take(1, now=0.1)
    assert bucket.take(5, now=100.0) and not bucket.take(1, now=100.0)  # never above the burst


def test_limiter_refuses_requests_and_bytes_separately_and_refunds():
    limiter = RateLimiter[str](RateLimit(2.0, 2.0, 100.0, 100.0))
    assert limiter.admit("a", 60, now=0.0) is None
    assert limiter.admit("a", 60, now=0.0) == "bytes"  # the request token is given back
    assert limiter.admit("a", 40, now=0.0) is None
    assert limiter.admit("a", 0, now=0.0) == "requests"
    assert limiter.admit("b", 0, now=0.0) is None  # keys are independent
    assert limiter.admit("c", 101, now=0.0) == "bytes"  # over the burst: never


def test_limiter_state_is_bounded_least_recent_first():
    limiter = RateLimiter[int](RateLimit(1.0, 1.0), max_keys=3)
    for key in range(10):
        limiter.admit(key, now=0.0)
    assert len(limiter) == 3
    assert limiter.admit(9, now=0.0) == "requests"  # still remembered
    assert limiter.admit(0, now=0.0) is None  # forgotten: a fresh burst


def test_zero_rates_mean_no_limit():
    limiter = RateLimiter[str](RateLimit(0.0, 0.0, 0.0, 0.0))
    assert all(limiter.admit("a", 1 << 40, now=0.0) is None for _ in range(1000))


@pytest.mark.parametrize(
    "limit",
    [
        RateLimit(-1.0, 1.0),
        RateLimit(1.0, 0.5),
        RateLimit(1.0, 1.0, 5.0, 0.0),
        RateLimit(float("nan"), 1.0),
        RateLimit(True, 1.0),  # type: ignore[arg-type]
    ],
)
def test_bad_limits_name_the_field(limit):
    with pytest.raises(ConfigError):
        limit.validate()


def test_warn_gate_lets_one_warning_per_key_per_interval_and_counts_the_rest():
    gate = WarnGate[str](10.0, max_keys=2)
    assert gate.open("a", now=0.0) == 0
    assert gate.open("a", now=5.0) is None
    assert gate.open("a", now=9.9) is None
    assert gate.open("b", now=9.9) == 0  # keys are independent
    assert gate.open("a", now=10.0) == 2  # two held back since the last one
    assert gate.open("c", now=10.0) == 0  # over max_keys: "b", the least recent, is forgotten
    assert gate.open("b", now=10.0) == 0
