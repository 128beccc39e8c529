"""The baseline model reproduces the published PSP figure and beta sweep (DESIGN.md section 6).

Published values (Wang, Catterall and Mortier, arXiv 1709.07772): P = 200, T = 200 s, exponential
steps with mean 0.5 s, fresh samples; SSP(4) ~ 225, pBSP(10) ~ 258, pSSP(4, 10) in 335-380, ASP
median ~ 405, BSP ~ 55; the pBSP sweep ~ 405/400/380/340/278/218/170/135 for beta = 0/1/2/4/8/16/
32/64.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import cache

import pytest

from p2pml.core.config import SimConfig
from p2pml.sim.scenario import RunResult, run_scenario

BASELINE = SimConfig(nodes=200, duration_s=200.0, sample=10, staleness=4)
SWEEP = {0: 405, 1: 400, 2: 380, 4: 340, 8: 278, 16: 218, 32: 170, 64: 135}
SEEDS = [1, 2]


@cache
def run(barrier: str, seed: int, sample: int = 10) -> RunResult:
    return run_scenario(dataclasses.replace(BASELINE, barrier=barrier, seed=seed, sample=sample))


def medians(seed: int) -> dict[str, float]:
    return {b: run(b, seed).median for b in ("bsp", "ssp", "asp", "pbsp", "pssp")}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("barrier", "published"), [("ssp", 225), ("pbsp", 258), ("asp", 405)])
def test_baseline_median_is_within_15_percent_of_the_published_value(seed, barrier, published):
    assert run(barrier, seed).median == pytest.approx(published, rel=0.15)


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_pssp_median_is_within_15_percent_of_the_published_range(seed):
    assert 335 * 0.85 <= run("pssp", seed).median <= 380 * 1.15


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_asp_range_is_at_least_80_steps(seed):
    assert run("asp", seed).spread >= 80


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_barriers_are_ordered_as_published(seed):
    m = medians(seed)
    assert m["bsp"] < m["ssp"] and m["bsp"] < m["pbsp"]
    assert max(m["ssp"], m["pbsp"]) < m["pssp"] < m["asp"]


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_bsp_is_well_below_ssp_and_near_the_order_statistic(seed):
    # A BSP superstep lasts the max of 200 exponentials: 0.5 s * H_200 = 2.94 s, so ~68 steps.
    bsp = run("bsp", seed).median
    assert bsp < 0.4 * run("ssp", seed).median
    assert bsp == pytest.approx(68, rel=0.08)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("beta", "published"), SWEEP.items())
def test_pbsp_sweep_median_is_within_15_percent_of_the_published_value(seed, beta, published):
    assert run("pbsp", seed, beta).median == pytest.approx(published, rel=0.15)


@pytest.mark.parametrize("seed", SEEDS)
def test_pbsp_sweep_medians_strictly_decrease_with_beta(seed):
    sweep = [run("pbsp", seed, beta).median for beta in SWEEP]
    assert all(a > b for a, b in itertools.pairwise(sweep)), sweep


@pytest.mark.parametrize("seed", SEEDS)
def test_pbsp_range_at_beta_64_is_under_a_quarter_of_the_range_at_beta_1(seed):
    assert run("pbsp", seed, 64).spread < run("pbsp", seed, 1).spread / 4
