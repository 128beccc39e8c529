from __future__ import annotations

import numpy as np
import pytest

from p2pml.core.bounds import bound_curve, mean_bound
from p2pml.errors import ConfigError

# Wang, Catterall and Mortier (arXiv 1709.07772): minima of the bounds for r = 4, T = 10000.
PUBLISHED = [
    (1, 14.66, 62.25),
    (2, 12.71, 48.57),
    (4, 11.39, 40.20),
    (8, 10.57, 35.38),
    (16, 10.08, 32.67),
    (128, 9.58, 29.93),
]


@pytest.mark.parametrize(("beta", "mean", "second"), PUBLISHED)
def test_bound_curve_reproduces_the_published_minima(beta, mean, second):
    curve = bound_curve(beta=beta, staleness=4, length=10_000)
    assert curve.min_mean == pytest.approx(mean, abs=0.05)
    assert curve.min_second == pytest.approx(second, abs=0.05)


def test_bound_curve_minimum_is_below_every_curve_point():
    curve = bound_curve(beta=4, staleness=4, length=10_000, n_points=999)
    assert curve.min_mean <= min(curve.mean) + 1e-9
    assert curve.min_second <= min(curve.second) + 1e-9
    assert 0.0 < curve.argmin_mean_a < 1.0


def test_bound_minima_fall_as_beta_grows():
    minima = [bound_curve(beta=b, staleness=4, length=10_000).min_mean for b in (1, 2, 4, 8, 16)]
    assert minima == sorted(minima, reverse=True)


def test_mean_bound_with_zero_staleness_is_finite_and_positive():
    a = np.linspace(0.05, 0.95, 19)
    values = mean_bound(a, beta=3, staleness=0, length=1000)
    assert np.all(np.isfinite(values))
    assert np.all(values > 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 0, "staleness": 4, "length": 100}, "sample"),
        ({"beta": 1, "staleness": -1, "length": 100}, "staleness"),
        ({"beta": 1, "staleness": 4, "length": 4}, "length"),
        ({"beta": 1, "staleness": 4, "length": 100, "n_points": 2}, "n_points"),
    ],
)
def test_bound_curve_rejects_out_of_range_parameters(kwargs, field):
    with pytest.raises(ConfigError) as info:
        bound_curve(**kwargs)
    assert info.value.field == field
