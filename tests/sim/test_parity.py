"""The fast (analytic) path must match the policy-driven path: exactly where decisions are
deterministic, statistically where they are random."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
from scipy import stats

from p2pml.core.config import SimConfig
from p2pml.sim.scenario import run_scenario

BASE = SimConfig(nodes=40, duration_s=50.0, sample=4, staleness=2)
SEEDS = range(12)


def _runs(cfg: SimConfig) -> tuple[list[float], list[float]]:
    results = [run_scenario(dataclasses.replace(cfg, seed=seed)) for seed in SEEDS]
    return [r.mean for r in results], [float(r.spread) for r in results]


def _agree(a: list[float], b: list[float], rel: float) -> bool:
    """Same mean within `rel`, and a Welch t-test that does not reject equality at 0.1 %."""
    close = abs(statistics.fmean(a) - statistics.fmean(b)) <= rel * statistics.fmean(b)
    if statistics.pstdev(a) == statistics.pstdev(b) == 0.0:
        return close
    return close and stats.ttest_ind(a, b, equal_var=False).pvalue > 0.001


@pytest.mark.parametrize("barrier", ["bsp", "ssp", "asp"])
@pytest.mark.parametrize("poll_s", [None, 0.2])
def test_deterministic_policies_give_identical_steps_on_both_paths(barrier, poll_s):
    cfg = dataclasses.replace(BASE, barrier=barrier, poll_s=poll_s, seed=5)
    fast = run_scenario(cfg)
    exact = run_scenario(dataclasses.replace(cfg, engine="exact"))
    assert fast.steps == exact.steps
    assert fast.n_blocks == exact.n_blocks


CASES = {
    "pbsp, fresh samples, any change": {"barrier": "pbsp"},
    "pssp, fresh samples, any change": {"barrier": "pssp"},
    "pbsp, fresh samples, polled": {"barrier": "pbsp", "poll_s": 0.2},
    "pssp, fresh samples, polled": {"barrier": "pssp", "poll_s": 0.2},
    "pssp, held sample, any change": {"barrier": "pssp", "hold_sample": True},
    "pbsp, held sample, polled": {"barrier": "pbsp", "hold_sample": True, "poll_s": 0.2},
    "pssp, network delay": {"barrier": "pssp", "check_delay_s": 0.05},
    "pbsp, stragglers": {"barrier": "pbsp", "straggler_fraction": 0.1, "straggler_slowdown": 3.0},
}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("changes", CASES.values(), ids=list(CASES))
def test_fast_path_matches_policy_driven_path_statistically(changes):
    cfg = dataclasses.replace(BASE, **changes)
    fast_means, fast_spreads = _runs(cfg)
    exact_means, exact_spreads = _runs(dataclasses.replace(cfg, engine="exact"))
    assert _agree(fast_means, exact_means, rel=0.02), (fast_means, exact_means)
    assert _agree(fast_spreads, exact_spreads, rel=0.25), (fast_spreads, exact_spreads)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_parity_criterion_detects_a_neighbouring_sample_size():
    fast_means, _ = _runs(dataclasses.replace(BASE, barrier="pbsp", sample=4))
    exact_means, _ = _runs(dataclasses.replace(BASE, barrier="pbsp", sample=5, engine="exact"))
    assert not _agree(fast_means, exact_means, rel=0.02)
