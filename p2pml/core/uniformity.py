"""Pearson's chi-square goodness-of-fit test, for checking that peer draws are uniform.

The p-value is the regularized upper incomplete gamma function Q(df / 2, x / 2), computed by its
power series below a + 1 and by its continued fraction (modified Lentz) above, as in Abramowitz &
Stegun 6.5.29 and 6.5.31.

Must not import asyncio, sockets, threads, time, module-level random or torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from p2pml.errors import ConfigError

__all__ = ["chi_square_p", "gamma_q"]

_EPS = 1e-15
_MAX_TERMS = 10_000


def _gamma_p_series(a: float, x: float) -> float:
    term = total = 1.0 / a
    n = a
    for _ in range(_MAX_TERMS):
        n += 1.0
        term *= x / n
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_fraction(a: float, x: float) -> float:
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) for a > 0, x >= 0."""
    if a <= 0 or x < 0:
        raise ConfigError("gamma_q", (a, x), "a > 0 and x >= 0")
    if x == 0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_p_series(a, x))
    return min(1.0, _gamma_q_fraction(a, x))


def chi_square_p(observed: Sequence[float], expected: Sequence[float]) -> float:
    """The p-value of Pearson's test that `observed` counts follow `expected` (df = bins - 1).

    Raises:
        ConfigError: if the lengths differ, there are fewer than two bins, or an expected count is
            not positive.
    """
    if len(observed) != len(expected) or len(observed) < 2:
        raise ConfigError("observed", len(observed), f"{len(expected)} bins, at least 2")
    if any(e <= 0 for e in expected):
        raise ConfigError("expected", min(expected), "positive expected counts")
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return gamma_q((len(observed) - 1) / 2.0, stat / 2.0)
