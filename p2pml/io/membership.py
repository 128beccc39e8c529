"""What a node knows of the population: N^ from random lookups, and a pool of uniform live peers.

Every refresh runs L random-target lookups. Each feeds the estimator (the distance of the k-th
closest node, this node counted) and is also one zone draw for the sample pool (`core/zones.py`).
More zone lookups top the pool up to `pool_draws` accepted draws per refresh; accepted peers are
confirmed live with a signed ``info`` RPC, and every pooled peer is pinged each refresh, so a dead
peer leaves the pool within one refresh interval. While lookups find fewer than k nodes the network
is small enough to count exactly, as it is while lookups find nobody the routing table lacks and no
bucket ever overflowed; then samples come straight from the routing table.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from p2pml.core.estimate import ID_SPACE, PopulationEstimate, estimate_from_lookups
from p2pml.core.sampling import sample_peers
from p2pml.core.types import PeerId
from p2pml.core.zones import PeerPool, choose_zone, draw_from_zone, zone_bits
from p2pml.errors import OverlayError, PeerTimeout, ProtocolError
from p2pml.protocol.dht import Contact, NodeRecord, limit_per_ip

if TYPE_CHECKING:
    from p2pml.io.overlay import KademliaOverlay, LookupResult

__all__ = ["EstimateView", "Membership"]

LOOKUP_CONCURRENCY = 4
MAX_DRAW_LOOKUPS = 64
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EstimateView:
    """N^ as a node reports it: the estimate, its L and k, its expected error and its age."""

    n_hat: float
    n_lookups: int
    k: int
    rel_error: float
    age_s: float

    @property
    def is_exact(self) -> bool:
        return self.n_lookups == 0


async def _bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


def kth_distance(result: LookupResult, self_id: PeerId, k: int) -> int | None:
    """The XOR distance from the target to the k-th closest node (self counted), or None."""
    target = int.from_bytes(result.target, "big")
    ids = {c.peer_id for c in result.contacts} | {self_id}
    if len(ids) < k:
        return None
    return sorted(int.from_bytes(p, "big") ^ target for p in ids)[k - 1]


class Membership:
    """The estimate and the pool of one overlay; driven by `KademliaOverlay.refresh`."""

    def __init__(self, overlay: KademliaOverlay) -> None:
        self._overlay = overlay
        self._config = overlay.config
        self._pool = PeerPool(self._config.pool_capacity)
        self._contacts: dict[PeerId, Contact] = {}
        self.records: dict[PeerId, NodeRecord] = {}
        self._estimate: PopulationEstimate | None = None
        self._estimate_at = 0.0
        self.n_zone_draws = 0
        self.n_overflow_zones = 0

    @property
    def estimate(self) -> EstimateView | None:
        if self._estimate is None:
            return None
        e = self._estimate
        return EstimateView(
            e.n_hat, e.n_lookups, e.k, e.rel_error, time.monotonic() - self._estimate_at
        )

    async def refresh(self) -> None:
        """Drop dead peers, re-estimate N and top up the pool with fresh uniform draws."""
        table_checked = self._estimate is None or self._estimate.is_exact
        await self.check_pool()
        await self.estimate_now()
        if self._estimate is not None and self._estimate.is_exact and not table_checked:
            # The network is now counted exactly and samples come from the routing table, but
            # only the pool was pinged: check the table too, then count again without the dead.
            await self.check_pool()
            await self.estimate_now()
        if self._estimate is not None and not self._estimate.is_exact:
            await self.fill_pool(self._config.pool_draws)

    async def estimate_now(self) -> EstimateView | None:
        """Run L random lookups, update N^ and take each lookup as one zone draw for the pool."""
        k, overlay = self._config.k, self._overlay
        # b is fixed before the targets are drawn, so zones stay exactly uniform. With no estimate
        # yet, or only a small exact count, b could be far too small (b = 0 makes every lookup one
        # overflowing zone): no draws this round then; fill_pool draws with the new estimate.
        previous = self._estimate
        bits = self._bits() if previous is not None and not previous.is_exact else None
        table = overlay.contacts()  # lookups add the nodes they meet: take it before
        before = {c.peer_id for c in table}
        targets = [choose_zone(overlay.rng) for _ in range(self._config.estimate_lookups)]
        results = await _bounded(
            [partial(overlay.lookup, t.to_bytes(20, "big")) for t in targets], LOOKUP_CONCURRENCY
        )
        # One IP address counts as at most max_contacts_per_ip nodes here too (the table's own
        # first): a Sybil flood from one address moves the count by that much at most.
        met = [c for r in results for c in r.contacts if c.peer_id != overlay.peer_id]
        known = limit_per_ip(
            table + met, self._config.max_contacts_per_ip, exempt_host=self._config.listen.host
        )
        seen = {c.peer_id for c in known}
        self._estimate = estimate_from_lookups(
            [kth_distance(r, overlay.peer_id, k) for r in results],
            k=k,
            n_known=len(seen - {overlay.peer_id}) + 1,
            complete=[r.complete for r in results],
            met_unknown=not seen <= before,
            table_complete=overlay.table_is_complete(),
        )
        self._estimate_at = time.monotonic()
        if bits is not None:
            await self._accept_draws(results, bits)
        return self.estimate

    def _bits(self) -> int:
        # zones of about k/4 to k/2 nodes: a lookup for the k closest nearly always holds one
        n_hat = self._estimate.n_hat if self._estimate is not None else 0.0
        return zone_bits(n_hat, mean_zone=max(1.0, self._config.k / 4))

    async def _accept_draws(self, results: Sequence[LookupResult], bits: int) -> int:
        chosen: list[Contact] = []
        for r in results:
            by_id = {c.peer_id: c for c in r.contacts}
            draw = draw_from_zone(
                int.from_bytes(r.target, "big"),
                bits,
                list(by_id),
                self_id=self._overlay.peer_id,
                cap=self._config.k,
                rng=self._overlay.rng,
            )
            self.n_zone_draws += 1
            self.n_overflow_zones += draw.overflow
            if draw.chosen is not None:
                chosen.append(by_id[draw.chosen])
        added = 0
        for contact in chosen:
            if await self._confirm(contact):
                self._pool.add(contact.peer_id, now=time.monotonic())
                added += 1
        self._trim()
        return added

    def _trim(self) -> None:
        """Forget records of peers the bounded pool no longer holds."""
        pooled = set(self._pool.distinct())
        for peer in [p for p in self._contacts if p not in pooled]:
            del self._contacts[peer]
            self.records.pop(peer, None)

    async def _confirm(self, contact: Contact) -> bool:
        try:
            record = await self._overlay.info(contact)
        except (PeerTimeout, ProtocolError):  # silent, forged, not admitted, clock off
            return False
        self._contacts[contact.peer_id] = contact
        self.records[contact.peer_id] = record
        return True

    async def fill_pool(self, n_draws: int) -> int:
        """Add up to `n_draws` accepted uniform draws, with at most 4 lookups per draw wanted."""
        added, budget = 0, 4 * n_draws
        bits = self._bits()
        radius, rng = ID_SPACE >> bits, self._overlay.rng
        while added < n_draws and budget > 0:
            batch = min(budget, LOOKUP_CONCURRENCY)
            budget -= batch
            targets = [choose_zone(rng).to_bytes(20, "big") for _ in range(batch)]
            results = await _bounded(
                [partial(self._overlay.lookup, t, radius=radius) for t in targets],
                LOOKUP_CONCURRENCY,
            )
            added += await self._accept_draws(results, bits)
        return added

    async def check_pool(self) -> None:
        """Ping every peer samples come from; forget the ones that do not answer.

        That is the pool, or the whole routing table while the network is counted exactly.
        """
        if self._estimate is None or self._estimate.is_exact:
            peers = self._overlay.contacts()
        else:
            peers = [self._contacts[p] for p in self._pool.distinct() if p in self._contacts]
        alive = await _bounded([partial(self._is_alive, c) for c in peers], 16)
        for contact, ok in zip(peers, alive, strict=True):
            if not ok:
                self.drop(contact.peer_id)
                self._overlay.forget(contact)

    async def _is_alive(self, contact: Contact) -> bool:
        return await self._overlay.try_ping(contact.addr, contact.peer_id) is not None

    def drop(self, peer_id: PeerId) -> None:
        """Forget a peer that failed an RPC (a barrier's step RPC, say)."""
        self._pool.discard(peer_id)
        self._contacts.pop(peer_id, None)
        self.records.pop(peer_id, None)

    def sample(self, k: int, rng: random.Random) -> list[Contact]:
        """k distinct live peers, uniform, never self: from the table while the network is
        counted exactly, else from the pool of uniform draws."""
        if self._estimate is None or self._estimate.is_exact:
            silent = self._overlay.endpoint.silent()
            live = [c for c in self._overlay.contacts() if c not in silent]
            return sample_peers(live, k, rng)
        return [self._contacts[p] for p in self._pool.take(k, rng) if p in self._contacts]

    async def draw_uniform(self) -> Contact:
        """One exactly uniform live peer other than self, by zone + rejection.

        Raises:
            OverlayError: when no draw was accepted within `MAX_DRAW_LOOKUPS` lookups.
        """
        overlay = self._overlay
        if self._estimate is None:
            await self.estimate_now()
        if self._estimate is not None and self._estimate.is_exact:
            candidates = self.sample(1, overlay.rng)
            if candidates:
                return candidates[0]
        bits = self._bits()
        for _ in range(MAX_DRAW_LOOKUPS):
            target = choose_zone(overlay.rng).to_bytes(20, "big")
            result = await overlay.lookup(target, radius=ID_SPACE >> bits)
            by_id = {c.peer_id: c for c in result.contacts}
            draw = draw_from_zone(
                int.from_bytes(result.target, "big"),
                bits,
                list(by_id),
                self_id=overlay.peer_id,
                cap=self._config.k,
                rng=overlay.rng,
            )
            if draw.chosen is not None and await self._confirm(by_id[draw.chosen]):
                return by_id[draw.chosen]
        raise OverlayError(f"no uniform peer drawn in {MAX_DRAW_LOOKUPS} lookups")
