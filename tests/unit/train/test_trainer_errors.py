"""The trainer's errors reach its caller as themselves: a barrier that times out is a
`BarrierTimeout`, a diverging loss a `TrainingDiverged`, never an exception group (the
checkpoint writes run in a task group around the steps)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from p2pml.errors import BarrierTimeout, TrainingDiverged
from p2pml.node.node import PushReport, StepInputs
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.sync import WaitRecord
from p2pml.train.loop import Trainer
from p2pml.train.tensors import run_manifest


class Driver:
    """A `StepDriver` with no network: every barrier passes at once, or raises `fail_at`'s
    error at that step."""

    def __init__(self, model: torch.nn.Module, fail_at: int | None = None) -> None:
        self.manifest = run_manifest("errors", model, {})
        self.counters: Counter[str] = Counter()
        self._step = 0
        self.fail_at = fail_at
        self.finished = False

    @property
    def step(self) -> int:
        return self._step

    def n_hat(self) -> float:
        return 1.0

    def attach(self, source: object) -> None:
        del source

    async def start(self) -> ModelReply | None:
        return None

    async def barrier(self, *, timeout_s: float | None = None) -> WaitRecord:
        if self.fail_at is not None and self._step >= self.fail_at:
            raise BarrierTimeout(f"no peer answered at step {self._step}")
        return WaitRecord(self._step, 0.0, 1, 0, 0, ())

    async def inputs(self) -> StepInputs:
        return StepInputs(None, [], 1.0)

    async def publish(self, step: int, tensors: Sequence[TensorBlob]) -> PushReport:
        self._step = step + 1
        return PushReport(0, 0, 0)

    async def after_step(self, step: int) -> ModelReply | None:
        return None

    async def finish(self) -> None:
        self.finished = True


def batches(scale: float = 1.0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 4, generator=gen) * scale, torch.randint(0, 3, (8,), generator=gen)


def trainer(driver: Driver, model: torch.nn.Module, tmp_path, lr: float = 0.1) -> Trainer:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(driver, model, optimizer, checkpoint_dir=tmp_path, checkpoint_every=1)


async def test_a_barrier_timeout_is_raised_as_itself(tmp_path):
    model = torch.nn.Linear(4, 3)
    driver = Driver(model, fail_at=3)
    async with trainer(driver, model, tmp_path) as t:
        with pytest.raises(BarrierTimeout, match="at step 3"):
            await t.train(batches(), steps=10)
    assert driver.step == 3


async def test_a_diverging_loss_is_raised_as_itself(tmp_path):
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    driver = Driver(model)
    async with trainer(driver, model, tmp_path) as t:
        with pytest.raises(TrainingDiverged):
            await t.train(batches(), steps=10)
