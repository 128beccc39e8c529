from __future__ import annotations

import dataclasses

import pytest

from p2pml.core.config import SimConfig, StepTimeConfig
from p2pml.sim.engine import COMPLETE, EventQueue, Population, VirtualClock
from p2pml.sim.scenario import expand_sweep, run_scenario

SMALL = SimConfig(nodes=30, duration_s=40.0, sample=4, staleness=2, seed=3)


def test_event_queue_pops_in_time_order_and_breaks_ties_by_insertion():
    queue = EventQueue()
    for at, node in [(2.0, 1), (1.0, 2), (2.0, 3), (1.0, 4)]:
        queue.push(at, COMPLETE, node)
    assert [queue.pop() for _ in range(4)] == [
        (1.0, COMPLETE, 2),
        (1.0, COMPLETE, 4),
        (2.0, COMPLETE, 1),
        (2.0, COMPLETE, 3),
    ]


def test_virtual_clock_never_goes_back():
    clock = VirtualClock()
    clock.advance_to(2.5)
    assert clock() == 2.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)


def test_population_counts_nodes_at_or_above_a_step():
    population = Population(4)
    for node in (0, 0, 1, 3, 0):
        population.advance(node)
    assert population.steps == [3, 1, 0, 1]
    assert [population.count_at_least(s) for s in range(5)] == [4, 3, 1, 1, 0]


@pytest.mark.parametrize("engine", ["fast", "exact"])
@pytest.mark.parametrize("poll_s", [None, 0.1])
def test_same_seed_gives_a_byte_identical_trace(engine, poll_s):
    cfg = dataclasses.replace(SMALL, barrier="pssp", engine=engine, poll_s=poll_s)
    first = run_scenario(cfg, record=True).trace
    second = run_scenario(cfg, record=True).trace
    assert first is not None and second is not None
    assert first.to_bytes() == second.to_bytes()
    assert len(first.steps) > 0 and len(first.waits) > 0


def test_different_seeds_give_different_runs():
    a = run_scenario(dataclasses.replace(SMALL, seed=1)).steps
    b = run_scenario(dataclasses.replace(SMALL, seed=2)).steps
    assert a != b


def _max_spread_over_time(cfg: SimConfig) -> int:
    trace = run_scenario(cfg, record=True).trace
    assert trace is not None
    steps = [0] * cfg.nodes
    worst = 0
    for record in trace.steps:
        steps[record.node] = record.step
        worst = max(worst, max(steps) - min(steps))
    return worst


@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_bsp_keeps_every_node_within_one_step_at_all_times(engine):
    cfg = dataclasses.replace(SMALL, barrier="bsp", engine=engine)
    assert _max_spread_over_time(cfg) <= 1


@pytest.mark.parametrize("engine", ["fast", "exact"])
@pytest.mark.parametrize("staleness", [0, 2, 5])
def test_ssp_bounds_the_spread_by_staleness_plus_one(engine, staleness):
    cfg = dataclasses.replace(SMALL, barrier="ssp", staleness=staleness, engine=engine)
    assert _max_spread_over_time(cfg) <= staleness + 1


def test_asp_never_blocks():
    result = run_scenario(dataclasses.replace(SMALL, barrier="asp"))
    assert result.n_blocks == 0
    assert result.mean_wait_fraction == 0.0


@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_pbsp_with_beta_zero_never_blocks(engine):
    result = run_scenario(dataclasses.replace(SMALL, barrier="pbsp", sample=0, engine=engine))
    assert result.n_blocks == 0


def test_pbsp_with_full_sample_is_bsp():
    full = dataclasses.replace(SMALL, barrier="pbsp", sample=SMALL.nodes - 1)
    assert run_scenario(full).steps == run_scenario(dataclasses.replace(full, barrier="bsp")).steps


