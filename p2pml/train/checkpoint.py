"""A training node's checkpoints: its parameters, its optimiser's state and its completed steps, in
the wire format of `io/modelfile.py` (never pickle), and their checks on resume.

A checkpoint is ``<folder>/node-<step>.p2pml``: the run's parameters in manifest order, then the
optimiser's per-parameter tensor state, each named ``optim/<parameter>/<key>`` (SGD with momentum
keeps one, ``momentum_buffer``; a parameter the optimiser holds no state for yet has none). The
optimiser's hyperparameters are not saved: they are the run manifest's. Other state (Python numbers)
is not carried; torch's own optimisers keep theirs in tensors.

`Checkpointer` writes them during training: the compute thread copies the state, another thread
writes the copy (write, fsync, rename) while training goes on, one write at a time.

On resume, a file is refused (and an older one tried) unless it reads back whole, is of this run,
holds exactly the manifest's parameters, optimiser tensors of known parameters with a parameter's
shape and dtype (or scalars), and only finite values. A peer-mode node then keeps its checkpoint
unless the run is more than the staleness bound ahead of it (`protocol/resume.py`, `catch_up`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from p2pml.core.run import RunManifest, TensorSpec
from p2pml.errors import ConfigError, OverlayError
from p2pml.io.modelfile import SavedModel, find_checkpoint, save_checkpoint
from p2pml.node.node import Node
from p2pml.protocol import deltas as rules
from p2pml.protocol.messages import ModelReply, TensorBlob
from p2pml.protocol.resume import ResumeSource, plan_resume
from p2pml.train.tensors import WIRE_DTYPES, load_blobs

__all__ = [
    "CHECKPOINT_PREFIX",
    "Checkpoint",
    "Checkpointer",
    "catch_up",
    "check_checkpoint",
    "load_checkpoint",
    "reset_state",
    "restore",
    "snapshot",
    "write_checkpoint",
]

CHECKPOINT_PREFIX: Final = "node"
OPTIM_PREFIX: Final = "optim/"
_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_FLOAT_DTYPES: Final = frozenset(WIRE_DTYPES.values())

log = logging.getLogger(__name__)

Named = Sequence[tuple[str, torch.nn.Parameter]]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint that passed every check: where it was read from, the steps it had completed,
    the parameters (manifest order) and the optimiser's tensors (``optim/<parameter>/<key>``)."""

    path: Path
    step: int
    params: tuple[TensorBlob, ...]
    state: tuple[TensorBlob, ...]


# -- saving (the compute thread takes the snapshot, any thread writes it) ------------------------


def snapshot(params: Named, optimizer: torch.optim.Optimizer) -> tuple[TensorBlob, ...]:
    """Copies of the parameters and of the optimiser's tensor state (call in the compute thread)."""
    blobs = [TensorBlob.of(n, p.detach().cpu().clone().numpy()) for n, p in params]
    for name, param in params:
        state = optimizer.state.get(param, {})  # .get: the state is a defaultdict
        for key, value in sorted(state.items()):
            if isinstance(value, torch.Tensor) and value.dtype in WIRE_DTYPES:
                array = value.detach().cpu().clone().numpy()
                blobs.append(TensorBlob.of(f"{OPTIM_PREFIX}{name}/{key}", array))
    return tuple(blobs)


def write_checkpoint(
    folder: Path, run_tag: str, step: int, blobs: Sequence[TensorBlob], *, keep: int
) -> Path:
    """Write the checkpoint of `step` atomically, keeping the newest `keep` (blocking file I/O).

    Raises:
        ConfigError: naming the folder or file that cannot be written.
    """
    return save_checkpoint(
        folder, CHECKPOINT_PREFIX, run_tag, blobs, version=step, step=step, keep=keep
    )


class Checkpointer:
    """Checkpoints a training node into `folder` every `every` completed steps (0: never),
    keeping the newest `keep`.

    Raises:
        ConfigError: for a bad `every` or `keep`, or `every` > 0 without a folder.
    """

    def __init__(self, folder: Path | None, run_tag: str, every: int, *, keep: int = 3) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError("checkpoint_every", every, "an integer >= 0 (0: never)")
        if every and folder is None:
            raise ConfigError("checkpoint_dir", None, "a folder when checkpoint_every > 0")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError("keep_checkpoints", keep, "an integer >= 1")
        self.folder, self.run_tag, self.every, self.keep = folder, run_tag, every, keep
        self._writing: asyncio.Task[None] | None = None

    async def save_if_due(
        self,
        step: int,
        take: Callable[[], Awaitable[tuple[TensorBlob, ...]]],
        writes: asyncio.TaskGroup,
    ) -> None:
        """After `step` completed steps, when due: wait for the previous write (a slow disk holds
        training back, never a pile of copies), `take` a snapshot, and write it in a task of
        `writes`."""
        if not self.every or step % self.every:
            return
        if self._writing is not None:
            await self._writing
        blobs = await take()
        self._writing = writes.create_task(self._write(step, blobs))

    async def _write(self, step: int, blobs: tuple[TensorBlob, ...]) -> None:
        assert self.folder is not None, "checked in __init__"
        try:
            path = await asyncio.to_thread(
                write_checkpoint, self.folder, self.run_tag, step, blobs, keep=self.keep
            )
        except (ConfigError, OSError) as err:
            log.error("checkpoint of step %d failed: %s", step, err)
            return
        log.info("checkpoint of step %d written to %s", step, path)


