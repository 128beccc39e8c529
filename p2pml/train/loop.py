"""`Trainer`: trains the user's own torch model, optimiser and batches through a peer-mode node
or as a worker of a parameter server (any `StepDriver`).

Per step, on the event loop: the barrier wait, the step's inputs, pushing this step's delta. In the
``p2pml-compute`` thread (one per trainer; torch never runs on the loop): loading the model the
inputs carry (a worker's pull), applying the received deltas with their weight 1/P, forward,
backward, ``optimizer.step()``, and turning the change into this node's delta, of which the node
keeps the inputs' weight (1/P for a peer, 0 for a worker, whose server applies it). With SGD
(momentum included) and BSP over P nodes with full delivery, or P workers of a BSP server, this is
exactly synchronous data-parallel SGD on the union of the batches: the update of the shared model is
the mean of the nodes' updates (DESIGN.md §5).

    async with Node(config, manifest) as node, Trainer(node, model, optimizer) as trainer:
        result = await trainer.train(batches, steps=500)

Robust aggregation (issue 8): with an `AggregationConfig` other than the plain mean, received deltas
are screened, grouped by step and combined by its rule before they reach the model
(`train/robust.py`); groups of one or two deltas go through unchanged. With the plain mean (the
default) deltas are added exactly as described above.

Checkpoints (`train/checkpoint.py`): every `checkpoint_every` steps, of the parameters, optimiser
state and step; ``train(..., resume=load_checkpoint(folder, manifest))`` continues from one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, ParamSpec, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from p2pml.core.run import RunManifest
from p2pml.errors import ConfigError, P2PMLError, TrainingDiverged
from p2pml.node.node import ModelSource, Node, PushReport, StepInputs
from p2pml.protocol.aggregate import AggregationConfig
from p2pml.protocol.messages import DeltaPush, ModelReply, TensorBlob
from p2pml.protocol.sync import WaitRecord
from p2pml.train import checkpoint as ckpt
from p2pml.train.checkpoint import Checkpoint
from p2pml.train.robust import RobustAggregator
from p2pml.train.tensors import as_tensor, load_blobs, param_specs, to_blobs, trainable

__all__ = ["StepDriver", "StepLog", "TrainResult", "Trainer", "TrainingDiverged", "accuracy"]

log = logging.getLogger(__name__)

EVAL_BATCH: Final = 2048
Batch = tuple[torch.Tensor | npt.NDArray[np.generic], torch.Tensor | npt.NDArray[np.generic]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
P = ParamSpec("P")
R = TypeVar("R")


def accuracy(model: torch.nn.Module, data: Batch) -> float:
    """The share of `data`'s examples that `model` classifies right (call off the loop)."""
    inputs, labels = (torch.as_tensor(v) for v in data)
    correct = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH):
            out = model(inputs[start : start + EVAL_BATCH])
            correct += int((out.argmax(dim=1) == labels[start : start + EVAL_BATCH]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


class StepDriver(Protocol):
    """What the trainer trains through: a peer-mode `Node` or a parameter server's `Worker`."""

    manifest: RunManifest
    counters: Counter[str]

    @property
    def step(self) -> int: ...

    def n_hat(self) -> float: ...

    def attach(self, source: ModelSource) -> None: ...

    async def start(self) -> ModelReply | None: ...

    async def barrier(self, *, timeout_s: float | None = None) -> WaitRecord: ...

    async def inputs(self) -> StepInputs: ...

    async def publish(self, step: int, tensors: Sequence[TensorBlob]) -> PushReport: ...

    async def after_step(self, step: int) -> ModelReply | None: ...

    async def finish(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StepLog:
    """One line of the step log (JSON): what a step cost and what the node saw."""

    step: int
    loss: float
    accuracy: float | None
    wait_s: float
    n_hat: float
    deltas_sent: int
    deltas_received: int
    deltas_rejected: int
    time_s: float
    compute_s: float
    n_checks: int
    waited_on: list[str]
    unix_s: float = 0.0  # wall-clock time of the line, so runs' nodes share one time axis

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a node's training came to."""

    steps: int
    start_step: int
    final_loss: float | None
    final_accuracy: float | None
    wait_s: float
    elapsed_s: float
    counters: dict[str, int]


class Trainer:
    """Trains `model` with `optimizer` through `node` (a `Node` or a `Worker`); see the module
    docstring.

    Args:
        loss_fn: (outputs, targets) -> scalar loss; cross-entropy by default.
        eval_data: (inputs, labels) of a held-out split for accuracy, or None.
        eval_every: evaluate every this many steps (and after the last); 0 only at the end.
        slow_s: an artificial delay added to every step, for straggler experiments.
        num_threads: torch's intra-op threads (process-wide; 1 by default).
        checkpoint_dir: where checkpoints go (``node-<step>.p2pml``).
        checkpoint_every: checkpoint every this many completed steps (0: never).
        keep_checkpoints: how many of the newest checkpoints to keep.
        aggregation: how received deltas are combined and screened (`train/robust.py`); the
            plain mean, exactly as without it, by default.

    Raises:
        ConfigError: for a model that does not match the manifest, or a bad setting.
    """

    def __init__(
        self,
        node: StepDriver,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn = F.cross_entropy,
        eval_data: Batch | None = None,
        eval_every: int = 0,
        slow_s: float = 0.0,
        num_threads: int = 1,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 3,
        aggregation: AggregationConfig | None = None,
    ) -> None:
        if param_specs(model) != node.manifest.params:
            raise ConfigError(
                "model", type(model).__name__, "the parameters the node's run manifest lists"
            )
        if not math.isfinite(slow_s) or slow_s < 0:
            raise ConfigError("slow", slow_s, "seconds >= 0")
        self.checkpoints = ckpt.Checkpointer(
            checkpoint_dir, node.manifest.tag, checkpoint_every, keep=keep_checkpoints
        )
        self.node, self.model, self.optimizer, self.loss_fn = node, model, optimizer, loss_fn
        self.eval_data = eval_data
        self.eval_every, self.slow_s, self.num_threads = eval_every, slow_s, num_threads
        self._params = trainable(model)
        # A driver with metrics (Node, Worker) takes each step's loss and accuracy.
        self._record_loss = getattr(node, "record_loss", None)
        self._record_accuracy = getattr(node, "record_accuracy", None)
        self._executor: ThreadPoolExecutor | None = None
        self.last_loss: float | None = None
        self._weight = 1.0
        self.aggregation = (aggregation or AggregationConfig()).validate()
        self._robust: RobustAggregator | None = None
        if not self.aggregation.is_plain:
            self._robust = RobustAggregator(self.aggregation, self._params)

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="p2pml-compute",
            initializer=torch.set_num_threads,
            initargs=(self.num_threads,),
        )
        self.node.attach(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self._executor is None:
            raise RuntimeError("use the trainer inside 'async with Trainer(...)'")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # -- the model source for joining peers ------------------------------------------------------
    async def snapshot(self) -> tuple[int, tuple[TensorBlob, ...]]:
        version = self.node.step
        blobs = await self._run(lambda: to_blobs([(n, p.clone()) for n, p in self._params]))
        return version, blobs

    # -- compute jobs (p2pml-compute thread) -----------------------------------------------------
    def _apply(self, inputs: StepInputs) -> None:
        if inputs.model is not None:
            load_blobs(self._params, inputs.model.tensors)
        self._apply_deltas(inputs.deltas, inputs.weight)

    def _apply_deltas(self, deltas: list[DeltaPush], weight: float) -> None:
        if self._robust is not None:
            self._robust.apply(deltas, weight)
            return
        with torch.no_grad():
            for msg in deltas:
                for (_, param), blob in zip(self._params, msg.tensors, strict=True):
                    param.add_(as_tensor(blob), alpha=weight)

    def _step(
        self, inputs: StepInputs, batches: Iterator[Batch], step: int
    ) -> tuple[float, tuple[TensorBlob, ...]]:
        self._apply(inputs)
        weight = inputs.weight
        x, targets = (torch.as_tensor(v) for v in next(batches))
        with torch.no_grad():
            before = [p.detach().clone() for _, p in self._params]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), targets)
        loss.backward()  # type: ignore[no-untyped-call]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {step}; the delta is not sent")
        self.optimizer.step()
        changes = []
        with torch.no_grad():
            for (name, param), old in zip(self._params, before, strict=True):
                change = param - old
                param.copy_(old.add_(change, alpha=weight))  # keep 1/P (or 0) of this update
                changes.append((name, change))
        if self.slow_s:
            time.sleep(self.slow_s)
        blobs = to_blobs(changes)
        if self._robust is not None:
            self._robust.own_change(blobs)
        return value, blobs

    def _evaluate(self) -> float | None:
        return None if self.eval_data is None else accuracy(self.model, self.eval_data)

    def _average(self, reply: ModelReply) -> None:
        with torch.no_grad():
            for (_, param), blob in zip(self._params, reply.tensors, strict=True):
                param.mul_(0.5).add_(as_tensor(blob), alpha=0.5)

    # -- the loop --------------------------------------------------------------------------------
    async def join(self, resume: Checkpoint | None = None) -> int:
        """Start from the run's current model when the run is already in progress, or from
        `resume` (a peer-mode node's checkpoint) unless the run is more than the staleness bound
        ahead of it: then from the run's current model, with the optimiser's state reset.

        Returns the step this node starts at (0 for a fresh run).

        Raises:
            ConfigError: for `resume` with a driver other than a peer-mode `Node` (a worker
                always continues from its server's model and step).
        """
        node = self.node
        if resume is None:
            reply = await node.start()
            if reply is not None:
                await self._run(load_blobs, self._params, reply.tensors)
            return node.step
        if not isinstance(node, Node):
            raise ConfigError(
                "resume",
                str(resume.path),
                "a peer-mode node's checkpoint; a worker continues from its server's model",
            )
        reply = await ckpt.catch_up(node, resume)
        if reply is None:
            await self._run(ckpt.restore, self._params, self.optimizer, resume)
            node.resume_at(resume.step)
            log.info("resumed from checkpoint %s at step %d", resume.path, resume.step)
        else:
            await self._run(load_blobs, self._params, reply.tensors)
            await self._run(ckpt.reset_state, self._params, self.optimizer)
        return node.step

    async def train(
        self,
        batches: Iterable[Batch],
        *,
        steps: int,
        on_step: Callable[[StepLog], None] | None = None,
        time_budget_s: float | None = None,
        resume: Checkpoint | None = None,
        skip_completed: bool = False,
    ) -> TrainResult:
        """Train until the node has completed `steps` steps (or `time_budget_s` has passed),
        then apply the last deltas, evaluate, finish and linger.

        Args:
            batches: (inputs, targets) pairs, numpy or torch, one per step; drawn in the
                compute thread, so the iterator may do work.
            on_step: called on the loop with each step's log line; the last line carries the
                final accuracy.
            time_budget_s: stop after the step that ends past this many seconds.
            resume: a checkpoint to continue from (see `join`).
            skip_completed: draw and drop one batch per step completed before this node starts,
                so that a resumed node trains on the batches it would have had without a break.
        """
        node, began = self.node, time.monotonic()
        start = await self.join(resume)
        it = iter(batches)
        if skip_completed and start:
            await self._run(_consume, it, start)
        try:
            async with asyncio.TaskGroup() as saves:
                waited, pending = await self._loop(
                    it,
                    saves,
                    steps=steps,
                    on_step=on_step,
                    began=began,
                    time_budget_s=time_budget_s,
                )
        except BaseExceptionGroup as group:
            raise _sole(group) from None
        accuracy = await self._settle()
        if pending is not None:
            step, loss, wait, compute_s = pending
            self._emit(on_step, self._log(step, loss, accuracy, wait, began, compute_s))
        await node.finish()
        return TrainResult(
            steps=node.step,
            start_step=start,
            final_loss=self.last_loss,
            final_accuracy=accuracy,
            wait_s=waited,
            elapsed_s=time.monotonic() - began,
            counters=dict(node.counters),
        )

    async def _loop(
        self,
        it: Iterator[Batch],
        saves: asyncio.TaskGroup,
        *,
        steps: int,
        on_step: Callable[[StepLog], None] | None,
        began: float,
        time_budget_s: float | None,
    ) -> tuple[float, tuple[int, float, WaitRecord, float] | None]:
        """The steps; returns the time waited at barriers and the last step's log entry."""
        node, waited = self.node, 0.0
        while node.step < steps:
            step = node.step
            wait = await node.barrier()
            waited += wait.wait_s
            computed_at = time.monotonic()
            inputs = await node.inputs()
            self._weight = inputs.weight  # what every delta of this step weighs
            loss, delta = await self._run(self._step, inputs, it, step)
            self._count_dropped()
            compute_s = time.monotonic() - computed_at
            self.last_loss = loss
            await node.publish(step, delta)
            if (peer_model := await node.after_step(step)) is not None:
                await self._run(self._average, peer_model)
            take = functools.partial(self._run, ckpt.snapshot, self._params, self.optimizer)
            await self.checkpoints.save_if_due(node.step, take, saves)
            out_of_time = time_budget_s is not None and time.monotonic() - began >= time_budget_s
            if step + 1 == steps or out_of_time:
                return waited, (step, loss, wait, compute_s)  # logged with the final accuracy
            accuracy = None
            if self.eval_every and (step + 1) % self.eval_every == 0:
                accuracy = await self._run(self._evaluate)
            self._emit(on_step, self._log(step, loss, accuracy, wait, began, compute_s))
        return waited, None

    def _count_dropped(self) -> None:
        if self._robust is not None:
            self._robust.count_dropped(self.node.counters, now=time.monotonic())

    def _emit(self, on_step: Callable[[StepLog], None] | None, entry: StepLog) -> None:
        """Hand a step's line to the node's metrics (when it keeps any) and to the caller."""
        if self._record_loss is not None:
            self._record_loss(entry.step, entry.loss)
        if entry.accuracy is not None and self._record_accuracy is not None:
            self._record_accuracy(entry.step, entry.accuracy)
        if on_step is not None:
            on_step(entry)

    async def _settle(self) -> float | None:
        """After the last step: wait until the barrier's peers are done too, so their last
        deltas are here, apply them, and evaluate the final model."""
        try:
            await self.node.barrier()
        except P2PMLError as err:
            log.warning("final barrier: %s", err)
        try:
            inputs = await self.node.inputs()
        except P2PMLError as err:
            log.warning("final model pull: %s", err)
            return await self._run(self._evaluate)
        # peers may have finished meanwhile: the last deltas weigh what the last step's did
        final = StepInputs(inputs.model, inputs.deltas, self._weight)
        await self._run(self._apply, final)
        self._count_dropped()
        return await self._run(self._evaluate)

    def _log(
        self,
        step: int,
        loss: float,
        accuracy: float | None,
        wait: WaitRecord,
        began: float,
        compute_s: float,
    ) -> StepLog:
        c = self.node.counters
        return StepLog(
            step=step,
            loss=loss,
            accuracy=accuracy,
            wait_s=round(wait.wait_s, 6),
            n_hat=round(self.node.n_hat(), 2),
            deltas_sent=c["deltas_sent"],
            deltas_received=c["deltas_received"],
            deltas_rejected=c["deltas_rejected"],
            time_s=round(time.monotonic() - began, 4),
            compute_s=round(compute_s, 6),
            n_checks=wait.n_checks,
            waited_on=[p.hex()[:8] for p in wait.blocked_on],
            unix_s=round(time.time(), 4),
        )


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error behind a task group's failure, as callers expect it (a `BarrierTimeout`, not a
    group holding one): the training loop's own when it failed, else the first one."""
    leaves = list(_leaves(group))
    return leaves[0] if leaves else group


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


def _consume(it: Iterator[Batch], n: int) -> None:
    next(itertools.islice(it, n, n), None)
