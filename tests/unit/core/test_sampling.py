from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.sampling import SampleSize, pass_probability, sample_peers
from p2pml.errors import ConfigError


@given(st.integers(0, 60), st.integers(0, 70), st.integers(0, 2**32))
def test_sample_peers_never_self_no_duplicates_right_size(n, k, seed):
    candidates = list(range(n))
    me = n // 2 if n else None
    sample = sample_peers(candidates, k, random.Random(seed), exclude=me)
    assert me not in sample
    assert len(set(sample)) == len(sample)
    assert len(sample) == min(k, n - (1 if me is not None else 0))
    assert set(sample) <= set(candidates)


@given(st.integers(1, 60), st.integers(0, 70), st.integers(0, 2**32))
def test_sample_peers_same_seed_same_sample(n, k, seed):
    candidates = list(range(n))
    first = sample_peers(candidates, k, random.Random(seed), exclude=0)
    assert sample_peers(candidates, k, random.Random(seed), exclude=0) == first


def test_sample_peers_is_uniform_over_candidates(rng):
    counts = dict.fromkeys(range(1, 21), 0)
    for _ in range(20_000):
        for peer in sample_peers(list(range(21)), 3, rng, exclude=0):
            counts[peer] += 1
    expected = 20_000 * 3 / 20
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 50.0  # 19 degrees of freedom: p < 1e-4 above this


def test_sample_peers_rejects_negative_k(rng):
    with pytest.raises(ConfigError, match="sample: got -1"):
        sample_peers([1, 2, 3], -1, rng)


@pytest.mark.parametrize(("n", "ok", "k"), [(6, 4, 2), (7, 7, 3), (8, 2, 3), (5, 3, 0), (9, 5, 9)])
def test_pass_probability_matches_enumeration(n, ok, k):
    population = [i < ok for i in range(n)]
    subsets = list(itertools.combinations(population, min(k, n)))
    exact = sum(all(s) for s in subsets) / len(subsets)
    assert math.isclose(pass_probability(n, ok, k), exact, rel_tol=1e-12)


@given(st.integers(0, 300), st.data())
def test_pass_probability_is_a_probability_that_grows_with_ok(n, data):
    ok = data.draw(st.integers(0, n))
    k = data.draw(st.integers(0, n + 5))
    p = pass_probability(n, ok, k)
    assert 0.0 <= p <= 1.0
    if ok < n:
        assert pass_probability(n, ok + 1, k) >= p


@pytest.mark.parametrize(("n", "ok", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, -1)])
def test_pass_probability_rejects_impossible_counts(n, ok, k):
    with pytest.raises(ConfigError):
        pass_probability(n, ok, k)


@pytest.mark.parametrize(
    ("text", "population", "expected"),
    [
        ("10", 200, 10),
        ("0", 200, 0),
        ("5%", 200, 10),
        ("0.1%", 200, 1),
        ("0%", 200, 0),
        ("100%", 37, 37),
    ],
)
def test_sample_size_parses_counts_and_percentages(text, population, expected):
    assert SampleSize.parse(text).resolve(population) == expected


@pytest.mark.parametrize("text", ["-1", "abc", "", "5.5", "101%", "-3%", "nan%", "%"])
def test_sample_size_rejects_bad_text_naming_the_field(text):
    with pytest.raises(ConfigError, match=r"^--sample: got"):
        SampleSize.parse(text, field="--sample")


def test_sample_size_prints_as_given():
    assert [str(SampleSize.parse(t)) for t in ("10", "5%")] == ["10", "5%"]
