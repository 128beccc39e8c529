"""Robust aggregation end to end (issue 8): the flags of ``p2pml run``, and a sign-flipping peer
among six real nodes, which wrecks the honest nodes' models under the plain mean and not under the
coordinate-wise median."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from nodes import node_config

from p2pml.cli import main
from p2pml.cli.local import _check_run_flags
from p2pml.node.node import StepInputs
from p2pml.protocol.aggregate import AggregationConfig
from p2pml.protocol.messages import TensorBlob
from p2pml.train.loop import Batch, Trainer
from p2pml.train.session import Session

pytestmark = pytest.mark.integration

N = 6


class SignFlipper(Trainer):
    """Trains honestly, sends -100 x its change."""

    def _step(
        self, inputs: StepInputs, batches: Iterator[Batch], step: int
    ) -> tuple[float, tuple[TensorBlob, ...]]:
        loss, blobs = super()._step(inputs, batches, step)
        return loss, tuple(TensorBlob(b.name, b.array * -100.0) for b in blobs)


async def attacked_run(aggregation: AggregationConfig, *, steps: int, first: int):
    """Six nodes under BSP on mnist-5k, the last one the attacker; the honest nodes' results."""
    entry: asyncio.Future = asyncio.get_running_loop().create_future()

    async def one(i: int):
        attacker = i == N - 1
        config = node_config(first + i, barrier="bsp", min_peers=N - 1)
        if i > 0:
            config = dataclasses.replace(config, bootstrap=(await entry,))
        session = Session.build(
            config,
            run_id="byzantine",
            model="mlp",
            dataset="mnist-5k",
            lr=0.05,
            momentum=0.9,
            batch_size=64,
            seed=1,
            shard=(i, N),
            aggregation=None if attacker else aggregation,
        )
        ready = (lambda node: entry.set_result(node.overlay.addr)) if i == 0 else None
        return await session.run(
            steps=steps, on_ready=ready, trainer_class=SignFlipper if attacker else Trainer
        )

    results = await asyncio.gather(*(one(i) for i in range(N)))
    return results[:-1]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_byzantine_median_keeps_honest_nodes_training_while_the_mean_collapses():
    steps = 40
    mean = await attacked_run(AggregationConfig(), steps=steps, first=70)
    rule_alone = AggregationConfig.build("median", norm_factor=0)
    median = await attacked_run(rule_alone, steps=steps, first=80)
    mean_acc = [r.final_accuracy for r in mean]
    median_acc = [r.final_accuracy for r in median]
    assert all(r.steps == steps for r in [*mean, *median])
    assert max(mean_acc) < 0.6, mean_acc
    assert min(median_acc) > 0.8, median_acc
    assert all(r.counters.get("rejected_outlier", 0) == 0 for r in median)  # the rule alone


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--aggregate", "mode"], "--aggregate"),
        (["--trim", "0.5"], "--trim"),
        (["--trim", "-0.1"], "--trim"),
        (["--aggregate", "centered_clip", "--clip-radius", "0"], "--clip-radius"),
        (["--clip-radius", "inf"], "--clip-radius"),
        (["--norm-filter", "1"], "--norm-filter"),
        (["--norm-filter", "-3"], "--norm-filter"),
        (["--norm-filter", "nan"], "--norm-filter"),
    ],
)
def test_run_refuses_a_bad_aggregation_flag_in_one_line_naming_it(args, named, capsys):
    assert main(["run", "--steps", "3", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_aggregation_flags_come_from_the_environment_too(monkeypatch, capsys):
    monkeypatch.setenv("P2PML_AGGREGATE", "Median")
    monkeypatch.setenv("P2PML_NORM_FILTER", "5")
    assert main(["run", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'aggregate = "Median"  # env P2PML_AGGREGATE' in out
    assert "norm-filter = 5.0  # env P2PML_NORM_FILTER" in out
    monkeypatch.setenv("P2PML_NORM_FILTER", "0.5")
    assert main(["run", "--print-config"]) == 2
    assert "--norm-filter" in capsys.readouterr().err


def test_local_passes_aggregation_flags_through_to_every_node():
    _check_run_flags(["--aggregate", "median", "--norm-filter", "0", "--trim", "0.2"])
