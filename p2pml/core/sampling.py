"""Peer sampling: drawing beta peers from a candidate set, sample sizes, and pass probabilities.

Randomness enters only through an explicit ``rng: random.Random`` owned by the caller, so the
simulator can replay samples exactly. Must not import asyncio, sockets, time, module-level random,
logging configuration or torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from p2pml.errors import ConfigError

__all__ = ["SampleSize", "pass_probability", "sample_peers"]

T = TypeVar("T", bound=Hashable)


def sample_peers(
    candidates: Sequence[T], k: int, rng: random.Random, *, exclude: T | None = None
) -> list[T]:
    """Draw `k` distinct peers uniformly without replacement, never `exclude` (the caller itself).

    The result is ``min(k, len(eligible))`` long. The same rng state and the same candidates (in the
    same order) give the same sample; pass candidates in a stable order (sorted by peer id), never
    in set order.

    Raises:
        ConfigError: if `k` is negative.
    """
    if k < 0:
        raise ConfigError("sample", k, "an integer >= 0")
    eligible = [c for c in candidates if c != exclude] if exclude is not None else list(candidates)
    if k >= len(eligible):
        return eligible
    return rng.sample(eligible, k)


def pass_probability(n_candidates: int, n_ok: int, k: int) -> float:
    """The chance that `k` peers drawn without replacement from `n_candidates` are all "ok".

    This is the hypergeometric probability C(n_ok, k) / C(n_candidates, k): the probability that a
    pBSP or pSSP check passes when `n_ok` of the candidates have reached the required step. It lets
    the simulator decide a sampled barrier without drawing the sample.

    Raises:
        ConfigError: unless 0 <= n_ok <= n_candidates and k >= 0.
    """
    if not 0 <= n_ok <= n_candidates:
        raise ConfigError("n_ok", n_ok, f"between 0 and n_candidates={n_candidates}")
    if k < 0:
        raise ConfigError("sample", k, "an integer >= 0")
    k = min(k, n_candidates)
    if n_ok < k:
        return 0.0
    p = 1.0
    for i in range(k):
        p *= (n_ok - i) / (n_candidates - i)
    return p


@dataclass(frozen=True, slots=True)
class SampleSize:
    """Beta as a user gives it: a count of peers (``10``) or a share of the population (``5%``)."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str, *, field: str = "sample") -> SampleSize:
        """Parse ``"10"`` (a count >= 0) or ``"5%"`` (a percentage in [0, 100]).

        Raises:
            ConfigError: naming `field` when the text is neither.
        """
        expected = "a whole number of peers >= 0, or a percentage such as 5%"
        text = text.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ConfigError(field, text, expected) from None
            if not math.isfinite(percent) or not 0.0 <= percent <= 100.0:
                raise ConfigError(field, text, expected)
            return cls(fraction=percent / 100.0)
        if not text.lstrip("-").isdigit() or int(text) < 0:
            raise ConfigError(field, text, expected)
        return cls(count=int(text))

    def resolve(self, population_estimate: float) -> int:
        """The number of peers to sample when the population is about `population_estimate`.

        A fraction rounds to the nearest count, and to at least one peer when it is above zero.
        """
        if self.count is not None:
            return self.count
        assert self.fraction is not None, "SampleSize holds a count or a fraction"
        if self.fraction == 0.0:
            return 0
        return max(1, round(self.fraction * population_estimate))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{(self.fraction or 0.0) * 100:g}%"
