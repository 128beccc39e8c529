"""Scenario models (compute time, stragglers) and the runner that turns a `SimConfig` into results.

Must not import io/, node/, asyncio, aiohttp, kademlia, time or module-level random.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from p2pml.core.barrier import get_policy
from p2pml.core.config import SimConfig, StepTimeConfig
from p2pml.sim.checker import AnalyticChecker, PolicyChecker
from p2pml.sim.engine import Population, Simulation, Trace

__all__ = ["RunResult", "expand_sweep", "run_scenario", "step_time_sampler"]


def _rng(seed: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random, independent of PYTHONHASHSEED.
    return random.Random(f"p2pml-sim:{seed}:{stream}")


def step_time_sampler(
    cfg: StepTimeConfig, rng: random.Random, slowdown: float
) -> Callable[[], float]:
    """A function that draws one compute time in seconds from `cfg`, times `slowdown`."""
    mean = cfg.mean_s * slowdown
    match cfg.dist:
        case "exponential":
            rate = 1.0 / mean
            return lambda: rng.expovariate(rate)
        case "gamma":
            shape, scale = cfg.shape, mean / cfg.shape
            return lambda: rng.gammavariate(shape, scale)
        case "lognormal":
            sigma = cfg.shape
            mu = math.log(mean) - sigma * sigma / 2.0
            return lambda: rng.lognormvariate(mu, sigma)
        case "constant":
            return lambda: mean
        case _:
            raise AssertionError(f"unvalidated step-time distribution {cfg.dist!r}")


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of one run: steps reached per node at the end and summary statistics.

    Attributes:
        config: the run's configuration.
        steps: steps completed by each node, by node index.
        stragglers: indices of the slowed-down nodes.
        mean_wait_fraction: the mean over nodes of the fraction of time spent blocked.
        n_blocks: how many checks blocked a node.
        trace: every step and wait, when the run was recorded.
    """

    config: SimConfig
    steps: tuple[int, ...]
    stragglers: tuple[int, ...]
    mean_wait_fraction: float
    n_blocks: int
    trace: Trace | None

    @property
    def min(self) -> int:
        return min(self.steps)

    @property
    def max(self) -> int:
        return max(self.steps)

    @property
    def median(self) -> float:
        return float(statistics.median(self.steps))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.steps)

    @property
    def spread(self) -> int:
        return self.max - self.min


def run_scenario(
    cfg: SimConfig, *, record: bool = False, progress: Callable[[float], None] | None = None
) -> RunResult:
    """Simulate one run.

    Args:
        cfg: the run; validated here.
        record: keep the full trace of steps and waits.
        progress: called now and then with the simulated time reached, in seconds.

    Raises:
        ConfigError: when `cfg` does not validate.
    """
    cfg.validate()
    n = cfg.nodes
    n_slow = round(cfg.straggler_fraction * n)
    stragglers = tuple(sorted(_rng(cfg.seed, "stragglers").sample(range(n), n_slow)))
    slowdown = [1.0] * n
    for node in stragglers:
        slowdown[node] = cfg.straggler_slowdown
    draws = [
        step_time_sampler(cfg.step_time, _rng(cfg.seed, f"compute:{j}"), slowdown[j])
        for j in range(n)
    ]
    population = Population(n)
    sim = Simulation(
        population,
        lambda node: draws[node](),
        duration_s=cfg.duration_s,
        check_delay_s=cfg.check_delay_s,
        poll_s=cfg.poll_s,
        record=record,
    )
    spec = get_policy(cfg.barrier)
    full_view = not spec.sampled and cfg.barrier != "asp"
    rngs = [_rng(cfg.seed, f"barrier:{j}") for j in range(n)]
    checker: AnalyticChecker | PolicyChecker
    if cfg.engine == "fast":
        checker = AnalyticChecker(
            population,
            cfg.params(),
            rngs,
            sample=cfg.sample,
            full_view=full_view,
            any_change=cfg.poll_s is None,
            hold_sample=cfg.hold_sample,
            group_rng=_rng(cfg.seed, "barrier-groups"),
        )
    else:
        checker = PolicyChecker(
            population,
            cfg.params(),
            rngs,
            sample=cfg.sample,
            full_view=full_view,
            any_change=cfg.poll_s is None,
            hold_sample=cfg.hold_sample,
        )
    sim.run(checker, progress)
    return RunResult(
        config=cfg,
        steps=tuple(population.steps),
        stragglers=stragglers,
        mean_wait_fraction=statistics.fmean(sim.wait_s) / cfg.duration_s,
        n_blocks=sim.n_blocks,
        trace=sim.trace,
    )


def expand_sweep(
    base: SimConfig, barriers: Sequence[str], samples: Sequence[int], stalenesses: Sequence[int]
) -> list[SimConfig]:
    """One config per barrier and per value of the parameters that barrier uses.

    bsp and asp run once; ssp once per staleness; pbsp once per sample; pssp once per pair.

    Raises:
        ConfigError: for an unknown barrier name.
    """
    configs: list[SimConfig] = []
    for name in barriers:
        spec = get_policy(name)
        for sample in samples if spec.sampled else samples[:1]:
            for staleness in stalenesses if spec.uses_staleness else stalenesses[:1]:
                configs.append(replace(base, barrier=name, sample=sample, staleness=staleness))
    return configs
