"""The centralised mode under heterogeneous workers, as in the bounded-delay parameter-server
experiments: one parameter server, 10 workers whose steps take 0.2 to 1.2 s (``--slow``, evenly
spread), the mlp on mnist-5k (each worker its own shard), all in this process on 127.0.0.x.

For each barrier (BSP, SSP(4), ASP, pBSP(β=2), pSSP(β=2, s=4)) the run goes on until the server
has applied `--updates` worker deltas (one delta folded into the model is one update; a BSP round
is 10), counted from the moment the 10th worker registered. Reported per barrier: the time per
100 updates, the test accuracy of the server's model at that point, the model versions, and the
staleness of the applied deltas (server version when applied minus the version the delta was
computed from): mean, variance and maximum; then the speed against BSP measured in the same run.

    python benchmarks/central.py [--updates 400] [--workers 10] [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pml.core.config import DataPlaneConfig
from p2pml.core.run import NodeConfig
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.io.overlaybench import loopback_host
from p2pml.node.server import ParameterServer
from p2pml.train.session import Session

BARRIERS = (("bsp", 0), ("ssp", 0), ("asp", 0), ("pbsp", 2), ("pssp", 2))


def config(i: int, barrier: str, beta: int, n_workers: int) -> NodeConfig:
    host = loopback_host(60 + i)
    return NodeConfig(
        data=DataPlaneConfig(listen=Address(host, 0)),
        barrier=barrier,
        sample=SampleSize(count=beta),
        staleness=4,
        min_peers=n_workers,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=5.0,
    )


def session(i: int, barrier: str, beta: int, n_workers: int) -> Session:
    return Session.build(
        config(i, barrier, beta, n_workers),
        run_id=f"central-{barrier}",
        model="mlp",
        dataset="mnist-5k",
        lr=0.05,
        momentum=0.9,
        batch_size=64,
        seed=0,
        shard=(i - 1, n_workers) if i else None,
    )


async def one_run(barrier: str, beta: int, slows: list[float], updates: int) -> dict[str, float]:
    n = len(slows)
    ready: asyncio.Future[ParameterServer] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(session(0, barrier, beta, n).serve(on_ready=ready.set_result))
    server = await ready
    workers = [
        asyncio.create_task(
            session(i + 1, barrier, beta, n).run(
                steps=10**6, slow_s=slows[i], server=server.data.addr
            )
        )
        for i in range(n)
    ]
    try:
        while server.machine.n_registered < n:  # noqa: ASYNC110 (a counter, polled)
            await asyncio.sleep(0.005)
        began = time.monotonic()
        while server.counters["deltas_received"] < updates:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - began
        applied = server.counters["deltas_received"]
        accuracy = await server.evaluate_now()
    finally:
        for task in (*workers, serving):
            task.cancel()
        for task in (*workers, serving):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    stale = server.staleness
    return {
        "s_per_100": elapsed / applied * 100,
        "updates": applied,
        "versions": server.version,
        "accuracy": accuracy or 0.0,
        "staleness_mean": stale.mean,
        "staleness_var": stale.variance,
        "staleness_max": stale.max,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=400, help="deltas applied per barrier")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--slowest", type=float, default=1.2, help="slowest worker's step, s")
    parser.add_argument("--fastest", type=float, default=0.2, help="fastest worker's step, s")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    console = Console(stderr=True)
    n = args.workers
    spread = (args.slowest - args.fastest) / max(1, n - 1)
    slows = [args.fastest + i * spread for i in range(n)]
    console.print(f"{n} workers, --slow {', '.join(f'{s:.2f}' for s in slows)} s")

    rows: dict[str, dict[str, float]] = {}
    for barrier, beta in BARRIERS:
        name = f"{barrier}(β={beta})" if beta else barrier
        if barrier in ("ssp", "pssp"):
            name = f"{barrier}(s=4{f', β={beta}' if beta else ''})"
        started = time.monotonic()
        rows[name] = asyncio.run(one_run(barrier, beta, slows, args.updates))
        r = rows[name]
        console.print(
            f"{name}: {r['s_per_100']:.2f} s per 100 updates, accuracy {r['accuracy']:.4f} "
            f"({time.monotonic() - started:.0f} s)"
        )

    table = Table(
        title=f"parameter server, {n} workers at {args.fastest:g}..{args.slowest:g} s per step, "
        f"mlp on mnist-5k, {args.updates} updates each"
    )
    for column in (
        "barrier",
        "s / 100 updates",
        "speed vs bsp",
        "accuracy",
        "versions",
        "staleness mean",
        "variance",
        "max",
    ):
        table.add_column(column, justify="right")
    base = rows["bsp"]["s_per_100"]
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['s_per_100']:.2f}",
            f"{base / r['s_per_100']:.2f}x",
            f"{r['accuracy']:.4f}",
            f"{r['versions']:.0f}",
            f"{r['staleness_mean']:.2f}",
            f"{r['staleness_var']:.2f}",
            f"{r['staleness_max']:.0f}",
        )
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"slows": slows, "runs": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    colours = ["#777", "#a63", "#36a", "#2a7", "#a2a"]
    for ax, key, label in (
        (axes[0], "s_per_100", "seconds per 100 updates"),
        (axes[1], "accuracy", "test accuracy at the end"),
        (axes[2], "staleness_mean", "mean staleness (versions)"),
    ):
        values = [rows[n][key] for n in names]
        ax.bar(names, values, color=colours[: len(names)])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    lowest = min(rows[n]["accuracy"] for n in names)
    axes[1].set_ylim(
        max(0.0, lowest - 0.05), min(1.0, max(rows[n]["accuracy"] for n in names) + 0.02)
    )
    axes[2].errorbar(
        names,
        [rows[n]["staleness_mean"] for n in names],
        yerr=[rows[n]["staleness_var"] ** 0.5 for n in names],
        fmt="none",
        ecolor="black",
        capsize=3,
    )
    fig.suptitle("parameter server with heterogeneous workers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
