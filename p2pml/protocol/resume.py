"""The resume rule of peer mode: does a restarted node continue from its checkpoint, or from the
run's current model?

A node that resumes from a checkpoint of step c into a run whose most advanced live peer has
completed r steps is ``r - c`` steps behind. Within the staleness bound s (``r - c <= s``) it keeps
its checkpoint, parameters and optimiser state alike: its deltas are still accepted and the barrier
tolerates the lag. Beyond it the run's state wins: the node pulls the current model from that peer
and continues from its step, as a node joining a run in progress does. A run behind the checkpoint
(or no live peer at all) never makes the node pull.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError

__all__ = ["ResumePlan", "ResumeSource", "plan_resume"]


class ResumeSource(enum.Enum):
    """Where a resumed node's model and step come from."""

    CHECKPOINT = "checkpoint"
    PEER = "peer"


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """The decision and what it was made on.

    Attributes:
        source: keep the checkpoint, or pull from a peer.
        checkpoint_step: the steps the checkpoint had completed.
        run_step: the steps of the most advanced live peer (0 when none is known).
        ahead: that peer (the lowest ID among equals), or None when no peer is known.
        bound: the staleness bound s the lag was compared with.
    """

    source: ResumeSource
    checkpoint_step: int
    run_step: int
    ahead: PeerId | None
    bound: int

    @property
    def lag(self) -> int:
        """How many steps the checkpoint is behind the run (negative when it is ahead)."""
        return self.run_step - self.checkpoint_step


def plan_resume(
    checkpoint_step: int, peer_steps: Mapping[PeerId, int], *, bound: int
) -> ResumePlan:
    """Keep the checkpoint of `checkpoint_step`, or pull from the most advanced of the live peers
    whose completed steps are `peer_steps`, by the staleness bound `bound` (in steps).

    Raises:
        ConfigError: for a negative step or bound.
    """
    if checkpoint_step < 0:
        raise ConfigError("checkpoint step", checkpoint_step, "an integer >= 0")
    if bound < 0:
        raise ConfigError("staleness", bound, "an integer >= 0")
    ahead = min(peer_steps, key=lambda p: (-peer_steps[p], p), default=None)
    run_step = 0 if ahead is None else peer_steps[ahead]
    behind = run_step - checkpoint_step > bound
    source = ResumeSource.PEER if behind else ResumeSource.CHECKPOINT
    return ResumePlan(source, checkpoint_step, run_step, ahead, bound)
