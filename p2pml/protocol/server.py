"""`ServerMachine`: the sans-IO parameter server: the global step table, the barrier applied
centrally, liveness, and when and how pushed deltas reach the model.

The driver (`node/server.py`) feeds it what workers send and the clock, and drains what to do:

- `Apply`: add these deltas to the model with this weight, making model version `version`;
- `Released`: a worker waiting at the barrier may start its next step;
- `Evicted`: a worker missed its heartbeat timeout and left the table.

Deltas are applied as they arrive under ASP, SSP, pBSP and pSSP (each weighted 1/P, P the workers
training now, as in DESIGN.md §5), and per round under BSP: the deltas of step t wait until every
live worker has completed step t, then their mean is applied as one update. The barrier is the
same policy code the peers run (`core/barrier.py`), over the table: every live worker for bsp and
ssp, β of them drawn afresh at each re-evaluation for pbsp and pssp. Evicting a dead worker takes
it out of every barrier and round, so a BSP run does not hang on it.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from p2pml.core.barrier import (
    BarrierParams,
    BarrierView,
    BspParams,
    Decision,
    PbspParams,
    PsspParams,
    decide,
)
from p2pml.core.sampling import SampleSize, sample_peers
from p2pml.core.types import PeerId, Step
from p2pml.errors import ConfigError, Refused

__all__ = ["Apply", "Evicted", "Released", "ServerEvent", "ServerMachine", "WorkerState"]

T = TypeVar("T")
MAX_WORKERS: Final = 100_000


@dataclass(slots=True)
class WorkerState:
    """One row of the step table."""

    step: int
    seen_at: float
    done: bool = False


@dataclass(frozen=True, slots=True)
class Apply(Generic[T]):
    """Add each payload times `weight` to the model, which becomes version `version`.

    Attributes:
        step: the step the deltas were computed in (one BSP round, or the pusher's step).
        staleness: per payload, the server's version before this update minus the version the
            delta was computed from.
    """

    payloads: tuple[T, ...]
    weight: float
    version: int
    step: int
    staleness: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Released:
    """`worker`, waiting with `step` completed steps, may start its next step."""

    worker: PeerId
    step: int


@dataclass(frozen=True, slots=True)
class Evicted:
    """`worker` was silent for `silent_s` seconds (past its heartbeat timeout) and left."""

    worker: PeerId
    step: int
    silent_s: float
    done: bool


ServerEvent = Apply[T] | Released | Evicted


@dataclass(frozen=True, slots=True)
class _Pending(Generic[T]):
    payload: T
    base_version: int


class ServerMachine(Generic[T]):
    """The parameter server's decisions; see the module docstring.

    Args:
        params: the barrier (`core/barrier.make_params`).
        sample: beta for pbsp and pssp, a count or a share of the live workers.
        heartbeat_timeout_s: a worker not heard from for this long is evicted.
        min_workers: no worker starts its first step before this many have registered.
        version: the model version to start from (a checkpoint's, or 0).
        rng: draws the pbsp/pssp samples.
    """

    def __init__(
        self,
        params: BarrierParams,
        sample: SampleSize,
        *,
        heartbeat_timeout_s: float,
        rng: random.Random,
        min_workers: int = 1,
        version: int = 0,
    ) -> None:
        if not heartbeat_timeout_s > 0:
            raise ConfigError("heartbeat_timeout_s", heartbeat_timeout_s, "a number > 0")
        self.params, self.sample, self.rng = params, sample, rng
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.min_workers = max(1, min_workers)
        self.version = version
        self.workers: dict[PeerId, WorkerState] = {}
        self._came: set[PeerId] = set()  # every worker ever registered, evicted ones included
        self._done_left = 0  # workers evicted after they had finished
        self._waiting: dict[PeerId, int] = {}
        self._rounds: dict[int, list[_Pending[T]]] = {}
        self._events: list[ServerEvent[T]] = []

    # -- the table -------------------------------------------------------------------------------
    @property
    def lockstep(self) -> bool:
        return isinstance(self.params, BspParams)

    def training(self) -> list[PeerId]:
        """Live workers that have not finished, sorted by id (a stable order for sampling)."""
        return sorted(p for p, w in self.workers.items() if not w.done)

    @property
    def n_registered(self) -> int:
        """How many distinct workers have registered so far (a worker back after its eviction
        counts once)."""
        return len(self._came)

    @property
    def finished(self) -> bool:
        """Enough workers came, at least one finished, and every one still here has finished
        (also once the finished workers have left and been evicted)."""
        return (
            self.n_registered >= self.min_workers
            and (bool(self.workers) or self._done_left > 0)
            and all(w.done for w in self.workers.values())
        )

    def _known(self, worker: PeerId) -> WorkerState:
        state = self.workers.get(worker)
        if state is None:
            raise Refused(
                "unknown_worker",
                f"worker {worker.hex()[:8]} is not registered (evicted, or the server restarted)",
            )
        return state

    def register(self, worker: PeerId, step: int, *, now: float) -> int:
        """Add (or refresh) `worker`, which has completed `step` steps; returns the step it
        continues from: its own, or that of the slowest training worker if that is further, so
        that a newcomer neither holds the run back nor trains on a model it has not seen."""
        others = [self.workers[p].step for p in self.training() if p != worker]
        start = max([step, *([min(others)] if others else [])])
        state = self.workers.get(worker)
        if state is None:
            if len(self.workers) >= MAX_WORKERS:
                raise Refused("queue_full", f"the server already has {MAX_WORKERS} workers")
            if len(self._came) < MAX_WORKERS:
                self._came.add(worker)
            self.workers[worker] = WorkerState(start, now)
        else:
            start = max(start, state.step)
            state.step, state.seen_at, state.done = start, now, False
        self._settle(now)
        return start

    def heartbeat(self, worker: PeerId, step: int, *, done: bool, now: float) -> None:
        """`worker` is alive with `step` completed steps, finished when `done`."""
        state = self._known(worker)
        state.seen_at = now
        state.step = max(state.step, step)
        if done and not state.done:
            state.done = True
            self._waiting.pop(worker, None)
        self._settle(now)

    # -- the barrier -----------------------------------------------------------------------------
    def ask(self, worker: PeerId, step: int, *, now: float) -> Decision:
        """May `worker`, having completed `step` steps, start the next? A waiting worker is
        released (a `Released` event) as soon as the table lets it."""
        state = self._known(worker)
        state.seen_at = now
        self._waiting.pop(worker, None)
        if step > state.step:  # the table moves: that may close a round or release others
            state.step = step
            self._settle(now)
        if self._decide(worker) is Decision.PROCEED:
            self._waiting.pop(worker, None)
            return Decision.PROCEED
        self._waiting[worker] = state.step
        return Decision.WAIT

    def cancel(self, worker: PeerId) -> None:
        """The worker's long poll ended without a release; it will ask again."""
        self._waiting.pop(worker, None)

    def _decide(self, worker: PeerId) -> Decision:
        if self.n_registered < self.min_workers:
            return Decision.WAIT
        my_step = self.workers[worker].step
        if self.lockstep and any(s < my_step for s in self._rounds):
            return Decision.WAIT  # a round before this step still waits to be applied
        others = [p for p in self.training() if p != worker]
        n = len(others) + 1
        size = self._sample_size(n)
        observed = others if size is None else sample_peers(others, size, self.rng)
        view = BarrierView(
            Step(my_step), {p: Step(self.workers[p].step) for p in observed}, float(n)
        )
        return decide(view, self.params)

    def _sample_size(self, population: int) -> int | None:
        if isinstance(self.params, PbspParams | PsspParams):
            return self.sample.resolve(float(population))
        return None

    # -- deltas ----------------------------------------------------------------------------------
    def push(self, worker: PeerId, step: int, base_version: int, payload: T, *, now: float) -> None:
        """Accept `worker`'s delta of `step`, computed from model `base_version`.

        Raises:
            Refused: ``unknown_worker``, or ``stale`` when `step` is not the worker's next step
                (a duplicate, or a step the server moved it past).
        """
        state = self._known(worker)
        state.seen_at = now
        if step != state.step:
            raise Refused(
                "stale",
                f"delta of step {step} from worker {worker.hex()[:8]}, whose next step here is "
                f"{state.step}",
            )
        state.step = step + 1
        pending = _Pending(payload, base_version)
        if self.lockstep:
            self._rounds.setdefault(step, []).append(pending)
        else:
            weight = 1.0 / max(1, len(self.training()))
            self._emit_apply((pending,), weight, step)
        self._settle(now)

    def _emit_apply(self, batch: Sequence[_Pending[T]], weight: float, step: int) -> None:
        staleness = tuple(max(0, self.version - p.base_version) for p in batch)
        self.version += 1
        payloads = tuple(p.payload for p in batch)
        self._events.append(Apply(payloads, weight, self.version, step, staleness))

    def _close_rounds(self) -> None:
        """Apply every BSP round that every training worker has completed."""
        steps = [self.workers[p].step for p in self.training()]
        floor = min(steps) if steps else None  # nobody training: every round is complete
        for step in sorted(self._rounds):
            if floor is not None and step >= floor:
                break
            batch = self._rounds.pop(step)
            self._emit_apply(batch, 1.0 / len(batch), step)

    def _settle(self, now: float) -> None:
        """After any change to the table: close rounds, then release whoever may go."""
        if self.lockstep and self._rounds:
            self._close_rounds()
        for worker in sorted(self._waiting):
            if worker in self.workers and self._decide(worker) is Decision.PROCEED:
                step = self._waiting.pop(worker)
                self._events.append(Released(worker, step))

    # -- time ------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When the next worker's heartbeat timeout runs out."""
        if not self.workers:
            return None
        return min(w.seen_at for w in self.workers.values()) + self.heartbeat_timeout_s

    def on_timer(self, *, now: float) -> list[PeerId]:
        """Evict the workers not heard from within the heartbeat timeout; returns them."""
        # The same sum as next_deadline, so a timer set for that deadline always finds its worker.
        timeout = self.heartbeat_timeout_s
        gone = [p for p, w in self.workers.items() if now >= w.seen_at + timeout]
        for worker in sorted(gone):
            state = self.workers.pop(worker)
            self._waiting.pop(worker, None)
            self._done_left += state.done
            self._events.append(Evicted(worker, state.step, now - state.seen_at, state.done))
        if gone:
            self._settle(now)
        return gone

    def drain_events(self) -> list[ServerEvent[T]]:
        events, self._events = self._events, []
        return events
