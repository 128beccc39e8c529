from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.barrier import (
    BARRIER_NAMES,
    AspParams,
    BarrierView,
    BspParams,
    Decision,
    PbspParams,
    PsspParams,
    SspParams,
    asp,
    bsp,
    decide,
    get_policy,
    make_params,
    min_peer_step,
    pbsp,
    pssp,
    ssp,
)
from p2pml.core.sampling import sample_peers
from p2pml.core.types import PeerId, Step
from p2pml.errors import ConfigError

PROCEED, WAIT = Decision.PROCEED, Decision.WAIT


def pid(i: int) -> PeerId:
    return PeerId(i.to_bytes(20, "big"))


@st.composite
def views(draw: st.DrawFn, min_peers: int = 0) -> BarrierView:
    my_step = draw(st.integers(0, 500))
    steps = draw(st.lists(st.integers(0, 520), min_size=min_peers, max_size=30))
    return BarrierView(
        Step(my_step), {pid(i): Step(s) for i, s in enumerate(steps)}, float(len(steps) + 1)
    )


def max_lag(view: BarrierView) -> int:
    return max([view.my_step - s for s in view.peer_steps.values()] + [0])


@given(views())
def test_asp_always_proceeds(view):
    assert asp(view, AspParams()) is PROCEED


@given(views())
def test_bsp_proceeds_iff_every_peer_reached_my_step(view):
    expected = all(s >= view.my_step for s in view.peer_steps.values())
    assert (bsp(view, BspParams()) is PROCEED) == expected


@given(views())
def test_ssp_with_zero_staleness_equals_bsp(view):
    assert ssp(view, SspParams(0)) is bsp(view, BspParams())


@given(views(), st.integers(0, 50))
def test_ssp_with_staleness_at_least_max_lag_equals_asp(view, extra):
    assert ssp(view, SspParams(max_lag(view) + extra)) is asp(view, AspParams())


@given(views(), st.integers(0, 40), st.booleans())
def test_ssp_proceeding_at_s_implies_proceeding_at_s_plus_one(view, s, strict):
    s = max(s, 1) if strict else s
    if ssp(view, SspParams(s, strict)) is PROCEED:
        assert ssp(view, SspParams(s + 1, strict)) is PROCEED


@given(views(), st.integers(1, 40))
def test_ssp_strict_at_s_equals_non_strict_at_s_minus_one(view, s):
    assert ssp(view, SspParams(s, strict=True)) is ssp(view, SspParams(s - 1))


@given(views(min_peers=1), st.integers(0, 10))
def test_ssp_waits_exactly_when_some_peer_lags_more_than_s(view, s):
    lagging = any(view.my_step - p > s for p in view.peer_steps.values())
    assert (ssp(view, SspParams(s)) is WAIT) == lagging


@given(views(), st.integers(0, 100), st.integers(0, 8), st.randoms(use_true_random=False))
def test_sampled_policies_over_the_full_population_equal_bsp_and_ssp(view, extra, s, rand):
    peers = sorted(view.peer_steps)
    beta = len(peers) + extra  # beta >= P - 1: the sample is everybody else
    sample = sample_peers(peers, beta, rand)
    sampled = BarrierView(
        view.my_step, {p: view.peer_steps[p] for p in sample}, view.population_estimate
    )
    assert pbsp(sampled, PbspParams(beta)) is bsp(view, BspParams())
    assert pssp(sampled, PsspParams(beta, s)) is ssp(view, SspParams(s))


@given(views(), st.integers(0, 8), st.randoms(use_true_random=False))
def test_sampled_policies_with_beta_zero_equal_asp(view, s, rand):
    sample = sample_peers(sorted(view.peer_steps), 0, rand)
    sampled = BarrierView(view.my_step, {p: view.peer_steps[p] for p in sample}, 1.0)
    assert pbsp(sampled, PbspParams(0)) is PROCEED
    assert pssp(sampled, PsspParams(0, s)) is PROCEED


@given(views(), st.sampled_from(BARRIER_NAMES), st.integers(0, 20), st.integers(1, 6))
def test_decide_agrees_with_min_peer_step(view, name, beta, s):
    params = make_params(name, sample=beta, staleness=s)
    lowest = min_peer_step(params, view.my_step)
    expected = lowest is None or all(p >= lowest for p in view.peer_steps.values())
    assert (decide(view, params) is PROCEED) == expected


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("bsp", BspParams()),
        ("ssp", SspParams(4)),
        ("asp", AspParams()),
        ("pbsp", PbspParams(10)),
        ("pssp", PsspParams(10, 4)),
    ],
)
def test_make_params_builds_each_registered_policy(name, params):
    assert make_params(name, sample=10, staleness=4) == params


def test_get_policy_unknown_name_lists_the_valid_names():
    with pytest.raises(ConfigError, match="barrier: got 'foo'; expected one of bsp, ssp, asp"):
        get_policy("foo")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample": -1}, "sample"),
        ({"staleness": -2}, "staleness"),
        ({"sample": True}, "sample"),
        ({"staleness": 1.5}, "staleness"),
    ],
)
def test_make_params_rejects_negative_or_non_integer_values(kwargs, field):
    with pytest.raises(ConfigError) as info:
        make_params("pssp", **kwargs)
    assert info.value.field == field


def test_make_params_strict_needs_positive_staleness():
    with pytest.raises(ConfigError, match="staleness: got 0"):
        make_params("ssp", staleness=0, strict=True)


def test_registry_flags_which_policies_sample_and_use_staleness():
    flags = {n: (get_policy(n).sampled, get_policy(n).uses_staleness) for n in BARRIER_NAMES}
    assert flags == {
        "bsp": (False, False),
        "ssp": (False, True),
        "asp": (False, False),
        "pbsp": (True, False),
        "pssp": (True, True),
    }
