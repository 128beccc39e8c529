"""The event heap, `VirtualClock`, the population's step table, the run loop and the trace.

Theory of operation. Each simulated node alternates between computing a step and checking its
barrier. A COMPLETE event ends a step: the node's step count rises by one, and the node checks its
barrier at once. If the check passes, the node starts its next step (after the check's network
delay); if not, it is blocked and re-checks either whenever any node's step changes
(``poll_s=None``, the model of the published PSP figures) or on a RECHECK event every ``poll_s``
seconds. How a check is decided belongs to a `Checker` (``sim/checker.py``); this module only keeps
time, order and state.

Determinism: the heap holds ``(time, seq, kind, node)``, ``seq`` breaking ties; every node draws
from its own rngs, derived from the run seed, so the same seed gives a byte-identical trace.

Must not import io/, node/, asyncio, aiohttp, kademlia, time or module-level random.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Checker",
    "EventQueue",
    "Population",
    "Simulation",
    "StepRecord",
    "Trace",
    "VirtualClock",
    "WaitRecord",
]

COMPLETE = 0
RECHECK = 1
PROGRESS_EVERY = 16_384


class VirtualClock:
    """Simulated monotonic time in seconds; it only moves forward, and only when told to."""

    __slots__ = ("_now",)

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def __call__(self) -> float:
        return self._now

    def advance_to(self, at: float) -> None:
        """Move the clock to `at` (never backwards)."""
        if at < self._now:
            raise ValueError(f"virtual clock cannot go back from {self._now} to {at}")
        self._now = at


class EventQueue:
    """A heap of ``(time, seq, kind, node)``; ``seq`` is a counter that makes ties deterministic."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self._heap)

    def push(self, at: float, kind: int, node: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, node))

    def pop(self) -> tuple[float, int, int]:
        at, _seq, kind, node = heapq.heappop(self._heap)
        return at, kind, node

    def peek_time(self) -> float:
        return self._heap[0][0]


class Population:
    """The step table of all nodes, with a histogram for "how many nodes have reached step v"."""

    def __init__(self, n_nodes: int) -> None:
        self.n_nodes = n_nodes
        self.steps = [0] * n_nodes
        self._hist = [n_nodes]
        self._lowest = 0

    def advance(self, node: int) -> int:
        """Count one more completed step for `node` and return its new step."""
        old = self.steps[node]
        new = old + 1
        self.steps[node] = new
        hist = self._hist
        hist[old] -= 1
        if new == len(hist):
            hist.append(0)
        hist[new] += 1
        while hist[self._lowest] == 0:
            self._lowest += 1
        return new

    def count_at_least(self, step: int) -> int:
        """How many nodes have completed at least `step` steps."""
        if step <= self._lowest:
            return self.n_nodes
        return self.n_nodes - sum(self._hist[self._lowest : step])


class Checker(Protocol):
    """Decides barrier checks for the simulator (see ``sim/checker.py``)."""

    def first_check(self, node: int, now: float) -> bool:
        """`node` has just completed a step; True to proceed, False to block it."""
        ...

    def on_change(self, node: int, step: int, now: float) -> list[int]:
        """`node` reached `step`; return the blocked nodes that pass now (any-change model only)."""
        ...

    def poll(self, node: int, now: float) -> bool:
        """Poll model: re-check the blocked `node`; True to proceed."""
        ...


@dataclass(frozen=True, slots=True)
class StepRecord:
    """`node` completed step `step` at simulated time `at` (seconds)."""

    at: float
    node: int
    step: int


@dataclass(frozen=True, slots=True)
class WaitRecord:
    """`node`, having completed `step`, was blocked from `blocked_at` until `released_at`."""

    node: int
    step: int
    blocked_at: float
    released_at: float


@dataclass(slots=True)
class Trace:
    """Everything that happened in one run, in order; ``to_bytes`` is its canonical encoding."""

    steps: list[StepRecord] = field(default_factory=list)
    waits: list[WaitRecord] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        parts = [struct.pack("<dii", r.at, r.node, r.step) for r in self.steps]
        parts += [
            struct.pack("<iidd", w.node, w.step, w.blocked_at, w.released_at) for w in self.waits
        ]
        return b"".join(parts)


class Simulation:
    """The run loop. Build it, attach a checker, then `run()`.

    Args:
        population: the shared step table.
        draw_step_s: draws one compute time in seconds for a node.
        duration_s: when the run ends (simulated seconds).
        check_delay_s: a passing node starts its next step this much after the check.
        poll_s: the re-check period of a blocked node, or None for re-checks on any step change.
        record: keep a full `Trace` (memory grows with every step).
    """

    def __init__(
        self,
        population: Population,
        draw_step_s: Callable[[int], float],
        *,
        duration_s: float,
        check_delay_s: float = 0.0,
        poll_s: float | None = None,
        record: bool = False,
    ) -> None:
        self.population = population
        self.draw_step_s = draw_step_s
        self.duration_s = duration_s
        self.check_delay_s = check_delay_s
        self.poll_s = poll_s
        self.clock = VirtualClock()
        self.queue = EventQueue()
        self.trace: Trace | None = Trace() if record else None
        n = population.n_nodes
        self.blocked_at: list[float | None] = [None] * n
        self.wait_s = [0.0] * n
        self.n_blocks = 0

    def run(self, checker: Checker, progress: Callable[[float], None] | None = None) -> None:
        """Run until `duration_s`; steps completing after it do not count.

        Args:
            checker: decides the barrier checks.
            progress: called with the simulated time every few thousand events, and at the end.
        """
        for node in range(self.population.n_nodes):
            self._start(node, 0.0)
        queue, end = self.queue, self.duration_s
        n_events = 0
        while queue and queue.peek_time() <= end:
            at, kind, node = queue.pop()
            n_events += 1
            if progress is not None and n_events % PROGRESS_EVERY == 0:
                progress(at)
            self.clock.advance_to(at)
            if kind == COMPLETE:
                self._complete(checker, node, at)
            else:
                self._poll(checker, node, at)
        for node, since in enumerate(self.blocked_at):
            if since is not None:
                self.wait_s[node] += end - since
        if progress is not None:
            progress(end)

    def _start(self, node: int, at: float) -> None:
        self.queue.push(at + self.draw_step_s(node), COMPLETE, node)

    def _release(self, node: int, at: float) -> None:
        since = self.blocked_at[node]
        assert since is not None, "only a blocked node is released"
        self.blocked_at[node] = None
        released = at + self.check_delay_s
        self.wait_s[node] += released - since
        if self.trace is not None:
            self.trace.waits.append(WaitRecord(node, self.population.steps[node], since, released))
        self._start(node, released)

    def _complete(self, checker: Checker, node: int, at: float) -> None:
        step = self.population.advance(node)
        if self.trace is not None:
            self.trace.steps.append(StepRecord(at, node, step))
        for other in checker.on_change(node, step, at):
            self._release(other, at)
        if checker.first_check(node, at):
            self._start(node, at + self.check_delay_s)
            return
        self.n_blocks += 1
        self.blocked_at[node] = at
        if self.poll_s is not None:
            self.queue.push(at + self.poll_s, RECHECK, node)

    def _poll(self, checker: Checker, node: int, at: float) -> None:
        if checker.poll(node, at):
            self._release(node, at)
        else:
            assert self.poll_s is not None
            self.queue.push(at + self.poll_s, RECHECK, node)
