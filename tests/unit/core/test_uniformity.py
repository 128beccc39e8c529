"""The chi-square p-value against scipy, and its input checks."""

from __future__ import annotations

import pytest
from scipy import stats

from p2pml.core.uniformity import chi_square_p, gamma_q
from p2pml.errors import ConfigError


@pytest.mark.parametrize("df", [1, 2, 5, 99, 299, 999])
@pytest.mark.parametrize("ratio", [0.3, 0.8, 1.0, 1.2, 1.6, 3.0])
def test_gamma_q_matches_scipy_chi2_sf(df, ratio):
    x = df * ratio
    assert gamma_q(df / 2, x / 2) == pytest.approx(stats.chi2.sf(x, df), rel=1e-7, abs=1e-300)


def test_chi_square_p_matches_scipy():
    observed, expected = [10, 12, 8, 15, 5], [10.0] * 5
    assert chi_square_p(observed, expected) == pytest.approx(stats.chisquare(observed).pvalue)


def test_chi_square_p_of_uniform_counts_is_one():
    assert chi_square_p([5, 5, 5], [5.0, 5.0, 5.0]) == 1.0


@pytest.mark.parametrize(
    ("observed", "expected"), [([1], [1.0]), ([1, 2], [1.0]), ([1, 2], [1.0, 0.0])]
)
def test_chi_square_p_rejects_bad_input(observed, expected):
    with pytest.raises(ConfigError):
        chi_square_p(observed, expected)
