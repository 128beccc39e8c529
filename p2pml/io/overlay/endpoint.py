"""`DhtEndpoint`: one node's DHT socket, routing table, identity checks of contacts and counters.

A contact enters the routing table only after it answered a signed ``ping`` from its own address
with the key whose hash is its ID and, in a closed run, a key the run admits (allowlist and/or
run-key proof; refused ones are counted ``not_admitted`` and not asked again for a while). The
table then applies its per-address caps (`kad.HardenedTable`). Incoming datagrams pass per-source
and total rate limits (`core/limits.py`) before any decoding; excess is counted ``rate_limited``.
Every refusal is counted, and warned about at most once per host per interval.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import KeysView
from typing import Final

from p2pml.core.config import OverlayConfig
from p2pml.core.limits import RateLimiter, WarnGate
from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import ConfigError, Refused, WireFormatError
from p2pml.io.overlay.kad import (
    TIMEOUT,
    BoundedStore,
    DhtProtocol,
    DhtServer,
    HardenedTable,
    KNode,
    to_contact,
    to_knode,
)
from p2pml.protocol import dht
from p2pml.protocol.auth import Admission
from p2pml.protocol.dht import Contact, NodeRecord
from p2pml.protocol.identity import NodeKey

__all__ = ["DhtEndpoint"]

log = logging.getLogger(__name__)

WARN_INTERVAL_S: Final = 10.0
RECEIVE_BUFFER_BYTES: Final = 1 << 20
MAX_VERIFIED: Final = 1024
MAX_SILENT: Final = 1024
VERIFY_ATTEMPTS: Final = 2
"""Pings sent to check a contact's identity before it counts as silent."""
MAX_STRANGERS: Final = 1024
MAX_WARNED_HOSTS: Final = 4096
STRANGER_TTL_S: Final = 60.0  # a contact refused admission is not asked again for this long


