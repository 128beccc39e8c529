"""Simulator sweep from Python: how the sample size beta trades progress for consistency.

Runs pSSP (s = 4) on 200 simulated nodes for several sample sizes, next to BSP and ASP, and prints
the steps reached. With the defaults it takes a few seconds:

    python examples/simulate_sweep.py [--nodes 200] [--duration 200] [--seed 1]
"""

from __future__ import annotations

import argparse
import dataclasses

from p2pml import SimConfig
from p2pml.sim.scenario import run_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--duration", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    base = SimConfig(nodes=args.nodes, duration_s=args.duration, seed=args.seed, staleness=4)
    runs = [dataclasses.replace(base, barrier="bsp"), dataclasses.replace(base, barrier="asp")]
    runs += [dataclasses.replace(base, barrier="pssp", sample=b) for b in (1, 4, 16, 64)]
    print(f"{'run':<16}{'min':>6}{'median':>8}{'max':>6}{'spread':>8}")
    for cfg in runs:
        result = run_scenario(cfg)
        name = cfg.barrier if cfg.barrier != "pssp" else f"pssp β={cfg.sample}"
        print(f"{name:<16}{result.min:>6}{result.median:>8g}{result.max:>6}{result.spread:>8}")


if __name__ == "__main__":
    main()
