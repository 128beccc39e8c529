"""Exactly uniform peer draws over a DHT (zone + rejection), and the pool that barriers take from.

Why zone + rejection (King & Saia, "Choosing a random peer", PODC 2004, in its zone form): the node
closest to a random target is drawn in proportion to the gap before it, so 11-37 % of nodes get
under half their fair share. Instead a draw picks a random zone, the nodes sharing a random b-bit
ID prefix. Every node lies in the chosen zone with probability exactly 2^-b, whatever the other IDs
are. The draw then accepts with probability |zone| / cap and returns one member chosen uniformly, so
each node comes out with probability 2^-b / cap: exactly uniform, draws are independent, and a
draw that lands on the drawing node itself is rejected, which makes it uniform over the others.

The zone cluster (take every member of the zone) is cheaper per lookup, but zone-mates always come
together, so counts over many draws are over-dispersed and a barrier that takes k of the pool
favours nodes in small zones; one member per accepted zone keeps draws i.i.d.

b is chosen from N^ so that a zone holds about `MEAN_ZONE` nodes: one lookup for k = cap closest
nodes enumerates the zone completely unless it has cap or more members, which at a mean of 5-10 and
cap = 20 happens for under 0.4 % of zones (such a zone is accepted with probability 1 and counted).
Any b gives exact uniformity; N^ only affects the cost.

`PeerPool` keeps recent draws (i.i.d. uniform entries). A barrier takes random positions, skipping
duplicates, so each check gets a fresh, uniform, distinct subset without a lookup.

Must not import asyncio, sockets, threads, time, module-level random or torch.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from p2pml.core.estimate import ID_SPACE
from p2pml.core.types import PeerId

__all__ = [
    "MEAN_ZONE",
    "PeerPool",
    "ZoneDraw",
    "choose_zone",
    "draw_from_zone",
    "zone_bits",
    "zone_members",
]

MEAN_ZONE: Final = 5.0
ID_BITS: Final = 160


def zone_bits(n_hat: float, *, mean_zone: float = MEAN_ZONE) -> int:
    """The prefix length b that puts about `mean_zone` (to 2 x that) of N^ nodes in a zone."""
    if not math.isfinite(n_hat) or n_hat <= mean_zone:
        return 0
    return min(ID_BITS, math.floor(math.log2(n_hat / mean_zone)))


@dataclass(frozen=True, slots=True)
class ZoneDraw:
    """One rejection-sampling draw.

    Attributes:
        chosen: the drawn peer, or None when the draw was rejected.
        zone_size: the number of nodes found in the zone (self included).
        overflow: the zone had `cap` or more nodes, so it may be incomplete.
    """

    chosen: PeerId | None
    zone_size: int
    overflow: bool


def choose_zone(rng: random.Random) -> int:
    """A uniformly random lookup target; its top b bits name the zone."""
    return rng.getrandbits(ID_BITS)


def zone_members(target: int, bits: int, ids: Sequence[PeerId]) -> list[PeerId]:
    """The IDs in `ids` that share the first `bits` bits with `target`."""
    radius = ID_SPACE >> bits
    return [p for p in ids if int.from_bytes(p, "big") ^ target < radius]


def draw_from_zone(
    target: int,
    bits: int,
    found: Sequence[PeerId],
    *,
    self_id: PeerId,
    cap: int,
    rng: random.Random,
) -> ZoneDraw:
    """Accept the zone of `target` with probability |zone| / cap and pick one member.

    Args:
        found: the IDs a lookup for `target` with k = `cap` returned; `self_id` need not be in it.
        cap: the largest zone that can be enumerated (the lookup's k).

    Returns:
        The draw; `chosen` is None when rejected, including when it picked `self_id`.
    """
    members = sorted(set(zone_members(target, bits, [*found, self_id])))
    overflow = len(members) >= cap
    if rng.random() * cap >= len(members):
        return ZoneDraw(None, len(members), overflow)
    pick = members[rng.randrange(len(members))]
    return ZoneDraw(None if pick == self_id else pick, len(members), overflow)


class PeerPool:
    """A bounded pool of i.i.d. uniform draws, refreshed by the overlay, taken by barriers.

    Args:
        capacity: entries kept; the oldest are dropped first.
    """

    def __init__(self, capacity: int) -> None:
        self._entries: deque[tuple[PeerId, float]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, peer_id: PeerId, *, now: float) -> None:
        self._entries.append((peer_id, now))

    def discard(self, peer_id: PeerId) -> None:
        """Remove every entry of `peer_id` (it failed an RPC or left)."""
        kept = [e for e in self._entries if e[0] != peer_id]
        self._entries.clear()
        self._entries.extend(kept)

    def distinct(self) -> list[PeerId]:
        return sorted({p for p, _ in self._entries})

    def take(self, k: int, rng: random.Random) -> list[PeerId]:
        """Up to `k` distinct peers: random positions, duplicates skipped (uniform, no lookup)."""
        order = list(range(len(self._entries)))
        rng.shuffle(order)
        out: list[PeerId] = []
        seen: set[PeerId] = set()
        for i in order:
            if len(out) >= k:
                break
            peer = self._entries[i][0]
            if peer not in seen:
                seen.add(peer)
                out.append(peer)
        return out
