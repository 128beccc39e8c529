"""Fault injection into a node's real transports: its DHT datagram socket and its HTTP client.

A `FaultInjector` applies a `FaultPlan` (`p2pml/core/faults.py`) to a running node, in-process and
without root, for tests and chaos runs:

- **Datagrams.** The overlay's datagram transport is wrapped: each `sendto` is dropped, sent at
  once, or sent later (``loop.call_later``: delay, jitter, reordering), once or twice. Every pending
  send is an owned timer handle, cancelled when the injector closes. Faults apply on the sending
  side only, so a datagram is never judged twice; since every node sends through its own injector,
  a partition cuts both directions.
- **Requests.** The HTTP client is wrapped: a dropped or partitioned request raises
  `PeerUnreachable`, as an unreachable peer does; a delayed one waits the drawn one-way delay
  before the request and again after the reply, under the caller's timeout; a duplicated delta
  push or control message is sent a second time after the first (the caller sees the first's
  reply; the copy's errors are counted, not raised).
- **Reloading.** Given the plan's file, the injector checks its mtime once a second and swaps in
  the new plan (a chaos script starts and heals partitions this way). A bad file is reported with
  one WARNING and the old plan stays.

`counters` counts what was injected: ``dropped``, ``partitioned``, ``delayed``, ``duplicated``,
``reordered``, each also per plane (``udp_dropped``, ``http_dropped``, ...), and ``udp_sent`` /
``http_sent`` for the messages judged. The decisions come from one `random.Random` seeded from the
plan's seed (and a salt), so the same seed gives the same sequence of decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from p2pml.core.faults import FaultPlan, FaultVerdict, decide
from p2pml.core.run import NodeConfig
from p2pml.core.types import Address
from p2pml.errors import ConfigError, P2PMLError, PeerUnreachable
from p2pml.io.http import ControlMessage, DataPlaneClient
from p2pml.io.overlay import KademliaOverlay
from p2pml.protocol.messages import (
    Ack,
    DeltaPush,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    ServerStatus,
)

__all__ = [
    "RELOAD_INTERVAL_S",
    "FaultInjector",
    "FaultyClient",
    "FaultyDatagramTransport",
    "injector_for",
    "read_plan",
]

log = logging.getLogger(__name__)

RELOAD_INTERVAL_S: Final = 1.0
T = TypeVar("T")


def read_plan(path: str | os.PathLike[str]) -> FaultPlan:
    """The plan in a TOML file (JSON when its name ends in ``.json``). Synchronous: call it at
    startup, or through ``asyncio.to_thread``.

    Raises:
        ConfigError: about field ``faults``, naming the file, when it is missing, unreadable or
            malformed; or naming the bad key of the plan.
    """
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("faults", str(target), f"a readable file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError("faults", str(target), f"UTF-8 text (byte {err.start})") from None
    try:
        data = json.loads(text) if target.suffix == ".json" else tomllib.loads(text)
    except ValueError as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        reason = " ".join(str(err).split())
        kind = "JSON" if target.suffix == ".json" else "TOML"
        raise ConfigError("faults", str(target), f"a valid {kind} file ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError("faults", str(target), "a table of fault settings")
    try:
        return FaultPlan.from_mapping(data)
    except ConfigError as err:
        raise ConfigError(f"{err.field} in {target}", err.value, err.allowed) from None


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells a rewritten file: its inode (an atomic rename makes a new one), mtime, size."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class FaultInjector:
    """Applies a `FaultPlan` to a node's transports; ``async with`` it while the node runs.

    Args:
        plan: the plan to apply (validated here).
        path: the file the plan came from; when given, it is re-read whenever it changes.
        salt: mixed into the seed, so that nodes reading one file draw different decisions.
        reload_interval_s: how often the file's mtime is checked.
    """

    def __init__(
        self,
        plan: FaultPlan,
        *,
        path: str | os.PathLike[str] | None = None,
        salt: str = "",
        reload_interval_s: float = RELOAD_INTERVAL_S,
    ) -> None:
        self.plan = plan.validate()
        self.path = Path(path) if path is not None else None
        self.salt = salt
        self.reload_interval_s = reload_interval_s
        self.counters: Counter[str] = Counter()
        self.own: tuple[Address, ...] = ()
        self.n_reloads = 0
        self._rng = self._seeded(plan.seed)
        self._stamp: tuple[int, int, int] | None = None
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._n_timers = 0
        self._tg: asyncio.TaskGroup | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._open = False
        if self.path is not None:
            with contextlib.suppress(OSError):
                self._stamp = _stamp(self.path)

    def _seeded(self, seed: int) -> random.Random:
        return random.Random(f"{seed}/{self.salt}")

    # -- decisions -------------------------------------------------------------------------------
    def decide(self, plane: str, dst: Address) -> FaultVerdict:
        """The verdict on one message of `plane` (``udp`` or ``http``) to `dst`, counted."""
        verdict = decide(
            self.plan,
            self._rng,
            src=self.own,
            dst=dst,
            now_unix_s=time.time(),
            request=plane == "http",
        )
        self.counters[f"{plane}_sent"] += 1
        for what, happened in (
            ("partitioned", verdict.partitioned),
            ("dropped", verdict.drop and not verdict.partitioned),
            ("delayed", verdict.delayed),
            ("reordered", verdict.reordered),
        ):
            if happened:
                self.count(plane, what)
        return verdict

    def count(self, plane: str, what: str) -> None:
        self.counters[what] += 1
        self.counters[f"{plane}_{what}"] += 1

    def replace(self, plan: FaultPlan) -> None:
        """Apply `plan` from now on (a new seed restarts the decision stream)."""
        if plan.seed != self.plan.seed:
            self._rng = self._seeded(plan.seed)
        self.plan = plan.validate()
        self.n_reloads += 1
        log.warning("fault plan changed: injecting %s", plan.describe())

    # -- installing ------------------------------------------------------------------------------
    def attach(
        self, client: DataPlaneClient, overlay: KademliaOverlay | None, *own: Address
    ) -> FaultyClient:
        """Wrap a node's open overlay socket and its client; `own` and the overlay's address are
        the node's addresses as partitions see them. Returns the client to use from now on."""
        if overlay is not None:
            self.wrap_overlay(overlay)
        self.own = (*self.own, *own)
        return FaultyClient(client, self)

    def wrap_overlay(self, overlay: KademliaOverlay) -> None:
        """Route the open overlay's outgoing datagrams through this injector."""
        protocol = overlay.endpoint.protocol
        if protocol is None:
            raise RuntimeError("open the overlay before wrapping it")
        if not isinstance(protocol.transport, FaultyDatagramTransport):
            protocol.transport = FaultyDatagramTransport(protocol.transport, self)
        self.own = (*self.own, overlay.addr)

    def call_later(self, delay_s: float, callback: Callable[..., None], *args: object) -> None:
        """Run `callback(*args)` after `delay_s`; the handle is owned and cancelled on close."""
        key = self._n_timers
        self._n_timers += 1
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay_s, self._fire, key, callback, args)

    def _fire(self, key: int, callback: Callable[..., None], args: tuple[object, ...]) -> None:
        del self._timers[key]
        callback(*args)

    @property
    def n_pending(self) -> int:
        """Delayed sends not yet made."""
        return len(self._timers)

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._open = True
        if self.path is not None:
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
            self._watcher = self._tg.create_task(self._watch(self.path))
        source = f" (from {self.path}, re-read when it changes)" if self.path else ""
        log.warning("injecting network faults%s: %s", source, self.plan.describe())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the delayed sends and the file watcher; later traffic passes unharmed."""
        self._open = False
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tg, self._tg = self._tg, None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if tg is not None:
            await tg.__aexit__(None, None, None)

    @property
    def is_open(self) -> bool:
        return self._open

    async def _watch(self, path: Path) -> None:
        bad: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                stamp = await asyncio.to_thread(_stamp, path)
                if stamp == self._stamp or stamp == bad:
                    continue
                plan = await asyncio.to_thread(read_plan, path)
            except (OSError, ConfigError) as err:
                if stamp != bad:  # one warning per version of the file
                    log.warning("fault plan not reloaded; keeping the current one: %s", err)
                bad = stamp
                continue
            self._stamp = stamp
            self.replace(plan)


def injector_for(config: NodeConfig) -> FaultInjector | None:
    """The injector of a node's config (`NodeConfig.faults`), or None when it has no plan."""
    if config.faults is None:
        return None
    return FaultInjector(config.faults, path=config.faults_file, salt=str(config.overlay.listen))


