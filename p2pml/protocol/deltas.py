"""The rules of delta exchange in peer mode (DESIGN.md §5): who gets a delta, how much it weighs,
which incoming deltas are accepted and when they are applied.

- **Delivery.** While the run has at most `full_delivery_max` nodes, a node sends its delta to
  every other node and every delta weighs 1/P, P the number of nodes: with BSP this is exactly
  synchronous data-parallel SGD over the P nodes (the mean of their updates). Beyond that size a
  node sends to `fanout` peers drawn at random and a delta weighs 1/(fanout + 1); nodes then also
  average their models with a random peer every few steps (gossip) to keep them together.
- **Acceptance.** A delta must match the local model tensor by tensor (name, dtype, shape), be
  finite, and not be stale: a delta of step t reaching a node that has completed c steps is refused
  when ``c - 1 - t > max_age`` (by default max_age = s, the staleness bound). Under BSP with the
  ordering rule c - 1 - t is never above 0, and under SSP(s) never above s, so only nodes that
  drifted further (ASP, or pSSP's unlucky draws) lose deltas, and they are told so (409 "stale").
- **Application.** Before a node starts step c it applies every queued delta, except under BSP,
  where it holds a delta of step t >= c (a faster peer's delta of the step this node has not
  computed yet) until it has completed step t: that keeps every node on the same model.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pml.core.run import TensorSpec
from p2pml.core.sampling import sample_peers
from p2pml.core.types import PeerId
from p2pml.errors import Refused
from p2pml.protocol.messages import DeltaPush, TensorBlob

__all__ = [
    "Delivery",
    "check_delta",
    "check_finite",
    "check_finite_tensors",
    "check_tensors",
    "is_due",
    "plan_delivery",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where one step's delta goes and what every delta weighs."""

    targets: tuple[PeerId, ...]
    n_participants: int
    gossip: bool

    @property
    def weight(self) -> float:
        return 1.0 / self.n_participants


def plan_delivery(
    peers: Sequence[PeerId], *, full_delivery_max: int, fanout: int, rng: random.Random
) -> Delivery:
    """Every peer while the run is small, else `fanout` random peers.

    Args:
        peers: the other live nodes of the run, sorted by peer id.
    """
    if len(peers) + 1 <= full_delivery_max:
        return Delivery(tuple(peers), len(peers) + 1, gossip=False)
    targets = tuple(sample_peers(peers, fanout, rng))
    return Delivery(targets, len(targets) + 1, gossip=True)


def check_tensors(
    tensors: Sequence[TensorBlob], specs: Sequence[TensorSpec], *, what: str = "delta"
) -> None:
    """Check tensors against the local model, one by one: name, dtype and shape.

    Raises:
        Refused: code ``shape`` (tensor count, name or shape) or ``dtype``.
    """
    if len(tensors) != len(specs):
        raise Refused("shape", f"{what} has {len(tensors)} tensors; the model has {len(specs)}")
    for blob, spec in zip(tensors, specs, strict=True):
        if blob.name != spec.name:
            raise Refused("shape", f"{what} tensor {blob.name!r} where the model has {spec.name!r}")
        if blob.dtype_name != spec.dtype:
            raise Refused(
                "dtype", f"{what} tensor {spec.name!r} is {blob.dtype_name}, expected {spec.dtype}"
            )
        if tuple(blob.array.shape) != spec.shape:
            raise Refused(
                "shape",
                f"{what} tensor {spec.name!r} has shape {tuple(blob.array.shape)}, "
                f"expected {spec.shape}",
            )


def check_delta(
    msg: DeltaPush, specs: Sequence[TensorSpec], *, completed: int, max_age: int
) -> None:
    """Check a delta against the local model and the staleness rule (not finiteness).

    Raises:
        Refused: code ``shape``, ``dtype`` or ``stale``.
    """
    check_tensors(msg.tensors, specs)
    age = completed - 1 - msg.step
    if age > max_age:
        raise Refused(
            "stale",
            f"delta of step {msg.step} is {age} steps old here (this node completed {completed} "
            f"steps); the limit is {max_age}",
        )


def check_finite_tensors(tensors: Sequence[TensorBlob], what: str = "delta") -> None:
    """Refuse tensors holding NaN or infinity (a pass over the payload: offload large ones).

    Raises:
        Refused: code ``nonfinite``, naming the first bad tensor.
    """
    for blob in tensors:
        array = blob.array
        if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            raise Refused("nonfinite", f"{what} tensor {blob.name!r} holds NaN or infinite values")


def check_finite(msg: DeltaPush) -> None:
    """`check_finite_tensors` over a delta."""
    check_finite_tensors(msg.tensors)


def is_due(delta_step: int, completed: int, *, lockstep: bool) -> bool:
    """Whether a queued delta of `delta_step` is applied before the node starts step `completed`."""
    return not lockstep or delta_step < completed
