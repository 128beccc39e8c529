"""Stragglers: pBSP (beta = 2) against BSP over a fixed wall-time budget, 6 peer-mode nodes.

Every node trains the mlp on its shard of mnist-5k and takes `--base-slow` seconds of artificial
compute per step (so that step time, not the 2 cores, sets the pace); one node is a straggler. A
calibration run first measures a normal node's step time T with no straggler (ASP, same settings);
the straggler then gets ``--slow 5 T`` extra per step. Each barrier runs `--budget` seconds per seed
(the nodes in this process, each on its own 127.0.0.x, as real nodes over loopback). Reported per
barrier, as the mean over the seeds: steps per node, final test accuracy (mean over nodes), and the
time spent waiting; then the ratios against BSP in the same run. The targets (issue 5): pBSP
completes >= 1.5x the steps of BSP, with accuracy no more than 2 points below.

    python benchmarks/stragglers.py [--seeds 3] [--budget 15] [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.io.overlaybench import loopback_host
from p2pml.train.loop import TrainResult
from p2pml.train.session import Session

N_NODES = 6
BARRIERS = (("bsp", 0), ("pbsp", 2))


def node_config(i: int, barrier: str, beta: int, boot: Address | None) -> NodeConfig:
    host = loopback_host(40 + i)
    return NodeConfig(
        overlay=OverlayConfig(listen=Address(host, 0), refresh_interval_s=3600.0),
        data=DataPlaneConfig(listen=Address(host, 0)),
        bootstrap=(boot,) if boot is not None else (),
        barrier=barrier,
        sample=SampleSize(count=beta),
        staleness=4,
        min_peers=N_NODES - 1,
        discover_interval_s=0.5,
        linger_s=0.5,
    )


async def one_run(
    barrier: str, beta: int, seed: int, slows: list[float], budget_s: float
) -> list[TrainResult]:
    first: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    async def node(i: int) -> TrainResult:
        boot = None if i == 0 else await first
        session = Session.build(
            node_config(i, barrier, beta, boot),
            run_id=f"straggle-{barrier}-{seed}",
            model="mlp",
            dataset="mnist-5k",
            lr=0.05,
            momentum=0.9,
            batch_size=64,
            seed=seed,
            shard=(i, N_NODES),
        )
        ready = (lambda n: first.set_result(n.overlay.addr)) if i == 0 else None
        return await session.run(
            steps=10**6, slow_s=slows[i], on_ready=ready, time_budget_s=budget_s
        )

    return list(await asyncio.gather(*(node(i) for i in range(N_NODES))))


def summarise(results: list[TrainResult]) -> dict[str, float]:
    return {
        "steps_mean": statistics.fmean(r.steps for r in results),
        "steps_min": min(r.steps for r in results),
        "steps_max": max(r.steps for r in results),
        "accuracy": statistics.fmean(r.final_accuracy or 0.0 for r in results),
        "wait_fraction": statistics.fmean(r.wait_s / r.elapsed_s for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--base-slow", type=float, default=0.02, help="every node's step, s")
    parser.add_argument("--factor", type=float, default=5.0, help="straggler: this x step time")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    console = Console(stderr=True)

    console.print("calibrating: ASP, no straggler ...")
    calib_s = min(5.0, args.budget)
    calib = asyncio.run(one_run("asp", 0, 99, [args.base_slow] * N_NODES, calib_s))
    step_s = statistics.fmean(calib_s / r.steps for r in calib)  # each stops just past calib_s
    slows = [args.base_slow] * (N_NODES - 1) + [args.base_slow + args.factor * step_s]
    console.print(f"normal step {step_s * 1e3:.1f} ms; straggler +{slows[-1] * 1e3:.0f} ms/step")

    rows: dict[str, list[dict[str, float]]] = {}
    for barrier, beta in BARRIERS:
        for seed in range(args.seeds):
            started = time.monotonic()
            result = summarise(asyncio.run(one_run(barrier, beta, seed, slows, args.budget)))
            rows.setdefault(barrier, []).append(result)
            console.print(
                f"{barrier} seed {seed}: {result['steps_mean']:.0f} steps/node, accuracy "
                f"{result['accuracy']:.4f} ({time.monotonic() - started:.0f} s)"
            )
    means = {b: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for b, rs in rows.items()}
    table = Table(
        title=f"6 nodes, one straggler at {args.factor:g}x the step time, "
        f"{args.budget:g} s per run, mean of {args.seeds} seeds"
    )
    for name in (
        "barrier",
        "steps/node",
        "min..max",
        "accuracy",
        "waiting",
        "steps vs bsp",
        "accuracy vs bsp",
    ):
        table.add_column(name, justify="right")
    for barrier, beta in BARRIERS:
        m = means[barrier]
        table.add_row(
            barrier if not beta else f"{barrier} (β={beta})",
            f"{m['steps_mean']:.0f}",
            f"{m['steps_min']:.0f}..{m['steps_max']:.0f}",
            f"{m['accuracy']:.4f}",
            f"{m['wait_fraction']:.0%}",
            f"{m['steps_mean'] / means['bsp']['steps_mean']:.2f}x",
            f"{(m['accuracy'] - means['bsp']['accuracy']) * 100:+.2f} pts",
        )
    Console().print(table)
    ratio = means["pbsp"]["steps_mean"] / means["bsp"]["steps_mean"]
    drop = (means["bsp"]["accuracy"] - means["pbsp"]["accuracy"]) * 100
    print(
        f"target: pbsp steps >= 1.5x bsp: {'met' if ratio >= 1.5 else 'missed'} ({ratio:.2f}x); "
        f"accuracy within 2 points: {'met' if drop <= 2 else 'missed'} ({-drop:+.2f} pts)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"step_s": step_s, "slows": slows, "runs": rows, "means": means}, indent=1)
        )
    if args.plot:
        plot(means, args.plot)
    return 0


def plot(means: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = list(means)
    left.bar(names, [means[n]["steps_mean"] for n in names], color=["#777", "#2a7"])
    left.set_ylabel("steps per node in the budget")
    right.bar(names, [means[n]["accuracy"] * 100 for n in names], color=["#777", "#2a7"])
    right.set_ylabel("final test accuracy, %")
    right.set_ylim(min(means[n]["accuracy"] for n in names) * 100 - 5, 100)
    fig.suptitle("6 nodes, one straggler: BSP vs pBSP (β=2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
