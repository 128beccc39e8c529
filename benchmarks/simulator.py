"""Simulator speed against the targets of DESIGN.md section 7, with a baseline from the same run.

Rows:
  five-barriers  all of bsp, ssp, asp, pbsp, pssp at P = 200, T = 200 s (target: <= 5 s in total).
  pssp-10k       pSSP(beta = 10, s = 4) at P = 10,000, T = 200 s, re-checks every 0.05 s
                 (target: <= 120 s).
Each row's baseline is the policy-driven engine (it draws every sample and builds every view, as a
naive event loop does) on the same scenario but a shorter duration (5 % of it; 1 % at P = 10,000),
scaled up linearly to the full duration; `speedup` is baseline / fast. Wall times are the median
of --repeat runs.

    python benchmarks/simulator.py [--repeat 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from p2pml.core.config import SimConfig
from p2pml.sim.scenario import run_scenario

FIVE = ("bsp", "ssp", "asp", "pbsp", "pssp")


def wall_s(configs: Sequence[SimConfig]) -> float:
    started = time.perf_counter()
    for cfg in configs:
        run_scenario(cfg)
    return time.perf_counter() - started


def measure(
    name: str, configs: list[SimConfig], *, baseline_share: float, repeat: int, target_s: float
) -> dict[str, object]:
    fast = statistics.median(wall_s(configs) for _ in range(repeat))
    short = [
        dataclasses.replace(c, engine="exact", duration_s=c.duration_s * baseline_share)
        for c in configs
    ]
    baseline = wall_s(short) / baseline_share
    return {
        "row": name,
        "nodes": configs[0].nodes,
        "duration": configs[0].duration_s,
        "runs": len(configs),
        "fast_s": round(fast, 3),
        "target_s": target_s,
        "baseline_s": round(baseline, 2),
        "speedup": round(baseline / fast, 1),
        "meets_target": fast <= target_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="p2pml simulator benchmark")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="P = 1,000 instead of 10,000")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    base = SimConfig(nodes=200, duration_s=200.0, sample=10, staleness=4, seed=1)
    rows = [
        measure(
            "five-barriers",
            [dataclasses.replace(base, barrier=b) for b in FIVE],
            baseline_share=0.05,
            repeat=args.repeat,
            target_s=5.0,
        )
    ]
    big = dataclasses.replace(
        base, barrier="pssp", nodes=1_000 if args.quick else 10_000, poll_s=0.05
    )
    rows.append(
        measure(
            "pssp-1k" if args.quick else "pssp-10k",
            [big],
            baseline_share=0.05,
            repeat=1 if not args.quick else args.repeat,
            target_s=120.0,
        )
    )
    table = Table(title="simulator wall time (fast path) against the policy-driven baseline")
    for column in (
        "row",
        "nodes",
        "duration",
        "runs",
        "fast_s",
        "target_s",
        "baseline_s",
        "speedup",
        "meets_target",
    ):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=140).print(table)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