class FaultyDatagramTransport(asyncio.DatagramTransport):
    """A datagram transport whose `sendto` goes through a `FaultInjector`; the rest delegates."""

    def __init__(self, inner: asyncio.DatagramTransport, injector: FaultInjector) -> None:
        super().__init__()
        self.inner = inner
        self.injector = injector

    def sendto(self, data: Any, addr: Any = None) -> None:  # typeshed: bytes-like, address
        injector = self.injector
        if addr is None or not injector.is_open:
            self.inner.sendto(data, addr)
            return
        verdict = injector.decide("udp", Address(str(addr[0]), int(addr[1])))
        if verdict.duplicated:
            injector.count("udp", "duplicated")
        for delay_s in verdict.delays_s:
            if delay_s > 0:
                injector.call_later(delay_s, self._send_late, bytes(data), addr)
            else:
                self.inner.sendto(data, addr)

    def _send_late(self, data: bytes, addr: Any) -> None:
        if not self.inner.is_closing():
            self.inner.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)


class FaultyClient(DataPlaneClient):
    """A `DataPlaneClient` whose requests go through a `FaultInjector` (see the module
    docstring); everything else is the wrapped client's."""

    def __init__(self, inner: DataPlaneClient, injector: FaultInjector) -> None:
        # No super().__init__: this object holds no session of its own; attributes it lacks
        # (config, bytes_in, ...) are the inner client's (__getattr__).
        self.inner = inner
        self.injector = injector

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def _through(
        self, addr: Address, what: str, call: Callable[[], Awaitable[T]], *, twice: bool
    ) -> T:
        injector = self.injector
        if not injector.is_open:
            return await call()
        verdict = injector.decide("http", addr)
        if verdict.drop:
            why = "partitioned" if verdict.partitioned else "dropped"
            raise PeerUnreachable(f"{addr} {what}: request {why} by fault injection")
        delay_s = verdict.delays_s[0]
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        reply = await call()
        if twice and verdict.duplicated:
            injector.count("http", "duplicated")
            try:
                await call()
            except P2PMLError as err:
                injector.counters["http_duplicate_failed"] += 1
                log.debug("duplicate of %s to %s failed: %s", what, addr, err)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return reply

    async def push_delta(self, addr: Address, msg: DeltaPush) -> Ack:
        return await self._through(
            addr, "delta", lambda: self.inner.push_delta(addr, msg), twice=True
        )

    async def pull_model(self, addr: Address, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        return await self._through(
            addr, "model", lambda: self.inner.pull_model(addr, msg), twice=False
        )

    async def control(self, addr: Address, msg: ControlMessage) -> ServerStatus:
        return await self._through(
            addr, "control", lambda: self.inner.control(addr, msg), twice=True
        )

    async def info(self, addr: Address) -> dict[str, object]:
        return await self._through(addr, "info", lambda: self.inner.info(addr), twice=False)
