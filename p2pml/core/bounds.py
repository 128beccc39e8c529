"""PSP convergence bounds on the update-order lag, as functions of a = F(r)^beta.

Wang, Catterall and Mortier, "Probabilistic Synchronous Parallel", arXiv 1709.07772, section 5: with
F the CDF of a node's lag, r the staleness, beta the sample size and T the length of the update
sequence, the mean and second moment of the lag gamma_t are bounded by

    (1/T) sum E(gamma_t)   <= S * ( r(r+1)/2 + a(r+2)/(1-a)^2 )
    (1/T) sum E(gamma_t^2) <  S * ( r(r+1)(2r+1)/6 + a(r^2+4)/(1-a)^3 )
    S = (1-a) / ( F(1-a) + a - a^(T-r+1) ),   F = a^(1/beta).

Pure maths over numpy; must not import asyncio, sockets, time, random or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from p2pml.errors import ConfigError

__all__ = ["BoundCurve", "bound_curve", "mean_bound", "second_moment_bound"]

FloatArray = npt.NDArray[np.float64]
_EPS = 1e-9


def _scale(a: FloatArray, beta: int, length: int, staleness: int) -> FloatArray:
    f = a ** (1.0 / beta)
    tail = np.exp((length - staleness + 1) * np.log(a))
    return np.asarray((1.0 - a) / (f * (1.0 - a) + a - tail), dtype=np.float64)


def mean_bound(a: FloatArray, *, beta: int, staleness: int, length: int) -> FloatArray:
    """The bound on the mean lag (1/T) sum E(gamma_t), element-wise over `a` in (0, 1)."""
    r = staleness
    head = r * (r + 1) / 2
    return np.asarray(_scale(a, beta, length, r) * (head + a * (r + 2) / (1.0 - a) ** 2))


def second_moment_bound(a: FloatArray, *, beta: int, staleness: int, length: int) -> FloatArray:
    """The bound on the second moment (1/T) sum E(gamma_t^2), element-wise over `a` in (0, 1)."""
    r = staleness
    head = r * (r + 1) * (2 * r + 1) / 6
    return np.asarray(_scale(a, beta, length, r) * (head + a * (r * r + 4) / (1.0 - a) ** 3))


@dataclass(frozen=True, slots=True)
class BoundCurve:
    """Both bounds for one beta: the curves over `a` and their minima."""

    beta: int
    a: tuple[float, ...]
    mean: tuple[float, ...]
    second: tuple[float, ...]
    min_mean: float
    argmin_mean_a: float
    min_second: float
    argmin_second_a: float


def _minimise(fn: Callable[[FloatArray], FloatArray], grid: FloatArray) -> tuple[float, float]:
    """Grid search, then golden-section refinement in the bracket around the best grid point."""
    values = fn(grid)
    i = int(np.nanargmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        y1, y2 = fn(np.array([x1, x2]))
        if y1 <= y2:
            hi = x2
        else:
            lo = x1
    best = (lo + hi) / 2.0
    return float(fn(np.array([best]))[0]), float(best)


def bound_curve(*, beta: int, staleness: int, length: int, n_points: int = 199) -> BoundCurve:
    """Evaluate both bounds over a in (0, 1) and find their minima.

    Args:
        beta: the sample size, >= 1.
        staleness: r, in steps, >= 0.
        length: T, the length of the update sequence, > staleness.
        n_points: points of the returned curve, evenly spaced in (0, 1).

    Raises:
        ConfigError: for a parameter out of range.
    """
    if beta < 1:
        raise ConfigError(
            "sample", beta, "an integer >= 1 (the bounds need at least one sampled peer)"
        )
    if staleness < 0:
        raise ConfigError("staleness", staleness, "an integer >= 0")
    if length <= staleness:
        raise ConfigError("length", length, f"an integer > staleness ({staleness})")
    if n_points < 3:
        raise ConfigError("n_points", n_points, "an integer >= 3")
    kw = {"beta": beta, "staleness": staleness, "length": length}
    a = np.linspace(_EPS, 1.0 - _EPS, 20_001)
    min_mean, arg_mean = _minimise(lambda x: mean_bound(x, **kw), a)
    min_second, arg_second = _minimise(lambda x: second_moment_bound(x, **kw), a)
    shown = np.linspace(0.0, 1.0, n_points + 2)[1:-1]
    return BoundCurve(
        beta=beta,
        a=tuple(shown.tolist()),
        mean=tuple(mean_bound(shown, **kw).tolist()),
        second=tuple(second_moment_bound(shown, **kw).tolist()),
        min_mean=min_mean,
        argmin_mean_a=arg_mean,
        min_second=min_second,
        argmin_second_a=arg_second,
    )