# -- checking and loading --------------------------------------------------------------------------


def _check_state(state: Sequence[TensorBlob], specs: Sequence[TensorSpec]) -> None:
    by_name = {s.name: s for s in specs}
    seen: set[str] = set()
    for blob in state:
        param, _, key = blob.name.removeprefix(OPTIM_PREFIX).rpartition("/")
        spec = by_name.get(param)
        if not blob.name.startswith(OPTIM_PREFIX) or spec is None or not _KEY.fullmatch(key):
            raise ConfigError(
                "checkpoint tensor", blob.name, "optim/<parameter of the model>/<state key>"
            )
        if blob.name in seen:
            raise ConfigError("checkpoint tensor", blob.name, "each tensor once")
        seen.add(blob.name)
        shape = tuple(blob.array.shape)
        if shape == spec.shape and blob.dtype_name != spec.dtype:
            raise ConfigError(f"checkpoint tensor {blob.name} dtype", blob.dtype_name, spec.dtype)
        if shape not in (spec.shape, ()) or blob.dtype_name not in _FLOAT_DTYPES:
            raise ConfigError(
                f"checkpoint tensor {blob.name}",
                f"{blob.dtype_name} {shape}",
                f"the parameter's shape {spec.shape} or a scalar, of a floating-point dtype",
            )


def check_checkpoint(saved: SavedModel, specs: Sequence[TensorSpec]) -> None:
    """Refuse a checkpoint that does not fit the run's parameters or holds NaN or infinity.

    Raises:
        ConfigError, Refused: naming the tensor and what is wrong with it.
    """
    n = len(specs)
    rules.check_tensors(saved.tensors[:n], specs, what="checkpoint")
    _check_state(saved.tensors[n:], specs)
    rules.check_finite_tensors(saved.tensors, "checkpoint")


def load_checkpoint(folder: Path, manifest: RunManifest) -> Checkpoint:
    """The newest usable checkpoint of the run in `folder` (blocking file I/O); each newer one that
    is refused is logged with its name and what is wrong with it.

    Raises:
        ConfigError: naming `folder` when none is usable, with every file refused and why.
    """
    path, saved = find_checkpoint(
        folder,
        CHECKPOINT_PREFIX,
        manifest.tag,
        check=lambda s: check_checkpoint(s, manifest.params),
    )
    n = len(manifest.params)
    return Checkpoint(path, saved.step, saved.tensors[:n], saved.tensors[n:])


# -- restoring (the compute thread) ----------------------------------------------------------------


def restore(params: Named, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load the checkpoint's parameters and make its tensors the optimiser's whole state for them.

    Raises:
        ConfigError: when the checkpoint holds state for a parameter the optimiser does not train
            (nothing is changed then).
    """
    by_name = dict(params)
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    entries = []
    for blob in checkpoint.state:
        name, _, key = blob.name.removeprefix(OPTIM_PREFIX).rpartition("/")
        param = by_name[name]
        if id(param) not in owned:
            raise ConfigError(
                "checkpoint tensor", blob.name, "state of a parameter the optimiser trains"
            )
        entries.append((param, key, torch.tensor(blob.array, device=param.device)))
    load_blobs(params, checkpoint.params)
    reset_state(params, optimizer)
    for param, key, value in entries:
        optimizer.state[param][key] = value


def reset_state(params: Named, optimizer: torch.optim.Optimizer) -> None:
    """Drop the optimiser's state of `params` (a node that takes the run's model starts afresh)."""
    for _, param in params:
        optimizer.state.pop(param, None)


# -- peer mode: the checkpoint or the run's model ------------------------------------------------


async def catch_up(node: Node, resume: Checkpoint) -> ModelReply | None:
    """The run's current model when the run is more than the staleness bound ahead of `resume`
    (the node then continues from its step, like a node joining a run in progress); None to keep
    the checkpoint, also when no peer serves its model."""
    await node.discover()
    steps = {p: node.peers.peers[p].step for p in node.peers.live()}
    plan = plan_resume(resume.step, steps, bound=node.config.staleness)
    if plan.source is ResumeSource.CHECKPOINT:
        if plan.ahead is not None:
            log.info(
                "checkpoint at step %d is %d steps behind the run (staleness bound %d): keeping it",
                resume.step,
                max(0, plan.lag),
                plan.bound,
            )
        return None
    assert plan.ahead is not None
    log.warning(
        "checkpoint %s at step %d is %d steps behind the run (peer %s at step %d; staleness "
        "bound %d): pulling the current model from a peer instead",
        resume.path,
        resume.step,
        plan.lag,
        plan.ahead.hex()[:8],
        plan.run_step,
        plan.bound,
    )
    try:
        reply = await node.start()
    except OverlayError as err:
        log.warning("%s; resuming from the checkpoint after all", err)
        return None
    if reply is not None:
        log.warning(
            "continuing from step %d with the model of peer %s, not the checkpoint",
            reply.step,
            reply.sender.hex()[:8],
        )
    return reply
