"""`SyncMachine`: the sans-IO barrier wait a node runs before each step (DESIGN.md §4).

Theory of operation. Three phases; all transitions live in this file::

    phase     input                      next      output
    IDLE      begin(my_step, now)        ASKING    (the driver asks `sample_size()` peers)
    any       abandon()                  IDLE      (a wait that timed out or was cancelled)
    ASKING    receive(answers, now)      IDLE      PROCEED, and a `WaitRecord` event
    ASKING    receive(answers, now)      BACKOFF   WAIT; `next_deadline()` is now + backoff
    BACKOFF   on_timer(now >= deadline)  ASKING    True: the driver draws a fresh sample

`receive` takes what the asked peers answered: a `StepReport`, or None for a peer that did not
answer in time. Unanswered peers are left out of the view and counted (a dead peer can slow a
probabilistic barrier, never block it); finished peers (``done``) are left out too, so a node that
has reached its last step never holds anyone back. The policy (`core/barrier.py`) decides over the
rest. Each re-check uses a fresh sample (the driver draws again); the backoff starts at
`recheck_s` and doubles up to `recheck_max_s`.

Invariants: one wait at a time; the record of a wait names the peers that held it back (at most
`MAX_BLOCKERS` of them) and how many checks it took.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from p2pml.core.barrier import (
    BarrierParams,
    BarrierView,
    BspParams,
    Decision,
    SspParams,
    decide,
    min_peer_step,
)
from p2pml.core.sampling import SampleSize
from p2pml.core.types import PeerId, Step
from p2pml.errors import UnexpectedMessage
from p2pml.protocol.dht import StepReport

__all__ = ["MAX_BLOCKERS", "Phase", "SyncMachine", "WaitRecord"]

MAX_BLOCKERS: Final = 16


class Phase(enum.Enum):
    IDLE = "idle"
    ASKING = "asking"
    BACKOFF = "backoff"


@dataclass(frozen=True, slots=True)
class WaitRecord:
    """One barrier wait.

    Attributes:
        step: the step the node was about to start (its completed steps).
        wait_s: from `begin` to PROCEED.
        n_checks: samples drawn and asked.
        n_asked: peer answers expected over all checks; n_unanswered: of those, missing.
        blocked_on: peers seen behind the barrier's bound, first seen first.
    """

    step: int
    wait_s: float
    n_checks: int
    n_asked: int
    n_unanswered: int
    blocked_on: tuple[PeerId, ...]


class SyncMachine:
    """The barrier wait of one node; the driver asks peers and feeds their answers back."""

    def __init__(
        self,
        params: BarrierParams,
        sample: SampleSize,
        *,
        recheck_s: float,
        recheck_max_s: float,
    ) -> None:
        self.params = params
        self.sample = sample
        self.recheck_s = recheck_s
        self.recheck_max_s = max(recheck_s, recheck_max_s)
        self.phase = Phase.IDLE
        self._events: list[WaitRecord] = []
        self._reset(Step(0), 0.0)

    def _reset(self, my_step: Step, now: float) -> None:
        self._step, self._began_at = my_step, now
        self._deadline: float | None = None
        self._backoff_s = self.recheck_s
        self._n_checks = self._n_asked = self._n_unanswered = 0
        self._blockers: dict[PeerId, None] = {}

    @property
    def asks_everyone(self) -> bool:
        """BSP and SSP observe every known node rather than a sample."""
        return isinstance(self.params, BspParams | SspParams)

    @property
    def lockstep(self) -> bool:
        """BSP keeps every node on one model: deltas of steps not yet computed here wait."""
        return isinstance(self.params, BspParams)

    def sample_size(self, population_estimate: float) -> int | None:
        """How many peers the next check asks: None for every known peer (bsp, ssp), else beta
        (0 for asp; a fraction is taken of `population_estimate`)."""
        if self.asks_everyone:
            return None
        if min_peer_step(self.params, 0) is None:  # asp
            return 0
        return self.sample.resolve(population_estimate)

    def begin(self, my_step: Step, *, now: float) -> None:
        """Start the wait before step `my_step`."""
        if self.phase is not Phase.IDLE:
            raise UnexpectedMessage(f"begin() while a wait is {self.phase.value}")
        self._reset(my_step, now)
        self.phase = Phase.ASKING

    def receive(
        self,
        answers: Mapping[PeerId, StepReport | None],
        *,
        now: float,
        population_estimate: float,
    ) -> Decision:
        """Decide over the peers that answered and have not finished."""
        if self.phase is not Phase.ASKING:
            raise UnexpectedMessage(f"receive() while the wait is {self.phase.value}")
        self._n_checks += 1
        self._n_asked += len(answers)
        self._n_unanswered += sum(1 for a in answers.values() if a is None)
        steps = {p: a.step for p, a in answers.items() if a is not None and not a.done}
        view = BarrierView(self._step, steps, max(1.0, population_estimate))
        decision = decide(view, self.params)
        if decision is Decision.PROCEED:
            self._finish(now)
            return decision
        lowest = min_peer_step(self.params, self._step)
        assert lowest is not None, "asp always proceeds"
        for peer in sorted(p for p, s in steps.items() if s < lowest):
            if len(self._blockers) < MAX_BLOCKERS:
                self._blockers.setdefault(peer)
        self.phase = Phase.BACKOFF
        self._deadline = now + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, self.recheck_max_s)
        return decision

    def _finish(self, now: float) -> None:
        self._events.append(
            WaitRecord(
                step=int(self._step),
                wait_s=max(0.0, now - self._began_at),
                n_checks=self._n_checks,
                n_asked=self._n_asked,
                n_unanswered=self._n_unanswered,
                blocked_on=tuple(self._blockers),
            )
        )
        self.phase = Phase.IDLE
        self._deadline = None

    def abandon(self) -> None:
        """Drop a wait that will not be finished (timed out or cancelled); no-op when idle."""
        if self.phase is not Phase.IDLE:
            self.phase, self._deadline = Phase.IDLE, None

    def on_timer(self, *, now: float) -> bool:
        """True when a backoff has run out and a fresh check is due."""
        if self.phase is Phase.BACKOFF and self._deadline is not None and now >= self._deadline:
            self.phase, self._deadline = Phase.ASKING, None
            return True
        return False

    def next_deadline(self) -> float | None:
        return self._deadline

    def drain_events(self) -> list[WaitRecord]:
        events, self._events = self._events, []
        return events
