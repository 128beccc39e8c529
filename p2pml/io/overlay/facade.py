"""`KademliaOverlay`: a node's membership in the DHT: join, lookups, signed RPCs, N^, sampling."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pml.core.config import OverlayConfig
from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import (
    ConfigError,
    OverlayError,
    P2PMLError,
    PeerTimeout,
    ProtocolError,
    Refused,
    WireFormatError,
)
from p2pml.io.membership import EstimateView, Membership
from p2pml.io.overlay.endpoint import DhtEndpoint
from p2pml.io.overlay.kad import TIMEOUT, DhtProtocol
from p2pml.protocol import dht
from p2pml.protocol.auth import Admission
from p2pml.protocol.dht import Contact, NodeRecord, StepReport
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.lookup import LookupMachine

__all__ = ["KademliaOverlay", "LookupResult", "load_contacts", "write_contacts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What one lookup found.

    Attributes:
        contacts: the k closest contacts that answered, closest first, each with its ID proven
            by a signed ping from its address (never one that failed or could not prove it, nor
            one the run does not admit), at most `max_contacts_per_ip` per IP address.
        n_queries: ``find_node`` RPCs sent; n_failures: of those, unanswered or malformed.
        duration_s: wall time of the lookup.
        complete: the lookup ran to its end (it did not run out of its time budget).
    """

    target: bytes
    contacts: list[Contact]
    n_queries: int
    n_failures: int
    duration_s: float
    complete: bool = True


