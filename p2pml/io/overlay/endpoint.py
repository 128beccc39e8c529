"""`DhtEndpoint`: one node's DHT socket, routing table, identity checks of contacts and counters."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import KeysView
from typing import Final

from p2pml.core.config import OverlayConfig
from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import ConfigError, WireFormatError
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
from p2pml.protocol.dht import Contact, NodeRecord
from p2pml.protocol.identity import NodeKey

__all__ = ["DhtEndpoint"]

log = logging.getLogger(__name__)

WARN_INTERVAL_S: Final = 10.0
RECEIVE_BUFFER_BYTES: Final = 1 << 20
MAX_VERIFIED: Final = 1024
MAX_SILENT: Final = 1024


class DhtEndpoint:
    """One node's DHT socket, routing table, identity checks and counters (no background loops).

    `KademliaOverlay` drives it; tests may use it directly.
    """

    def __init__(self, config: OverlayConfig, key: NodeKey, *, role: str = "peer") -> None:
        self.config = config.validate()
        self.key = key
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
        self._last_warn: dict[str, float] = {}

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
        now = time.monotonic()
        if now - self._last_warn.get(host, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            if len(self._last_warn) > 4096:
                self._last_warn.clear()
            self._last_warn[host] = now
            log.warning("dropped input from %s (%s): %s", host, reason, err)

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
            self.table.add_contact(to_knode(contact))
        else:
            self.verify(contact)

    def verify(self, contact: Contact, *, force: bool = False) -> asyncio.Future[None] | None:
        """Ping `contact`; add it to the table only if its signed reply proves its ID.

        Returns the check in flight for that address (a new one or the one already running),
        which ends within the RPC timeout, or None when there is nothing to check or no room.
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
        msg_id, future = self.protocol.request(contact.addr, "ping", [], contact)
        future.add_done_callback(lambda f: self._verified_reply(contact, msg_id, f.result()))
        return done

    async def prove(self, contact: Contact) -> bool:
        """Whether `contact` is this ID at this address, checking it (once) if not known yet."""
        pending = self.verify(contact, force=not self.is_verified(contact))
        if pending is not None:
            await pending
        return self.is_verified(contact)

    async def verifications_done(self) -> None:
        """Wait until no identity check is in flight (each ends within the RPC timeout)."""
        while self._verifying:
            await asyncio.wait(list(self._verifying.values()))

    def _verified_reply(self, contact: Contact, msg_id: bytes, body: object) -> None:
        done = self._verifying.pop(contact.addr)
        try:
            if body is TIMEOUT:  # the request's own timer already counted the miss
                return
            try:
                dht.open_signed(body, "ping", msg_id, contact.peer_id)
            except WireFormatError as err:
                self.reject("forged_id", contact.addr.host, err)
                self.table.remove_contact(to_knode(contact))
                return
            self.mark_verified(contact)
        finally:
            done.set_result(None)

    def mark_verified(self, contact: Contact) -> None:
        self._verified[contact.addr] = contact.peer_id
        self._verified.move_to_end(contact.addr)
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)
        if self.protocol is not None:
            self.table.add_contact(to_knode(contact))

    def forget(self, contact: Contact) -> None:
        """Drop `contact` (this ID at this address only) from the table and identity cache."""
        if self._verified.get(contact.addr) == contact.peer_id:
            del self._verified[contact.addr]
        self.table.remove_contact(to_knode(contact))
