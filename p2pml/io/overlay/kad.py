"""The kademlia package underneath the overlay, subclassed and hardened.

The only module of p2pml that imports kademlia. The package's classes stay underneath: `DhtProtocol`
subclasses its `KademliaProtocol` (installed through `Server.protocol_class`), `HardenedTable` its
`RoutingTable` and `KBucket`s, `BoundedStore` its `ForgetfulStorage`. What changes, and why:

- Datagrams are decoded and schema-checked (`protocol/dht.py`) before any handler runs; bad ones
  are dropped and counted, with one rate-limited warning per host, and never become unhandled task
  exceptions. Handlers are synchronous, so no task is spawned per datagram.
- Replies are awaited on plain futures with our RPC timeout (well under a second), so a lookup can
  move on without them; a missed reply counts against the contact and evicts it after
  `evict_after_misses` misses (at once when a replacement waits).
- A contact enters the routing table only after it answered a signed ``ping`` from its own address
  with the key that hashes to its ID; forged IDs never get in. Checks are callbacks on futures,
  bounded in number, one per address at a time.
- `find_neighbors` is exact (the package's traversal can return the wrong set), buckets are found
  by range, and a full bucket pings its head through an owned future, not a stray task.
- The table holds one ID per ``ip:port`` and at most `max_contacts_per_ip` IDs per IP address
  (IPv6: per /64; replacements count too; this node's own IP is exempt): the first come keep
  their place (a Sybil flood from one address adds a few contacts at most), and a second ID at a
  held address gets in only after the first fails a liveness check.
- Datagrams go through per-source and total rate limits before any decoding (replies to this
  node's own requests excepted); outstanding requests are bounded.
- Storage is bounded in entries and per sending host; values are bytes of at most 1 KiB. Known
  contacts persist as JSON, never pickle.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import os
from collections import Counter
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Final

from kademlia.network import Server
from kademlia.node import Node as KNode
from kademlia.protocol import KademliaProtocol
from kademlia.routing import KBucket, RoutingTable
from kademlia.storage import ForgetfulStorage

from p2pml.core.types import Address, PeerId
from p2pml.errors import ProtocolError
from p2pml.protocol import dht
from p2pml.protocol.dht import Contact

if TYPE_CHECKING:
    from p2pml.io.overlay.endpoint import DhtEndpoint

__all__ = [
    "TIMEOUT",
    "BoundedStore",
    "DhtProtocol",
    "DhtServer",
    "HardenedTable",
    "KNode",
    "to_contact",
    "to_knode",
]

log = logging.getLogger(__name__)

TIMEOUT: Final = object()
"""The result of a request future whose reply did not come in time."""


def to_contact(node: KNode) -> Contact:
    return Contact(PeerId(node.id), Address(node.ip, node.port))


def to_knode(contact: Contact) -> KNode:
    return KNode(contact.peer_id, contact.addr.host, contact.addr.port)


class _Held:
    """Where each ID a table holds (bucket or replacement) is, and how many each IP group has."""

    def __init__(self) -> None:
        self.by_id: dict[bytes, tuple[str, int]] = {}
        self.by_endpoint: dict[tuple[str, int], bytes] = {}
        self.per_group: Counter[str] = Counter()

    def put(self, node: KNode) -> None:
        endpoint = (node.ip, node.port)
        old = self.by_id.get(node.id)
        if old == endpoint:
            return
        if old is not None:
            self.drop(node.id)
        self.by_id[node.id] = endpoint
        self.by_endpoint[endpoint] = node.id
        self.per_group[dht.ip_group(node.ip)] += 1

    def drop(self, node_id: bytes) -> None:
        endpoint = self.by_id.pop(node_id, None)
        if endpoint is None:
            return
        if self.by_endpoint.get(endpoint) == node_id:
            del self.by_endpoint[endpoint]
        group = dht.ip_group(endpoint[0])
        self.per_group[group] -= 1
        if self.per_group[group] <= 0:
            del self.per_group[group]


class HardenedBucket(KBucket):  # type: ignore[misc]
    """The package's k-bucket, keeping the table's `_Held` index up to date."""

    def __init__(self, lower: int, upper: int, ksize: int, held: _Held) -> None:
        super().__init__(lower, upper, ksize)
        self.held = held

    def split(self) -> tuple[HardenedBucket, HardenedBucket]:
        midpoint = (self.range[0] + self.range[1]) // 2
        one = HardenedBucket(self.range[0], midpoint, self.ksize, self.held)
        two = HardenedBucket(midpoint + 1, self.range[1], self.ksize, self.held)
        for node in chain(self.nodes.values(), self.replacement_nodes.values()):
            (one if node.long_id <= midpoint else two).add_node(node)
        return one, two

    def add_node(self, node: KNode) -> bool:
        """Add or refresh `node`; False (it waits as a replacement) when the bucket is full."""
        self.held.put(node)
        if node.id in self.nodes:
            del self.nodes[node.id]
            self.nodes[node.id] = node
            return True
        if len(self.nodes) < self.ksize:
            self.replacement_nodes.pop(node.id, None)
            self.nodes[node.id] = node
            return True
        self.replacement_nodes.pop(node.id, None)
        self.replacement_nodes[node.id] = node
        while len(self.replacement_nodes) > self.max_replacement_nodes:
            gone, _ = self.replacement_nodes.popitem(last=False)
            self.held.drop(gone)
        return False

    def remove_node(self, node: KNode) -> None:
        if self.replacement_nodes.pop(node.id, None) is not None:
            self.held.drop(node.id)
        if self.nodes.pop(node.id, None) is not None:
            self.held.drop(node.id)
            if self.replacement_nodes:  # the newest replacement takes the place
                promoted_id, promoted = self.replacement_nodes.popitem()
                self.nodes[promoted_id] = promoted


class HardenedTable(RoutingTable):  # type: ignore[misc]
    """The package's routing table with an exact neighbour search, bounded-miss eviction and
    per-address caps (see the module docstring)."""

    def __init__(
        self,
        protocol: DhtProtocol,
        ksize: int,
        node: KNode,
        evict_after: int,
        *,
        max_per_ip: int = 3,
        exempt_host: str = "",
    ) -> None:
        self._evict_after = evict_after
        self._misses: dict[bytes, int] = {}
        self._max_per_ip = max_per_ip
        self._exempt_host = exempt_host
        self._held = _Held()
        super().__init__(protocol, ksize, node)

    def flush(self) -> None:
        self._held = _Held()
        self.buckets = [HardenedBucket(0, 2**160 - 1, self.ksize, self._held)]
        self._starts = [0]

    def split_bucket(self, index: int) -> None:
        super().split_bucket(index)
        self._starts = [b.range[0] for b in self.buckets]

    def get_bucket_for(self, node: KNode) -> int:
        return bisect.bisect_right(self._starts, node.long_id) - 1

    def nodes(self) -> list[KNode]:
        return [n for b in self.buckets for n in b.nodes.values()]

    def find_neighbors(
        self, node: KNode, k: int | None = None, exclude: KNode | None = None
    ) -> list[KNode]:
        target, home = node.long_id, (exclude.ip, exclude.port) if exclude else None
        eligible = [n for n in self.nodes() if n.long_id != target and (n.ip, n.port) != home]
        return heapq.nsmallest(k or self.ksize, eligible, key=lambda n: n.long_id ^ target)

    def holder(self, ip: str, port: int) -> bytes | None:
        """The ID the table holds at this address, if any."""
        return self._held.by_endpoint.get((ip, port))

    def refusal(self, node: KNode) -> str | None:
        """Why `node` may not enter: ``endpoint_taken`` or ``ip_cap``; None when it may."""
        if self.holds(node):
            return None
        holder = self._held.by_endpoint.get((node.ip, node.port))
        if holder is not None and holder != node.id:
            return "endpoint_taken"
        if node.ip == self._exempt_host:
            return None
        group = dht.ip_group(node.ip)
        n_held = self._held.per_group.get(group, 0)
        moved = self._held.by_id.get(node.id)
        if moved is not None and dht.ip_group(moved[0]) == group:
            n_held -= 1  # the same ID moving within its group takes no new place
        return "ip_cap" if n_held >= self._max_per_ip else None

    def add_contact(self, node: KNode) -> str | None:
        """Add or refresh a verified contact; returns why it was refused, or None."""
        why = self.refusal(node)
        if why is not None:
            return why
        self._misses.pop(node.id, None)
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        bucket.touch_last_updated()  # heard from this range: it needs no refresh lookup
        waiting = node.id in bucket.replacement_nodes
        if bucket.add_node(node):
            return None
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node)
        if not waiting:  # full: a new replacement waits while the head is checked (once)
            self.protocol.check_alive(to_contact(bucket.head()))
        return None

    def is_complete(self) -> bool:
        """No bucket holds a contact it had to turn away: the table holds everyone it verified."""
        # A full bucket keeps the contacts it turns away as replacements, so none means none lost.
        return not any(b.replacement_nodes for b in self.buckets)

    def holds(self, node: KNode) -> bool:
        """The table has this ID at this very address (a claim about an ID elsewhere is not it)."""
        bucket = self.buckets[self.get_bucket_for(node)]
        held = bucket.nodes.get(node.id) or bucket.replacement_nodes.get(node.id)
        return held is not None and (held.ip, held.port) == (node.ip, node.port)

    def remove_contact(self, node: KNode) -> None:
        """Remove `node`, but only where the table holds it at the same address."""
        if self.holds(node):
            self._misses.pop(node.id, None)
            super().remove_contact(node)

    def note_miss(self, node: KNode) -> None:
        if not self.holds(node):
            return
        misses = self._misses.get(node.id, 0) + 1
        bucket = self.buckets[self.get_bucket_for(node)]
        if misses >= self._evict_after or bucket.replacement_nodes:
            self.remove_contact(node)
        else:
            self._misses[node.id] = misses


class BoundedStore(ForgetfulStorage):  # type: ignore[misc]
    """The package's TTL store, bounded in entries and in entries per sending host."""

    def __init__(self, max_values: int, max_per_host: int, ttl_s: float = 3600.0) -> None:
        super().__init__(ttl=int(ttl_s))
        self._max, self._max_per_host = max_values, max_per_host
        self._owner: dict[bytes, str] = {}

    def put(self, key: bytes, value: bytes, host: str) -> bool:
        self.cull()
        for gone in set(self._owner) - set(self.data):
            del self._owner[gone]
        if key not in self.data:
            if len(self.data) >= self._max:
                return False
            if sum(1 for h in self._owner.values() if h == host) >= self._max_per_host:
                return False
        self[key] = value
        self._owner[key] = host
        return True


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """Datagram handling, RPC handlers and requests; see the module docstring."""

    transport: asyncio.DatagramTransport  # set by the base class's connection_made
    storage: BoundedStore  # set by the base class's __init__

    def __init__(self, endpoint: DhtEndpoint) -> None:
        self.ep = endpoint
        super().__init__(endpoint.knode, endpoint.store, endpoint.config.k)
        self._wait_timeout = endpoint.config.rpc_timeout_s
        self.router = HardenedTable(
            self,
            endpoint.config.k,
            endpoint.knode,
            endpoint.config.evict_after_misses,
            max_per_ip=endpoint.config.max_contacts_per_ip,
            exempt_host=endpoint.config.listen.host,
        )
        self._outstanding: dict[
            bytes, tuple[asyncio.Future[object], asyncio.TimerHandle, Contact | None]
        ] = {}

    # -- receiving -----------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # Rate limits come first, before any decoding; a reply to a request of ours is not
        # charged (we chose to ask), anything else is.
        solicited = data[:1] == b"\x01" and data[1 : 1 + dht.MSG_ID_BYTES] in self._outstanding
        if not solicited and not self.ep.admit_datagram(len(data), addr[0]):
            return
        try:
            dg = dht.decode_datagram(data)
            if dg.kind is dht.Kind.REPLY:
                self._accept_reply(dg.msg_id, dg.body, addr)
            else:
                self._answer(dg.msg_id, dg.body, addr)
        except ProtocolError as err:
            self.ep.reject("malformed", addr[0], err)
        except Exception:  # a bug in a handler must not take the node down: log it, keep serving
            self.ep.counters["internal_error"] += 1
            log.exception("internal error handling a datagram from %s", addr[0])

    def __getattr__(self, name: str) -> object:
        # rpcudp turns every unknown attribute into a remote call: a typo would send datagrams.
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        self.ep.counters["socket_error"] += 1

    def _accept_reply(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            self.ep.counters["unsolicited_reply"] += 1
            return
        future, timer, contact = entry
        if contact is not None and (addr[0], addr[1]) != (contact.addr.host, contact.addr.port):
            self.ep.reject("reply_from_wrong_address", addr[0], "reply to another host's request")
            return
        del self._outstanding[msg_id]
        timer.cancel()
        if contact is not None:
            self.ep.heard_from(contact)
        if not future.done():
            future.set_result(body)

    def _answer(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        name, sender, args = dht.decode_request(body)
        source = Address(addr[0], addr[1])
        if sender != self.ep.peer_id:
            self.ep.heard_from(Contact(sender, source))
        handler: Callable[..., object] = getattr(self, f"_rpc_{name}")
        reply = handler(msg_id, source, sender, *args)
        self.transport.sendto(dht.encode_reply(msg_id, reply), addr)

    def _rpc_ping(self, msg_id: bytes, source: Address, sender: PeerId) -> object:
        return dht.seal_signed(self.ep.key, "ping", msg_id, b"", self.ep.admission)

    def _rpc_info(self, msg_id: bytes, source: Address, sender: PeerId) -> object:
        record = dht.encode_record(self.ep.record())
        return dht.seal_signed(self.ep.key, "info", msg_id, record, self.ep.admission)

    def _rpc_step(self, msg_id: bytes, source: Address, sender: PeerId) -> object:
        report = dht.StepReport(self.ep.step, self.ep.done)
        return dht.seal_signed(
            self.ep.key, "step", msg_id, dht.encode_step(report), self.ep.admission
        )

    def _rpc_find_node(self, msg_id: bytes, source: Address, sender: PeerId, key: bytes) -> object:
        near = self.router.find_neighbors(
            KNode(key), self.ep.config.k + 4, exclude=KNode(sender, source.host, source.port)
        )
        silent = self.ep.silent()  # do not send others to contacts that stopped answering
        if silent:
            near = [n for n in near if to_contact(n) not in silent]
        return [[n.id, n.ip, n.port] for n in near[: self.ep.config.k]]

    def _rpc_find_value(self, msg_id: bytes, source: Address, sender: PeerId, key: bytes) -> object:
        value = self.storage.get(key, None)
        if value is None:
            return self._rpc_find_node(msg_id, source, sender, key)
        return {"value": value}

    def _rpc_store(
        self, msg_id: bytes, source: Address, sender: PeerId, key: bytes, value: bytes
    ) -> object:
        ok = self.ep.store.put(key, value, source.host)
        if not ok:
            self.ep.reject("store_over_cap", source.host, "store refused: storage cap reached")
        return ok

    # -- requesting ----------------------------------------------------------------------------
    def request(
        self, addr: Address, name: str, args: list[object], contact: Contact | None
    ) -> tuple[bytes, asyncio.Future[object]]:
        """Send a request; the future gets the reply body or `TIMEOUT` (never an exception)."""
        msg_id = os.urandom(dht.MSG_ID_BYTES)
        data = dht.encode_request(msg_id, name, [self.ep.peer_id, *args])
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        if self.transport.is_closing():  # closed (or failed): nothing will answer
            future.set_result(TIMEOUT)
            return msg_id, future
        if len(self._outstanding) >= self.ep.config.max_outstanding_requests:
            self.ep.counters["outstanding_full"] += 1  # fails at once, like an unanswered one
            future.set_result(TIMEOUT)
            return msg_id, future
        timer = loop.call_later(self._wait_timeout, self._expire, msg_id)
        self._outstanding[msg_id] = (future, timer, contact)
        self.transport.sendto(data, (addr.host, addr.port))
        return msg_id, future

    def _expire(self, msg_id: bytes) -> None:
        future, _, contact = self._outstanding.pop(msg_id)
        self.ep.counters["rpc_timeouts"] += 1
        if contact is not None:  # only this ID at this address missed (see HardenedTable.holds)
            self.ep.note_silent(contact)
            self.router.note_miss(to_knode(contact))
        if not future.done():
            future.set_result(TIMEOUT)

    def check_alive(self, contact: Contact) -> None:
        self.ep.verify(contact, force=True)

    def cancel_all(self) -> None:
        for future, timer, _ in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result(TIMEOUT)
        self._outstanding.clear()


class DhtServer(Server):  # type: ignore[misc]
    """The package's server object, holding our protocol class and an endpoint-made protocol."""

    protocol_class = DhtProtocol

    def __init__(self, endpoint: DhtEndpoint) -> None:
        super().__init__(
            ksize=endpoint.config.k,
            alpha=endpoint.config.alpha,
            node_id=endpoint.peer_id,
            storage=endpoint.store,
        )
        self._endpoint = endpoint

    def _create_protocol(self) -> DhtProtocol:
        return self.protocol_class(self._endpoint)
