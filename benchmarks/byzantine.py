"""Byzantine peers: 6 peer-mode nodes, one sending its delta sign-flipped and times 100, with
and without robust aggregation (issue 8).

Every node trains the mlp on its shard of mnist-5k under pSSP (beta = 2, s = 4) for a fixed number
of steps, in this process, each on its own 127.0.0.x, as real nodes over loopback. The attacker
(node 5) trains honestly but sends -100 x its change to its peers (`SignFlipper`, a trainer
subclass that exists only here and in the tests). Runs, each with the same seeds:

- clean: no attacker, the plain mean (the baseline measured in the same invocation);
- clean with the median and the norm filter (what robust aggregation costs when nobody attacks);
- attacked, with the plain mean (the damage), then with each robust rule alone (median,
  trimmed_mean, centered_clip; norm filter off), then with the median and the norm filter (10),
  and with the norm filter alone (mean, 10).

Reported per run: the honest nodes' final test accuracy (mean and minimum), the deltas their norm
filters dropped (``rejected_outlier``), the wall time, and the difference against the clean run.
The target (issue 8): with robust aggregation on, within 2 points of the clean run.

    python benchmarks/byzantine.py [--steps 300] [--seeds 1] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.io.overlaybench import loopback_host
from p2pml.node.node import StepInputs
from p2pml.protocol.aggregate import AggregationConfig
from p2pml.protocol.messages import TensorBlob
from p2pml.train.loop import Batch, Trainer, TrainResult
from p2pml.train.session import Session

N_NODES = 6
ATTACKER = N_NODES - 1
FLIP = -100.0


class SignFlipper(Trainer):
    """A peer that trains honestly but sends ``FLIP`` x its change (benchmark and tests only)."""

    def _step(
        self, inputs: StepInputs, batches: Iterator[Batch], step: int
    ) -> tuple[float, tuple[TensorBlob, ...]]:
        loss, blobs = super()._step(inputs, batches, step)
        return loss, tuple(TensorBlob(b.name, b.array * FLIP) for b in blobs)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    attacked: bool
    rule: str
    norm_factor: float

    @property
    def aggregation(self) -> AggregationConfig:
        return AggregationConfig.build(self.rule, norm_factor=self.norm_factor)


CASES = (
    Case("clean", False, "mean", 0.0),
    Case("clean", False, "median", 10.0),  # what the rule costs when nobody attacks
    Case("attacked", True, "mean", 0.0),
    Case("attacked", True, "median", 0.0),
    Case("attacked", True, "trimmed_mean", 0.0),
    Case("attacked", True, "centered_clip", 0.0),
    Case("attacked", True, "median", 10.0),
    Case("attacked", True, "mean", 10.0),  # the norm filter alone
)


def node_config(i: int, boot: Address | None) -> NodeConfig:
    host = loopback_host(60 + i)
    return NodeConfig(
        overlay=OverlayConfig(listen=Address(host, 0), refresh_interval_s=3600.0),
        data=DataPlaneConfig(listen=Address(host, 0)),
        bootstrap=(boot,) if boot is not None else (),
        barrier="pssp",
        sample=SampleSize(count=2),
        staleness=4,
        min_peers=N_NODES - 1,
        discover_interval_s=0.5,
        linger_s=0.5,
    )


async def one_run(case: Case, seed: int, steps: int) -> list[TrainResult]:
    """The six nodes' results; the attacker's (when there is one) is the last."""
    first: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    async def node(i: int) -> TrainResult:
        boot = None if i == 0 else await first
        attacker = case.attacked and i == ATTACKER
        session = Session.build(
            node_config(i, boot),
            run_id=f"byzantine-{seed}",
            model="mlp",
            dataset="mnist-5k",
            lr=0.05,
            momentum=0.9,
            batch_size=64,
            seed=seed,
            shard=(i, N_NODES),
            aggregation=None if attacker else case.aggregation,
        )
        ready = (lambda n: first.set_result(n.overlay.addr)) if i == 0 else None
        return await session.run(
            steps=steps, on_ready=ready, trainer_class=SignFlipper if attacker else Trainer
        )

    return list(await asyncio.gather(*(node(i) for i in range(N_NODES))))


def summarise(case: Case, results: list[TrainResult], wall_s: float) -> dict[str, float]:
    honest = results[:ATTACKER] if case.attacked else results
    accuracies = [r.final_accuracy or 0.0 for r in honest]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_min": min(accuracies),
        "rejected_outlier": sum(r.counters.get("rejected_outlier", 0) for r in honest),
        "deltas_received": sum(r.counters.get("deltas_received", 0) for r in honest),
        "wall_s": wall_s,
    }


def label(case: Case) -> tuple[str, str]:
    return f"{case.name}, {case.rule}", f"{case.norm_factor:g}x" if case.norm_factor else "off"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    console = Console(stderr=True)

    rows: dict[str, list[dict[str, float]]] = {}
    for case in CASES:
        key = " / ".join(label(case))
        for seed in range(args.seeds):
            started = time.monotonic()
            results = asyncio.run(one_run(case, seed, args.steps))
            row = summarise(case, results, time.monotonic() - started)
            rows.setdefault(key, []).append(row)
            console.print(
                f"{key} seed {seed}: honest accuracy {row['accuracy_mean']:.4f} "
                f"(min {row['accuracy_min']:.4f}), rejected_outlier {row['rejected_outlier']:.0f} "
                f"({row['wall_s']:.0f} s)"
            )
    means = {k: {f: statistics.fmean(r[f] for r in rs) for f in rs[0]} for k, rs in rows.items()}
    clean = means[" / ".join(label(CASES[0]))]
    table = Table(
        title=f"6 nodes (pssp, β=2, s=4), mlp on mnist-5k, {args.steps} steps; node 5 sends "
        f"{FLIP:g} x its delta; mean of {args.seeds} seed(s)"
    )
    for name in (
        "run, rule",
        "norm filter",
        "honest accuracy",
        "min",
        "rejected_outlier",
        "wall s",
        "vs clean",
    ):
        table.add_column(name, justify="right")
    for case in CASES:
        run_rule, gate = label(case)
        m = means[f"{run_rule} / {gate}"]
        table.add_row(
            run_rule,
            gate,
            f"{m['accuracy_mean']:.4f}",
            f"{m['accuracy_min']:.4f}",
            f"{m['rejected_outlier']:.0f}",
            f"{m['wall_s']:.1f}",
            f"{(m['accuracy_mean'] - clean['accuracy_mean']) * 100:+.2f} pts",
        )
    Console(width=120).print(table)
    for case in CASES:
        if not case.attacked or case.aggregation.is_plain:
            continue
        key = " / ".join(label(case))
        drop = (clean["accuracy_mean"] - means[key]["accuracy_mean"]) * 100
        print(f"target: {key} within 2 points of clean: {'met' if drop <= 2 else 'missed'}")
    if args.json:
        payload = {"steps": args.steps, "seeds": args.seeds, "runs": rows, "means": means}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