def test_pssp_with_full_sample_is_ssp():
    full = dataclasses.replace(SMALL, barrier="pssp", sample=SMALL.nodes + 5)
    assert run_scenario(full).steps == run_scenario(dataclasses.replace(full, barrier="ssp")).steps


def test_constant_steps_under_asp_give_exact_counts():
    cfg = dataclasses.replace(SMALL, barrier="asp", step_time=StepTimeConfig("constant", 0.5))
    assert set(run_scenario(cfg).steps) == {80}


@pytest.mark.parametrize("dist", ["exponential", "gamma", "lognormal", "constant"])
def test_every_step_time_distribution_has_the_configured_mean(dist):
    cfg = dataclasses.replace(
        SMALL, barrier="asp", nodes=100, duration_s=100.0, step_time=StepTimeConfig(dist, 0.25, 2.0)
    )
    assert run_scenario(cfg).mean == pytest.approx(400, rel=0.05)


def test_stragglers_slow_down_exactly_the_chosen_nodes():
    cfg = dataclasses.replace(
        SMALL,
        barrier="asp",
        nodes=40,
        duration_s=100.0,
        straggler_fraction=0.25,
        straggler_slowdown=4.0,
    )
    result = run_scenario(cfg)
    assert len(result.stragglers) == 10
    slow = [result.steps[n] for n in result.stragglers]
    fast = [s for n, s in enumerate(result.steps) if n not in result.stragglers]
    assert max(slow) < min(fast)


def test_a_straggler_drags_bsp_but_barely_slows_pssp():
    base = dataclasses.replace(
        SMALL, nodes=50, duration_s=60.0, straggler_fraction=0.02, straggler_slowdown=20.0
    )
    bsp_slow = run_scenario(dataclasses.replace(base, barrier="bsp")).median
    bsp_fair = run_scenario(dataclasses.replace(base, barrier="bsp", straggler_fraction=0.0)).median
    pssp_slow = run_scenario(dataclasses.replace(base, barrier="pssp")).median
    pssp_fair = run_scenario(dataclasses.replace(base, barrier="pssp", straggler_fraction=0.0))
    assert bsp_slow < 0.5 * bsp_fair
    assert pssp_slow > 0.85 * pssp_fair.median


def test_check_delay_slows_progress():
    fast = run_scenario(dataclasses.replace(SMALL, barrier="pssp")).median
    slow = run_scenario(dataclasses.replace(SMALL, barrier="pssp", check_delay_s=0.25)).median
    assert slow < fast


@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_polling_is_slower_than_re_checking_on_every_change(engine):
    any_change = run_scenario(dataclasses.replace(SMALL, barrier="pbsp", engine=engine)).median
    polled = run_scenario(
        dataclasses.replace(SMALL, barrier="pbsp", engine=engine, poll_s=0.5)
    ).median
    assert polled < any_change


def test_progress_reports_reach_the_end_of_the_run():
    seen: list[float] = []
    cfg = dataclasses.replace(SMALL, nodes=200, duration_s=100.0, barrier="asp")
    run_scenario(cfg, progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == cfg.duration_s
    assert len(seen) >= 2


def test_expand_sweep_runs_each_barrier_once_per_parameter_it_uses():
    configs = expand_sweep(SimConfig(), ["bsp", "ssp", "asp", "pbsp", "pssp"], [1, 2], [3, 4])
    labels = [(c.barrier, c.sample, c.staleness) for c in configs]
    assert labels == [
        ("bsp", 1, 3),
        ("ssp", 1, 3),
        ("ssp", 1, 4),
        ("asp", 1, 3),
        ("pbsp", 1, 3),
        ("pbsp", 2, 3),
        ("pssp", 1, 3),
        ("pssp", 1, 4),
        ("pssp", 2, 3),
        ("pssp", 2, 4),
    ]


def test_one_node_always_proceeds():
    result = run_scenario(dataclasses.replace(SMALL, nodes=1, barrier="bsp"))
    assert result.n_blocks == 0
