"""Robust aggregation rules and the norm filter: agreement with the mean where nothing is wrong,
bounded damage where one delta in several is hostile, and bad arguments refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2pml.errors import ConfigError
from p2pml.protocol.aggregate import (
    RULES,
    AggregationRule,
    NormFilter,
    combine,
    combine_group,
    delta_norm,
)

SHAPES = [(3, 4), (5,)]


def honest(rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    """n deltas close to a common direction (every peer's gradient of one model)."""
    base = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return [
        [b + 0.05 * rng.standard_normal(b.shape).astype(np.float32) for b in base] for _ in range(n)
    ]


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return delta_norm(
        [x.astype(np.float64) - y.astype(np.float64) for x, y in zip(a, b, strict=True)]
    )


@pytest.mark.parametrize("name", RULES)
def test_identical_deltas_combine_to_themselves(name):
    delta = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, np.float32)]
    out = combine([delta] * 5, AggregationRule(name))
    assert [o.shape for o in out] == [(3, 4), (5,)] and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], delta[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], delta[1], rtol=1e-6)


def test_the_default_rule_is_the_plain_mean():
    deltas = honest(np.random.default_rng(0), 4)
    out = combine(deltas)
    for k in range(2):
        np.testing.assert_allclose(out[k], np.mean([d[k] for d in deltas], axis=0), rtol=1e-6)


def test_trimmed_mean_without_trim_and_clipping_with_a_wide_radius_are_the_mean():
    deltas = honest(np.random.default_rng(1), 6)
    mean = combine(deltas)
    np.testing.assert_allclose(
        combine(deltas, AggregationRule("trimmed_mean", trim=0.0))[0], mean[0], rtol=1e-6
    )
    clipped = combine(deltas, AggregationRule("centered_clip", radius=1e6, iterations=1))
    np.testing.assert_allclose(clipped[0], mean[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rule",
    [
        AggregationRule("median"),
        AggregationRule("trimmed_mean", trim=0.2),
        AggregationRule("centered_clip", radius=0.5, iterations=3),
    ],
)
def test_one_sign_flipped_delta_times_100_barely_moves_a_robust_rule(rule):
    """Five honest peers and one sending -100 x its delta: the mean is wrecked, a robust rule
    stays near the honest mean."""
    rng = np.random.default_rng(2)
    good = honest(rng, 5)
    attack = [-100.0 * a for a in good[0]]
    target = combine(good)
    scale = delta_norm(target)
    assert distance(combine([*good, attack]), target) > 10 * scale  # the plain mean is wrecked
    assert distance(combine([*good, attack], rule), target) < 0.5 * scale


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda n: st.lists(
            arrays(np.float64, (4,), elements=st.floats(-1e3, 1e3)), min_size=n, max_size=n
        )
    ),
    st.sampled_from(RULES),
    st.randoms(use_true_random=False),
)
def test_rules_ignore_order_and_stay_within_the_inputs(vectors, name, rnd):
    deltas = [[v] for v in vectors]
    rule = AggregationRule(name, trim=0.25, radius=10.0)
    out = combine(deltas, rule)[0]
    shuffled = list(deltas)
    rnd.shuffle(shuffled)
    np.testing.assert_allclose(combine(shuffled, rule)[0], out, rtol=1e-9, atol=1e-9)
    stack = np.stack(vectors)
    if name != "centered_clip":  # coordinate-wise rules stay inside each coordinate's range
        assert np.all(out >= stack.min(axis=0) - 1e-9) and np.all(out <= stack.max(axis=0) + 1e-9)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (AggregationRule("mode"), "aggregation"),  # type: ignore[arg-type]
        (AggregationRule("trimmed_mean", trim=0.5), "trim"),
        (AggregationRule("centered_clip", radius=0.0), "radius"),
        (AggregationRule("centered_clip", radius=float("inf")), "radius"),
        (AggregationRule("centered_clip", iterations=0), "iterations"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(rule, field):
    with pytest.raises(ConfigError) as info:
        combine([[np.zeros(2)]], rule)
    assert info.value.field == field


def test_no_deltas_or_mismatched_shapes_are_refused():
    with pytest.raises(ConfigError, match="at least one"):
        combine([])
    with pytest.raises(ConfigError, match="delta 1 shapes"):
        combine([[np.zeros(3)], [np.zeros(4)]])


def test_the_norm_filter_drops_a_delta_far_out_of_line_after_warming_up():
    rng = np.random.default_rng(3)
    gate = NormFilter(factor=10.0, window=8, warmup=4)
    big = [100.0 * a for a in honest(rng, 1)[0]]
    assert gate.admit(big)  # nothing to compare with yet: admitted
    gate = NormFilter(factor=10.0, window=8, warmup=4)
    for delta in honest(rng, 4):
        assert gate.admit(delta)
    assert gate.limit is not None
    assert not gate.admit(big)
    assert gate.admit(honest(rng, 1)[0])
    for _ in range(50):  # a flood of large deltas never raises the limit
        assert not gate.admit(big)
    assert not gate.admit([np.full(3, np.nan)])


def test_the_norm_filter_window_is_bounded():
    gate = NormFilter(window=4, warmup=2)
    for i in range(100):
        gate.admit([np.full(2, 1.0 + i % 3)])
    assert len(gate._norms) == 4


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"factor": 1.0}, "norm factor"), ({"warmup": 0}, "norm warmup")]
)
def test_bad_norm_filters_are_refused(kwargs, field):
    with pytest.raises(ConfigError) as info:
        NormFilter(**kwargs)
    assert info.value.field == field


def test_trimmed_mean_trims_one_value_at_each_end_of_a_small_group():
    """0.1 x 5 rounds up: of five deltas the largest and smallest go, whatever the trim > 0."""
    deltas = [[np.array([v])] for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = combine(deltas, AggregationRule("trimmed_mean", trim=0.1))
    np.testing.assert_allclose(out[0], [3.0])


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_centered_clip_without_a_radius_follows_the_deltas_scale(scale):
    rng = np.random.default_rng(4)
    good = [[scale * a for a in d] for d in honest(rng, 5)]
    attack = [-100.0 * a for a in good[0]]
    target = combine(good)
    out = combine([*good, attack], AggregationRule("centered_clip"))
    assert distance(out, target) < 0.5 * delta_norm(target)


def test_combine_group_leaves_the_mean_and_small_groups_to_the_caller():
    deltas = honest(np.random.default_rng(5), 2)
    assert combine_group(deltas, AggregationRule("median")) is None  # two cannot outvote
    assert combine_group([*deltas, deltas[0]], AggregationRule("mean")) is None
    own = honest(np.random.default_rng(6), 1)[0]
    out = combine_group(deltas, AggregationRule("median"), own=own)  # own is the third vote
    assert out is not None
    expected = np.median(np.stack([deltas[0][0], deltas[1][0], own[0]]), axis=0)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_the_norm_filter_is_armed_by_trusted_norms():
    gate = NormFilter(factor=10.0, warmup=4)
    for _ in range(4):
        gate.observe(1.0)
    gate.observe(float("nan"))  # ignored
    assert gate.limit == 10.0
    assert gate.admit_norm(9.0) and not gate.admit_norm(11.0)


def test_delta_norm_of_float16_does_not_overflow():
    big = np.full(1_000_000, 0.3, dtype=np.float16)
    assert delta_norm([big]) == pytest.approx(300.0, rel=1e-3)