class KademliaOverlay:
    """A node's membership in the DHT: join, lookups, signed RPCs, N^ and a uniform peer pool.

    Use as ``async with KademliaOverlay(config, key) as overlay: await overlay.bootstrap(seeds)``.
    The background refresh (estimate, pool, idle buckets) runs every `refresh_interval_s` and is
    cancelled and awaited on exit; the socket is closed and the port released.

    With a closed `admission`, only contacts whose signed replies the run admits enter the table,
    lookups, samples and N^, and a lookup asks a contact for its neighbours only once it has
    proven its ID and admission (find_node replies are not signed, so a stranger's list of
    neighbours is never followed).
    """

    def __init__(
        self,
        config: OverlayConfig,
        key: NodeKey,
        *,
        role: str = "peer",
        rng: random.Random | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config.validate()
        self.admission = admission if admission is not None else Admission()
        self.endpoint = DhtEndpoint(config, key, role=role, admission=self.admission)
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self.membership = Membership(self)
        self.lookup_durations: deque[float] = deque(maxlen=1024)
        self._tg: asyncio.TaskGroup | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._joined = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> KademliaOverlay:
        await self.endpoint.open()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._refresher = self._tg.create_task(self._refresh_loop())
        log.info("overlay %s listening on %s", self.short_id, self.contact_string)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the refresh loop and close the socket; calling it again does nothing."""
        tg, self._tg = self._tg, None
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        try:
            if tg is not None:
                await tg.__aexit__(None, None, None)
        finally:
            await self.endpoint.close()

    async def _refresh_loop(self) -> None:
        first = True
        while True:
            if first and self.config.refresh_after_join:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.refresh_interval_s):
                        await self._joined.wait()
            else:
                await asyncio.sleep(self.config.refresh_interval_s)
            first = False
            try:
                await self.refresh()
            except P2PMLError as err:
                log.warning("refresh incomplete: %s", err)
            except Exception:  # a bug must not cancel the task that holds this overlay
                self.counters["internal_error"] += 1
                log.exception("refresh failed; retrying at the next interval")

    @property
    def peer_id(self) -> PeerId:
        return self.endpoint.peer_id

    @property
    def short_id(self) -> str:
        return self.peer_id.hex()[:8]

    @property
    def addr(self) -> Address:
        if self.endpoint.addr is None:
            raise OverlayError("the overlay is not listening yet: use `async with`")
        return self.endpoint.addr

    @property
    def contact_string(self) -> str:
        """The address others should pass to ``--bootstrap``: the advertised one if set."""
        return str(self.config.advertise or self.addr)

    @property
    def counters(self) -> Counter[str]:
        return self.endpoint.counters

    def set_step(self, step: Step, *, done: bool = False) -> None:
        """Publish the current step (and whether this node has finished) to `step`/`info`."""
        self.endpoint.step = step
        self.endpoint.done = done

    def set_run(self, tag: str) -> None:
        """Publish the run tag (run ID and manifest hash) in this node's `info` record."""
        if len(tag) > dht.MAX_RUN_TAG_CHARS:
            raise ConfigError("run tag", tag, f"at most {dht.MAX_RUN_TAG_CHARS} characters")
        self.endpoint.run = tag

    def set_http(self, addr: Address | None) -> None:
        self.endpoint.http = addr

    def forget(self, contact: Contact) -> None:
        """Drop a contact that stopped answering from the routing table and the identity cache."""
        self.endpoint.forget(contact)
        self.endpoint.note_silent(contact)

    def table_is_complete(self) -> bool:
        """True while no bucket of the routing table ever overflowed."""
        return self.endpoint.table.is_complete()

    def contacts(self) -> list[Contact]:
        """The verified contacts in the routing table, sorted by ID."""
        return sorted(self.endpoint.contacts(), key=lambda c: c.peer_id)

    # -- single RPCs -----------------------------------------------------------------------------
    async def _call(
        self, addr: Address, name: str, args: list[object], contact: Contact | None
    ) -> tuple[bytes, object]:
        protocol = self.endpoint.protocol
        if protocol is None:
            raise OverlayError("the overlay is not listening yet: use `async with`")
        msg_id, future = protocol.request(addr, name, args, contact)
        body = await future
        if body is TIMEOUT:
            raise PeerTimeout(f"{name} to {addr}: no reply within {self.config.rpc_timeout_s} s")
        return msg_id, body

    async def _signed(self, contact: Contact, name: str) -> object:
        msg_id, body = await self._call(contact.addr, name, [], contact)
        try:
            _, payload = dht.open_signed(body, name, msg_id, contact.peer_id, self.admission)
        except Refused as err:
            self.endpoint.refuse(contact, err)
            raise
        except WireFormatError as err:
            self.endpoint.reject("bad_signature", contact.addr.host, err)
            self.endpoint.forget(contact)
            raise
        self.endpoint.mark_verified(contact)
        return payload

    async def ping(self, addr: Address, expected: PeerId | None = None) -> Contact:
        """Ping an address; returns its verified contact (its ID proven by a signature).

        Raises:
            PeerTimeout: no reply. WireFormatError: a bad or forged reply. Refused: a key the
            run does not admit (``not_admitted``).
        """
        msg_id, body = await self._call(addr, "ping", [], None)
        try:
            signer, _ = dht.open_signed(body, "ping", msg_id, expected, self.admission)
        except Refused as err:
            self.endpoint.reject(err.code, addr.host, err)
            raise
        contact = Contact(signer, addr)
        if signer != self.peer_id:
            self.endpoint.mark_verified(contact)
        return contact

    async def info(self, contact: Contact) -> NodeRecord:
        """The peer's signed record (key, role, HTTP endpoint, step, timestamp).

        Raises:
            PeerTimeout, WireFormatError, Refused: ``not_admitted``, or ``clock_skew`` for a
            record stamped more than `max_skew_s` from this node's clock.
        """
        record = dht.decode_record(await self._signed(contact, "info"))
        try:
            dht.check_record_time(record, now_unix_s=time.time(), max_skew_s=self.config.max_skew_s)
        except Refused as err:
            self.endpoint.reject(err.code, contact.addr.host, err)
            raise
        return record

    async def step_of(self, contact: Contact) -> StepReport:
        """The peer's signed current step, and whether it has finished."""
        return dht.decode_step(await self._signed(contact, "step"))

    # -- lookups ---------------------------------------------------------------------------------
    async def lookup(
        self,
        target: bytes,
        *,
        k: int | None = None,
        radius: int | None = None,
        prove: bool = True,
    ) -> LookupResult:
        """Find the k closest live nodes to `target`; never waits on a dead contact's round.

        With `radius`, enumerate the zone within that XOR distance instead (see `LookupMachine`).
        With `prove` (the default), every contact returned has proven its ID; a lookup run only
        to fill the routing table skips that (the table admits proven contacts anyway). A lookup
        that runs out of its budget (`lookup_timeout_s`) returns what it has.
        """
        k = k or self.config.k
        protocol = self.endpoint.protocol
        if protocol is None:
            raise OverlayError("the overlay is not listening yet: use `async with`")
        loop = asyncio.get_running_loop()
        started = loop.time()
        silent = self.endpoint.silent()
        machine = LookupMachine(
            int.from_bytes(target, "big"),
            self.peer_id,
            [c for c in self.endpoint.closest(target, k + len(silent)) if c not in silent],
            k=k,
            alpha=self.config.alpha,
            stall_s=self.config.stall_s,
            radius=radius,
            skip=silent,
        )
        complete = True
        try:
            async with asyncio.timeout(self.config.lookup_timeout_s):
                await self._drive(machine, target, protocol)
                contacts = await self._proven(machine.result()) if prove else machine.result()
        except TimeoutError:
            self.counters["lookup_budget_exceeded"] += 1
            complete = False
            contacts = self._capped([c for c in machine.result() if self.endpoint.is_verified(c)])
        duration = loop.time() - started
        self.lookup_durations.append(duration)
        return LookupResult(
            target, contacts, machine.n_queries, machine.n_failures, duration, complete
        )

    async def _proven(self, contacts: list[Contact]) -> list[Contact]:
        """The contacts whose ID is proven at their address, joining checks already in flight.

        find_node replies are not signed (that would cost a signature per hop), so a reply can
        name any ID at any address; only proven contacts may feed N^, samples or stores.
        """
        proven = await asyncio.gather(*(self.endpoint.prove(c) for c in contacts))
        return self._capped([c for c, ok in zip(contacts, proven, strict=True) if ok])

    def _capped(self, contacts: list[Contact]) -> list[Contact]:
        """At most `max_contacts_per_ip` per IP address (this node's own exempt), in order."""
        cap, own = self.config.max_contacts_per_ip, self.config.listen.host
        return dht.limit_per_ip(contacts, cap, exempt_host=own)

    async def _drive(self, machine: LookupMachine, target: bytes, protocol: DhtProtocol) -> None:
        loop = asyncio.get_running_loop()
        waiting: dict[asyncio.Future[object], Contact] = {}
        while True:
            for c in machine.next_queries(now=loop.time()):
                waiting[self._query(c, target, protocol)] = c
            if machine.is_done or not waiting:
                for future in waiting:
                    future.cancel()
                return
            deadline = machine.next_deadline(now=loop.time())
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:
                for future in waiting:
                    future.cancel()
                raise
            for future in done:
                c = waiting.pop(future)
                self._feed(machine, c, future.result(), now=loop.time())

    def _query(self, c: Contact, target: bytes, protocol: DhtProtocol) -> asyncio.Future[object]:
        """Send `c` a find_node; in a closed run only once `c` proved its ID and admission."""
        if self.admission.is_open or self.endpoint.is_verified(c):
            return protocol.request(c.addr, "find_node", [target], c)[1]
        return asyncio.ensure_future(self._query_proven(c, target, protocol))

    async def _query_proven(self, c: Contact, target: bytes, protocol: DhtProtocol) -> object:
        if not await self.endpoint.prove(c):
            return TIMEOUT  # a failure for the lookup, like an unanswered query
        return await protocol.request(c.addr, "find_node", [target], c)[1]

    def _feed(self, machine: LookupMachine, c: Contact, body: object, *, now: float) -> None:
        if body is TIMEOUT:
            machine.on_failure(c.peer_id, now=now)
            return
        try:
            found = dht.decode_contacts(body, limit=dht.MAX_CONTACTS)
        except WireFormatError as err:
            self.endpoint.reject("bad_reply", c.addr.host, err)
            machine.on_failure(c.peer_id, now=now)
            return
        family = ":" in self.addr.host
        machine.on_reply(c.peer_id, [f for f in found if (":" in f.addr.host) == family], now=now)

    # -- joining ---------------------------------------------------------------------------------
    async def bootstrap(self, seeds: Sequence[Address]) -> list[Contact]:
        """Join through `seeds`: reach at least one, look up self, fill every far bucket.

        Retries with exponential backoff, `bootstrap_attempts` times in all.

        Raises:
            OverlayError: when no seed answered, naming them and how long it tried.
        """
        if not seeds:
            raise OverlayError("no bootstrap nodes given: pass --bootstrap host:port")
        addrs = [await self._resolve(a) for a in seeds]
        loop = asyncio.get_running_loop()
        started, delay = loop.time(), self.config.bootstrap_backoff_s
        for attempt in range(1, self.config.bootstrap_attempts + 1):
            answers = await asyncio.gather(*(self.try_ping(a) for a in addrs))
            reached = [c for c in answers if c is not None and c.peer_id != self.peer_id]
            if reached:
                await self.lookup(self.peer_id, prove=False)
                await self.refresh_buckets(every=True)
                # joined = the table holds what the join found: wait for the identity checks
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2 * self.config.rpc_timeout_s):
                        await self.endpoint.verifications_done()
                self._joined.set()
                log.info(
                    "%s joined through %d seed(s); %d contacts",
                    self.short_id,
                    len(reached),
                    len(self.contacts()),
                )
                return reached
            if attempt < self.config.bootstrap_attempts:
                log.warning("no seed answered (attempt %d); retrying in %.1f s", attempt, delay)
                await asyncio.sleep(delay)
                delay *= 2
        shown = ", ".join(str(s) for s in seeds)
        raise OverlayError(
            f"could not reach any bootstrap node ({shown}) after "
            f"{self.config.bootstrap_attempts} attempts over {loop.time() - started:.1f} s; "
            "check --bootstrap (or P2PML_BOOTSTRAP) and that the seeds are running"
        )

    async def try_ping(self, addr: Address, expected: PeerId | None = None) -> Contact | None:
        """`ping`, returning None instead of raising when there is no valid reply."""
        try:
            return await self.ping(addr, expected)
        except (PeerTimeout, ProtocolError) as err:
            log.debug("ping %s: %s", addr, err)
            return None

    async def _resolve(self, addr: Address) -> Address:
        try:
            ipaddress.ip_address(addr.host)
            return addr
        except ValueError:
            pass
        family = socket.AF_INET6 if ":" in self.addr.host else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                addr.host, addr.port, family=family, type=socket.SOCK_DGRAM
            )
        except OSError as err:
            raise OverlayError(f"bootstrap node {addr}: cannot resolve ({err})") from None
        return Address(str(infos[0][4][0]), addr.port)

    async def refresh_buckets(self, *, every: bool = False) -> None:
        """Look up a random ID in each bucket (all of them, or the idle ones)."""
        idle_s = self.config.refresh_interval_s
        now = time.monotonic()
        targets = [
            self.rng.randint(*b.range).to_bytes(20, "big")
            for b in self.endpoint.table.buckets
            if not b.has_in_range(self.endpoint.knode) and (every or now - b.last_updated > idle_s)
        ]
        await asyncio.gather(*(self.lookup(t, prove=False) for t in targets))

    async def refresh(self) -> None:
        """One refresh round: the estimate, the sample pool and idle buckets."""
        await self.membership.refresh()
        await self.refresh_buckets()

    # -- sampling and estimate (see membership.py) -----------------------------------------------
    @property
    def estimate(self) -> EstimateView | None:
        return self.membership.estimate

    def sample_peers(self, k: int, rng: random.Random | None = None) -> list[Contact]:
        """k distinct live peers, uniform over the population, never self; no lookup."""
        return self.membership.sample(k, rng or self.rng)

    async def draw_uniform(self) -> Contact:
        """One exactly uniform live peer (zone + rejection): costs a few lookups."""
        return await self.membership.draw_uniform()

    # -- key/value store and persistence ---------------------------------------------------------
    async def put(self, key: bytes, value: bytes) -> int:
        """Store `value` under the 20-byte `key` at its k closest nodes; returns how many did."""
        result = await self.lookup(key)
        calls = [self._call(c.addr, "store", [key, value], c) for c in result.contacts]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return sum(1 for a in answers if not isinstance(a, BaseException) and a[1] is True)

    async def get(self, key: bytes) -> bytes | None:
        """The value stored under `key` at one of its k closest nodes, or None."""
        local = self.endpoint.store.get(key, None)
        if isinstance(local, bytes):
            return local
        for c in (await self.lookup(key)).contacts:
            try:
                _, body = await self._call(c.addr, "find_value", [key], c)
            except PeerTimeout:
                continue
            if isinstance(body, dict) and isinstance(body.get("value"), bytes):
                return bytes(body["value"])
        return None

    def contacts_document(self) -> str:
        """The routing table's contacts as a JSON document (read on the loop thread)."""
        rows = [{"id": c.peer_id.hex(), "addr": str(c.addr)} for c in self.contacts()]
        return json.dumps({"version": 1, "contacts": rows}, indent=1)

    def save_contacts(self, path: Path) -> None:
        """Write the contacts as JSON (never pickle) atomically; see `write_contacts`."""
        write_contacts(path, self.contacts_document())


def write_contacts(path: Path, document: str) -> None:
    """Write a `contacts_document` atomically (safe to run in a worker thread)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(document)
    os.replace(tmp, path)


def load_contacts(path: Path) -> list[Address]:
    """Addresses from a `save_contacts` file, to bootstrap from after a restart.

    Raises:
        ConfigError: naming the file, if it is not such a file.
    """
    try:
        data = json.loads(path.read_text())
        return [Address.parse(row["addr"]) for row in data["contacts"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("--contacts", str(path), f"a contacts JSON file ({err})") from None
