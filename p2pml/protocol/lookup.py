"""`LookupMachine`: the sans-IO iterative Kademlia node lookup (Maymounkov & Mazieres 2002, §2.3).

Theory of operation. A lookup for a 160-bit target keeps every contact it has heard of in one of
four states: NEW (known, not asked), ASKED (a ``find_node`` is in flight), ANSWERED, FAILED. Inputs
are `on_reply(peer_id, contacts, now=)` and `on_failure(peer_id, now=)`; `next_queries(now=)`
returns the contacts to ask now and `next_deadline(now=)` when the driver should call again.

Unlike the kademlia package's crawler, which waits for a whole round of alpha replies, a slot frees
as soon as any reply or failure arrives, and an in-flight query older than `stall_s` stops holding a
slot (it may still answer), so a dead contact costs at most one RPC timeout instead of one per
round. The lookup is done when the k closest contacts that have not failed have all answered; the
result is those k, closest first, and never a contact that failed. All transitions live in this
file.

Invariants: self is never a candidate; a FAILED contact is never asked again; the candidate set is
bounded (`max_candidates`), dropping the farthest NEW ones first.

Must not import asyncio, sockets, threads, time, module-level random or torch.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable
from enum import Enum

from p2pml.core.types import PeerId
from p2pml.errors import UnexpectedMessage
from p2pml.protocol.dht import Contact

__all__ = ["LookupMachine"]


class _State(Enum):
    NEW = 0
    ASKED = 1
    ANSWERED = 2
    FAILED = 3


class LookupMachine:
    """One iterative lookup; see the module docstring.

    Args:
        target: the 160-bit target as an int.
        self_id: this node's ID, never a candidate.
        seeds: the starting contacts (the closest this node knows).
        k: how many closest contacts to find.
        alpha: queries in flight at once (not counting stalled ones).
        stall_s: after this long a query stops holding a slot.
        max_candidates: bound on the contacts remembered.
        skip: contacts never to ask (they recently missed a reply to this node).
        radius: for enumerating a zone (the IDs within this XOR distance of the target): the
            lookup is done once every candidate inside the radius (up to k) and the alpha
            closest outside it have answered, instead of the k closest.
    """

    def __init__(
        self,
        target: int,
        self_id: PeerId,
        seeds: Iterable[Contact],
        *,
        k: int,
        alpha: int,
        stall_s: float,
        max_candidates: int = 512,
        radius: int | None = None,
        skip: Collection[Contact] = (),
    ) -> None:
        self._radius = radius
        self._skip = frozenset(skip)  # a snapshot: contacts silent when the lookup began
        self.target = target
        self._self = self_id
        self._k, self._alpha, self._stall_s = k, alpha, stall_s
        self._max = max(max_candidates, 2 * k)
        self._contacts: dict[PeerId, Contact] = {}
        self._state: dict[PeerId, _State] = {}
        self._asked_at: dict[PeerId, float] = {}
        self._dist: dict[PeerId, int] = {}
        self.n_queries = 0
        self.n_failures = 0
        self._add(seeds)

    def _distance(self, peer_id: PeerId) -> int:
        return self._dist[peer_id]

    def _add(self, contacts: Iterable[Contact]) -> None:
        for c in contacts:
            known = c.peer_id in self._state or c in self._skip
            if c.peer_id != self._self and not known:
                self._contacts[c.peer_id] = c
                self._state[c.peer_id] = _State.NEW
                self._dist[c.peer_id] = int.from_bytes(c.peer_id, "big") ^ self.target
        if len(self._state) > self._max:
            new = [p for p, s in self._state.items() if s is _State.NEW]
            for p in heapq.nlargest(len(self._state) - self._max, new, key=self._distance):
                del self._state[p], self._contacts[p], self._dist[p]

    def _closest_alive(self, spare: int = 0) -> list[PeerId]:
        alive = [p for p, s in self._state.items() if s is not _State.FAILED]
        nearest = heapq.nsmallest(self._k + spare, alive, key=self._distance)
        if self._radius is None:
            return nearest
        inside = [p for p in nearest if self._dist[p] < self._radius]
        return nearest[: len(inside) + self._alpha + spare]

    def _stalled(self, now: float) -> int:
        return sum(
            1
            for p, at in self._asked_at.items()
            if self._state[p] is _State.ASKED and now - at >= self._stall_s
        )

    def next_queries(self, *, now: float) -> list[Contact]:
        """Contacts to send a ``find_node`` to now (each is marked ASKED).

        Each stalled query (probably a dead contact) widens the set asked by one, so that when it
        finally fails its successor has already answered: a dead contact costs one RPC timeout
        in all, not one after another.
        """
        stalled = self._stalled(now)
        active = sum(1 for s in self._state.values() if s is _State.ASKED) - stalled
        out = []
        for p in self._closest_alive(spare=stalled):
            if active >= self._alpha:
                break
            if self._state[p] is _State.NEW:
                self._state[p] = _State.ASKED
                self._asked_at[p] = now
                self.n_queries += 1
                active += 1
                out.append(self._contacts[p])
        return out

    def next_deadline(self, *, now: float) -> float | None:
        """When the next in-flight query stalls (frees its slot), or None when none will.

        Queries that have stalled already are not deadlines: their RPC timers end them.
        """
        times = [
            at + self._stall_s
            for p, at in self._asked_at.items()
            if self._state[p] is _State.ASKED and at + self._stall_s > now
        ]
        return min(times) if times else None

    def _expect_asked(self, peer_id: PeerId) -> None:
        if self._state.get(peer_id) is not _State.ASKED:
            raise UnexpectedMessage(f"lookup: no query in flight to {peer_id.hex()[:16]}")

    def on_reply(self, peer_id: PeerId, contacts: Iterable[Contact], *, now: float) -> None:
        """`peer_id` answered with `contacts` (already schema-checked)."""
        self._expect_asked(peer_id)
        self._state[peer_id] = _State.ANSWERED
        self._add(contacts)

    def on_failure(self, peer_id: PeerId, *, now: float) -> None:
        """`peer_id` timed out or answered with garbage: never use it again in this lookup."""
        self._expect_asked(peer_id)
        self._state[peer_id] = _State.FAILED
        self.n_failures += 1

    @property
    def is_done(self) -> bool:
        return all(self._state[p] is _State.ANSWERED for p in self._closest_alive())

    def failed(self) -> list[Contact]:
        return [self._contacts[p] for p, s in self._state.items() if s is _State.FAILED]

    def result(self) -> list[Contact]:
        """The k closest contacts that answered, closest first."""
        answered = (p for p, s in self._state.items() if s is _State.ANSWERED)
        return [self._contacts[p] for p in heapq.nsmallest(self._k, answered, key=self._distance)]
