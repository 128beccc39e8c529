"""Rate limits keyed by peer: token buckets over requests and bytes, with bounded state.

Pure code: time arrives as ``now`` (seconds on the caller's monotonic clock). A `RateLimiter`
keeps one pair of buckets per key (a peer's IP address, say) and at most `max_keys` of them: the
least recently seen key is forgotten first, so a flood of new keys costs bounded memory (and a
forgotten key starts again with a full burst, which a flood of new keys cannot turn into more
than `max_keys` bursts at once).

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pml.errors import ConfigError

__all__ = ["RateLimit", "RateLimiter", "TokenBucket", "WarnGate"]

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests and bytes per second allowed to one key, each with a burst.

    Attributes:
        requests_per_s, request_burst: the request bucket (0 rate: no request limit).
        bytes_per_s, byte_burst: the byte bucket (0 rate: no byte limit). One request larger than
            the byte burst is always refused, so the burst is also the largest request allowed.
    """

    requests_per_s: float = 200.0
    request_burst: float = 400.0
    bytes_per_s: float = 0.0
    byte_burst: float = 0.0

    def validate(self, field: str = "rate_limit") -> RateLimit:
        for name in ("requests_per_s", "request_burst", "bytes_per_s", "byte_burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{field}.{name}", value, "a number >= 0")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{field}.{name}", value, "a finite number >= 0")
        if self.requests_per_s > 0 and self.request_burst < 1:
            raise ConfigError(f"{field}.request_burst", self.request_burst, ">= 1")
        if self.bytes_per_s > 0 and self.byte_burst <= 0:
            raise ConfigError(f"{field}.byte_burst", self.byte_burst, "> 0 with a byte rate")
        return self


class TokenBucket:
    """`rate` tokens per second up to `burst`; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at = now

    def take(self, amount: float, *, now: float) -> bool:
        """Take `amount` tokens if there are that many; False (and nothing taken) otherwise."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        if amount > self._tokens:
            return False
        self._tokens -= amount
        return True

    def give(self, amount: float) -> None:
        """Return `amount` tokens (a request refused for another reason after `take`)."""
        self._tokens = min(self.burst, self._tokens + amount)


class RateLimiter(Generic[K]):
    """Per-key request and byte buckets, for at most `max_keys` keys (least recently seen go)."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 4096) -> None:
        self.limit = limit.validate()
        if max_keys < 1:
            raise ConfigError("max_keys", max_keys, "an integer >= 1")
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, tuple[TokenBucket | None, TokenBucket | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: K, n_bytes: int = 0, *, now: float) -> str | None:
        """None if `key` may send a request of `n_bytes` now; otherwise why not ('requests' or
        'bytes'). A refused request takes nothing from either bucket."""
        lim = self.limit
        pair = self._buckets.get(key)
        if pair is None:
            pair = (
                TokenBucket(lim.requests_per_s, lim.request_burst, now=now)
                if lim.requests_per_s > 0
                else None,
                TokenBucket(lim.bytes_per_s, lim.byte_burst, now=now)
                if lim.bytes_per_s > 0
                else None,
            )
            self._buckets[key] = pair
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        requests, data = pair
        if data is not None and n_bytes > data.burst:
            return "bytes"
        if requests is not None and not requests.take(1, now=now):
            return "requests"
        if data is not None and not data.take(n_bytes, now=now):
            if requests is not None:
                requests.give(1)
            return "bytes"
        return None


class WarnGate(Generic[K]):
    """Whether to log a warning about `key` now: at most once per `interval_s` per key, for at
    most `max_keys` keys (least recently warned forgotten), counting the ones held back."""

    def __init__(self, interval_s: float, *, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: OrderedDict[K, tuple[float, int]] = OrderedDict()  # key -> (at, held back)

    def open(self, key: K, *, now: float) -> int | None:
        """None to hold this warning back; else how many about `key` were held back since the
        last one let through (0 for the first)."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        if len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return 0 if last is None else last[1]