class DhtEndpoint:
    """One node's DHT socket, routing table, identity checks and counters (no background loops).

    `KademliaOverlay` drives it; tests may use it directly.
    """

    def __init__(
        self,
        config: OverlayConfig,
        key: NodeKey,
        *,
        role: str = "peer",
        admission: Admission | None = None,
    ) -> None:
        self.config = config.validate()
        self.key = key
        self.admission = admission if admission is not None else Admission()
        self.peer_id = key.peer_id
        self.knode = KNode(key.peer_id)
        self.role = role
        self.http: Address | None = None
        self.step = Step(0)
        self.run = ""
        self.done = False
        self.store = BoundedStore(config.max_stored_values, config.max_values_per_host)
        self.counters: Counter[str] = Counter()
        self._server = DhtServer(self)
        self.protocol: DhtProtocol | None = None
        self.addr: Address | None = None
        self._verified: OrderedDict[Address, PeerId] = OrderedDict()
        self._verifying: dict[Address, asyncio.Future[None]] = {}
        self._silent: OrderedDict[Contact, float] = OrderedDict()
        self._strangers: OrderedDict[Contact, float] = OrderedDict()
        self._warned = WarnGate[str](WARN_INTERVAL_S, max_keys=MAX_WARNED_HOSTS)
        self._per_host = RateLimiter[str](config.peer_limit, max_keys=config.max_limited_peers)
        self._total = RateLimiter[None](config.total_limit, max_keys=1)

    async def open(self) -> Address:
        """Bind the UDP socket; returns the bound address (port 0 is read back)."""
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                self._server._create_protocol, local_addr=(listen.host, listen.port)
            )
        except OSError as err:
            raise ConfigError(
                "listen", str(listen), f"an address this host can bind ({err.strerror})"
            ) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # bursts of replies overflow the default buffer (issue 4)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._server.transport, self._server.protocol = transport, protocol
        self.protocol = protocol
        host, port = transport.get_extra_info("sockname")[:2]
        self.addr = Address(host, port)
        return self.addr

    async def close(self) -> None:
        """Fail every pending request, close the socket and wait until the port is released."""
        if self.protocol is not None:
            self.protocol.cancel_all()
        self._server.stop()
        if self.protocol is not None:
            await self.protocol.closed

    @property
    def table(self) -> HardenedTable:
        assert self.protocol is not None, "open() first"
        return self.protocol.router

    def contacts(self) -> list[Contact]:
        return [to_contact(n) for n in self.table.nodes()]

    def closest(self, target: bytes, k: int) -> list[Contact]:
        return [to_contact(n) for n in self.table.find_neighbors(KNode(target), k)]

    def record(self) -> NodeRecord:
        return NodeRecord(
            self.key.public_key,
            self.role,
            self.http,
            self.step,
            time.time(),
            self.run,
            self.done,
        )

    def reject(self, reason: str, host: str, err: object) -> None:
        """Count a rejected input and warn about it at most once per host per interval."""
        self.counters[reason] += 1
        if self._warned.open(host, now=time.monotonic()) is not None:
            log.warning("dropped input from %s (%s): %s", host, reason, err)

    def admit_datagram(self, n_bytes: int, host: str) -> bool:
        """Whether a datagram of `n_bytes` from `host` passes the rate limits (else counted).

        This node's own IP (its neighbours on the same machine) has no per-host limit, only
        the total one.
        """
        now = time.monotonic()
        why = None
        if host != self.config.listen.host:  # an IPv6 /64 is one host (see dht.ip_group)
            why = self._per_host.admit(dht.ip_group(host), n_bytes, now=now)
        if why is None:
            why = self._total.admit(None, n_bytes, now=now)
            if why is not None:
                why = f"all sources together over their {why} limit"
        else:
            why = f"over its {why} limit"
        if why is None:
            return True
        self.reject("rate_limited", host, why)
        return False

    # -- identity of contacts --------------------------------------------------------------------
    def is_verified(self, contact: Contact) -> bool:
        return self._verified.get(contact.addr) == contact.peer_id

    def note_silent(self, contact: Contact) -> None:
        """`contact` missed a reply: lookups skip it for a refresh interval, unless it speaks."""
        self._silent[contact] = time.monotonic()
        self._silent.move_to_end(contact)
        while len(self._silent) > MAX_SILENT:
            self._silent.popitem(last=False)

    def silent(self) -> KeysView[Contact]:
        """Contacts (ID at address) that missed a reply within the last refresh interval.

        A live view, not a copy: it is read on every find_node and lookup.
        """
        horizon = time.monotonic() - self.config.refresh_interval_s
        while self._silent and next(iter(self._silent.values())) < horizon:
            self._silent.popitem(last=False)
        return self._silent.keys()

    def heard_from(self, contact: Contact) -> None:
        """A contact answered us or asked us something: refresh it, or check who it is."""
        if contact.addr.host in ("0.0.0.0", "::"):
            return
        self._silent.pop(contact, None)
        if self.is_verified(contact):
            self._verified.move_to_end(contact.addr)
            self._add(contact)
        elif not self.is_stranger(contact):
            self.verify(contact)

    def is_stranger(self, contact: Contact) -> bool:
        """`contact` was refused admission to the run within the last `STRANGER_TTL_S`."""
        refused_at = self._strangers.get(contact)
        if refused_at is None:
            return False
        if time.monotonic() - refused_at < STRANGER_TTL_S:
            return True
        del self._strangers[contact]
        return False

    def refuse(self, contact: Contact, err: Refused) -> None:
        """Count a refusal of `contact`'s signed reply and drop it (a stranger for a while)."""
        self.reject(err.code, contact.addr.host, err)
        self.forget(contact)
        if err.code == "not_admitted":
            self._strangers[contact] = time.monotonic()
            self._strangers.move_to_end(contact)
            while len(self._strangers) > MAX_STRANGERS:
                self._strangers.popitem(last=False)

    def _add(self, contact: Contact) -> bool:
        """Put a verified contact in the table; False (counted) when its caps refuse it."""
        why = self.table.add_contact(to_knode(contact))
        if why is None:
            return True
        self.reject(why, contact.addr.host, f"{contact.peer_id.hex()[:8]} at {contact.addr}")
        holder = self.table.holder(contact.addr.host, contact.addr.port)
        if why == "endpoint_taken" and holder is not None:  # honest first: is the holder alive?
            self.verify(Contact(PeerId(holder), contact.addr), force=True)
        return False

    def verify(self, contact: Contact, *, force: bool = False) -> asyncio.Future[None] | None:
        """Ping `contact`; add it to the table only if its signed reply proves its ID.

        Returns the check in flight for that address (a new one or the one already running),
        which ends within `VERIFY_ATTEMPTS` RPC timeouts (an unanswered ping is sent again once:
        on a lossy link one lost datagram must not keep a live node out of the table until the
        next refresh), or None when there is nothing to check or no room.
        """
        pending = self._verifying.get(contact.addr)
        if pending is not None or (self.is_verified(contact) and not force):
            return pending
        if len(self._verifying) >= self.config.max_pending_verifications and not force:
            self.counters["verify_dropped"] += 1
            return None
        assert self.protocol is not None, "open() first"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._verifying[contact.addr] = done
        self._ping(contact, VERIFY_ATTEMPTS - 1)
        return done

    def _ping(self, contact: Contact, retries: int) -> None:
        assert self.protocol is not None, "open() first"
        msg_id, future = self.protocol.request(contact.addr, "ping", [], contact)
        future.add_done_callback(
            lambda f: self._verified_reply(contact, msg_id, f.result(), retries)
        )

    async def prove(self, contact: Contact) -> bool:
        """Whether `contact` is this ID at this address, checking it (once) if not known yet."""
        if self.is_stranger(contact):
            return False
        pending = self.verify(contact, force=not self.is_verified(contact))
        if pending is not None:  # shielded: other lookups may wait on the same check
            await asyncio.shield(pending)
        return self.is_verified(contact)

    async def verifications_done(self) -> None:
        """Wait until no identity check is in flight (each ends within the RPC timeout)."""
        while self._verifying:
            await asyncio.wait(list(self._verifying.values()))

    def _verified_reply(
        self, contact: Contact, msg_id: bytes, body: object, retries: int = 0
    ) -> None:
        if body is TIMEOUT and retries > 0 and self.protocol is not None:
            self.counters["verify_retries"] += 1
            self._ping(contact, retries - 1)
            return
        done = self._verifying.pop(contact.addr)
        try:
            if body is TIMEOUT:  # the request's own timer already counted the miss
                if self._verified.get(contact.addr) == contact.peer_id:
                    del self._verified[contact.addr]  # not confirmed there any more
                return
            try:
                dht.open_signed(body, "ping", msg_id, contact.peer_id, self.admission)
            except Refused as err:
                self.refuse(contact, err)
                return
            except WireFormatError as err:
                self.reject("forged_id", contact.addr.host, err)
                self.forget(contact)
                return
            self.mark_verified(contact)
        finally:
            if not done.done():
                done.set_result(None)

    def mark_verified(self, contact: Contact) -> bool:
        """Record that `contact` proved its ID (and admission) at its address; add it to the table.

        Honest first: while another ID holds that address, the newcomer is refused (counted
        ``endpoint_taken``) and the holder is checked; it gets in once the holder fails.
        Returns whether the contact is now held.
        """
        held = self._verified.get(contact.addr)
        if held is not None and held != contact.peer_id:
            self.reject(
                "endpoint_taken",
                contact.addr.host,
                f"{contact.peer_id.hex()[:8]} claims {contact.addr}, held by {held.hex()[:8]}",
            )
            self.verify(Contact(held, contact.addr), force=True)
            return False
        self._verified[contact.addr] = contact.peer_id
        self._verified.move_to_end(contact.addr)
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)
        if self.protocol is not None:
            return self._add(contact)
        return True

    def forget(self, contact: Contact) -> None:
        """Drop `contact` (this ID at this address only) from the table and identity cache."""
        if self._verified.get(contact.addr) == contact.peer_id:
            del self._verified[contact.addr]
        self.table.remove_contact(to_knode(contact))
