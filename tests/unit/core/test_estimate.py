from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.estimate import ID_SPACE, estimate_from_lookups, estimate_population, relative_error
from p2pml.errors import ConfigError


def kth_distances(ids: list[int], k: int, n_lookups: int, rng: random.Random) -> list[int]:
    out = []
    for _ in range(n_lookups):
        target = rng.getrandbits(160)
        out.append(sorted(i ^ target for i in ids)[k - 1])
    return out


@pytest.mark.parametrize("n", [100, 300, 1000])
def test_estimate_error_with_16_lookups_meets_the_design_targets(n, rng):
    errors = []
    for _ in range(60):
        ids = [rng.getrandbits(160) for _ in range(n)]
        est = estimate_population(kth_distances(ids, 20, 16, rng), k=20)
        errors.append(abs(est.n_hat - n) / n)
    errors.sort()
    assert statistics.median(errors) <= 0.06
    assert errors[int(0.95 * len(errors))] <= 0.15


def test_estimator_is_unbiased_where_the_naive_one_is_five_percent_high(rng):
    n, k = 400, 20
    ids = [rng.getrandbits(160) for _ in range(n)]
    distances = kth_distances(ids, k, 3000, rng)
    unbiased = estimate_population(distances, k=k).n_hat
    naive = statistics.fmean(k * ID_SPACE / d for d in distances)
    assert unbiased == pytest.approx(n, rel=0.03)
    assert naive / unbiased == pytest.approx(k / (k - 1), rel=1e-9)


@pytest.mark.parametrize(("lookups", "expected"), [(1, 0.236), (4, 0.118), (16, 0.059)])
def test_relative_error_matches_the_design_figures(lookups, expected):
    assert relative_error(lookups, 20) == pytest.approx(expected, abs=0.001)


def test_known_population_is_exact():
    est = estimate_population([], k=20, n_known=37)
    assert (est.n_hat, est.is_exact, est.rel_error) == (37.0, True, 0.0)


@given(st.lists(st.integers(0, ID_SPACE - 1), min_size=1, max_size=32), st.integers(3, 40))
def test_estimate_is_positive_and_finite_on_any_valid_observations(distances, k):
    est = estimate_population(distances, k=k)
    assert est.n_hat > 0 and math.isfinite(est.n_hat)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kth_distances": [10], "k": 2}, "k"),
        ({"kth_distances": [], "k": 20}, "kth_distances"),
        ({"kth_distances": [-1], "k": 20}, "kth_distances"),
        ({"kth_distances": [ID_SPACE], "k": 20}, "kth_distances"),
        ({"kth_distances": [True], "k": 20}, "kth_distances"),
        ({"kth_distances": [], "k": 20, "n_known": 0}, "n_known"),
    ],
)
def test_estimate_rejects_bad_observations_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        estimate_population(**kwargs)
    assert info.value.field == field


D = ID_SPACE // 10


@pytest.mark.parametrize(
    ("distances", "done", "n_known", "met_unknown", "table_complete", "exact"),
    [
        ([D, None], [True, True], 12, True, False, True),  # asked everyone, under k found: count
        ([D, None], [True, False], 12, True, False, False),  # cut short by its budget: estimate
        ([D, None], [True, True], 150, True, False, False),  # short, yet 150 known: estimate
        ([D, D], [True, True], 42, False, True, True),  # the table knows everyone: count
        ([D, D], [True, True], 42, True, True, False),  # a lookup met a stranger: estimate
        ([D, D], [True, True], 42, False, False, False),  # a bucket turned someone away
    ],
)
def test_estimate_from_lookups_counts_only_when_everyone_is_known(
    distances, done, n_known, met_unknown, table_complete, exact
):
    result = estimate_from_lookups(
        distances,
        k=20,
        n_known=n_known,
        complete=done,
        met_unknown=met_unknown,
        table_complete=table_complete,
    )
    assert result.is_exact is exact
    assert result.n_hat == (n_known if exact else pytest.approx(19 * 10))
