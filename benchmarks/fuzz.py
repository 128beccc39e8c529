"""Fuzz a live node with random and mutated DHT datagrams and HTTP bodies (issue 8).

Starts, in this process, a peer node (the target, 127.0.0.2), a second, honest peer node joined to
it (127.0.0.3) and a parameter server (127.0.0.4, for ``/v1/control``); then sends, at the same
time, hostile datagrams to the target's DHT socket and hostile requests to every data-plane route
(`fuzzlib`), and slow-loris connections. It records every unhandled loop exception, every ERROR
log line, every 5xx and every 4xx without a JSON error body as a failure, samples the RSS at each
10 %, and finally checks that the honest node can still ping the target, read its signed step and
info, push it a delta and pull its model, and register with the server.

    python benchmarks/fuzz.py [--datagrams 60000] [--bodies 60000] [--seed 1] [--json PATH]
                              [--concurrency 32] [--datagram-rate 4000] [--datagram-hosts 32]

Prints a table of outcomes by kind and a verdict line; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
from aiohttp.http_exceptions import HttpProcessingError
from fuzzlib import Capture, DatagramFuzzer, HttpFuzzer, Route, Sealer, udp_drops

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig, RunManifest, TensorSpec
from p2pml.core.types import Address, PeerId
from p2pml.io.http import ControlMessage, DataPlaneClient
from p2pml.io.overlaybench import loopback_host
from p2pml.node.node import Node
from p2pml.node.server import ParameterServer
from p2pml.protocol.dht import Contact
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    NO_VERSION,
    Ack,
    BarrierRequest,
    DeltaPush,
    Heartbeat,
    ModelReply,
    ModelRequest,
    Register,
    ServerStatus,
    TensorBlob,
)

T = TypeVar("T")
RSS_BOUND_MIB: Final = 200.0
"""The most the process's RSS may grow over a whole run."""
PLATEAU_SLACK_MIB: Final = 16.0
"""Growth over the second half may exceed half the first half's growth by at most this much."""
HEALTH_TIMEOUT_S: Final = 15.0
MAX_MESSAGE_BYTES: Final = 8 << 20
SLOW_TRICKLE_S: Final = 0.25
DATAGRAM_RATE_PER_S: Final = 4000.0
"""Under the DHT's limit for all sources together (5000/s), and spread over N_DATAGRAM_HOSTS
source addresses so that each stays under the per-address limit (200/s)."""
N_DATAGRAM_HOSTS: Final = 32
QUEUE_DRAIN_AT: Final = 64
SHAPES: Final = (("w", (16, 8)), ("b", (8,)))
FAST_OVERLAY: Final = OverlayConfig(
    rpc_timeout_s=0.3, stall_s=0.05, refresh_interval_s=3600.0, refresh_after_join=False
)
FUZZ_DATA: Final = DataPlaneConfig(
    max_message_bytes=MAX_MESSAGE_BYTES, body_timeout_s=1.0, idle_timeout_s=2.0
)


def manifest() -> RunManifest:
    specs = [TensorSpec(name, "float32", shape) for name, shape in SHAPES]
    return RunManifest.build("fuzz", {"lr": 0.1}, specs)


def params(fill: float = 0.0) -> list[TensorBlob]:
    return [TensorBlob.of(n, np.full(shape, fill, np.float32)) for n, shape in SHAPES]


class StaticModel:
    """The model the target serves (the honest node checks it comes back unchanged)."""

    def __init__(self) -> None:
        self.tensors = tuple(params(0.5))

    async def snapshot(self) -> tuple[int, tuple[TensorBlob, ...]]:
        return 0, self.tensors


def config(index: int, **changes: object) -> NodeConfig:
    host = loopback_host(index)
    base = NodeConfig(
        overlay=dataclasses.replace(FAST_OVERLAY, listen=Address(host, 0)),
        data=dataclasses.replace(FUZZ_DATA, listen=Address(host, 0)),
        discover_interval_s=0.5,
        heartbeat_timeout_s=2.0,
        poll_s=0.2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Live:
    target: Node
    honest: Node
    server: ParameterServer
    manifest: RunManifest


@contextlib.asynccontextmanager
async def live_nodes(first: int = 0) -> AsyncIterator[Live]:
    """The target peer, an honest peer joined to it, and a parameter server; closed in reverse."""
    run = manifest()
    async with contextlib.AsyncExitStack() as stack:
        target = await stack.enter_async_context(Node(config(first), run))
        target.attach(StaticModel())
        boot = (target.overlay.addr,)
        honest = await stack.enter_async_context(Node(config(first + 1, bootstrap=boot), run))
        server = await stack.enter_async_context(ParameterServer(config(first + 2), run, params()))
        for node in (target, honest):
            await node.wait_for_peers(1, timeout_s=10)
        yield Live(target, honest, server, run)


def delta(live: Live, *, fill: float = 0.01, **changes: object) -> DeltaPush:
    msg = DeltaPush(live.manifest.tag, live.honest.peer_id, 0, 0, tuple(params(fill)))
    return dataclasses.replace(msg, **changes)  # type: ignore[arg-type]


def push_delta(client: DataPlaneClient, msg: DeltaPush) -> Callable[[Address], Awaitable[object]]:
    return lambda addr: client.push_delta(addr, msg)


def pull_model(
    client: DataPlaneClient, msg: ModelRequest
) -> Callable[[Address], Awaitable[object]]:
    return lambda addr: client.pull_model(addr, msg)


def control(client: DataPlaneClient, msg: ControlMessage) -> Callable[[Address], Awaitable[object]]:
    return lambda addr: client.control(addr, msg)


async def build_corpus(
    live: Live, host: str
) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """Frames the honest node's own client sends: (valid ones, ones a node must refuse), by
    route category. The honest node is registered with the server as a worker first."""
    client, tag, me = live.honest.client, live.manifest.tag, live.honest.peer_id
    other = "other-run@0000000000000000"
    await client.control(live.server.data.addr, Register(tag, me, 0))
    bad_tensors = [
        (TensorBlob.of("w", np.full((16, 8), np.nan, np.float32)), params()[1]),
        (TensorBlob.of("w", np.full((16, 8), np.inf, np.float32)), params()[1]),
        (TensorBlob.of("w", np.zeros((8, 16), np.float32)), params()[1]),
        (TensorBlob.of("w", np.zeros((16, 8), np.float64)), params()[1]),
        (*params(), TensorBlob.of("extra", np.zeros(3, np.float32))),
        (),
    ]
    deltas = {
        "valid": [delta(live), delta(live, fill=-3.0e38), delta(live, step=1 << 40)],
        "bad": [delta(live, tensors=t) for t in bad_tensors]
        + [delta(live, run_id=other), delta(live, sender=PeerId(random.randbytes(20)))],
    }
    control_valid: list[ControlMessage] = [
        Register(tag, me, 0),
        Heartbeat(tag, me, 0, False),
        BarrierRequest(tag, me, 0),
    ]
    control_bad: list[ControlMessage] = [
        Register(other, me, 0),
        Heartbeat(tag, PeerId(random.randbytes(20)), 3, True),
        BarrierRequest(tag, me, 1 << 40),
    ]
    models = {
        "valid": [ModelRequest(tag, me, NO_VERSION), ModelRequest(tag, me, 0)],
        "bad": [ModelRequest(other, me, NO_VERSION)],
    }
    valid: dict[str, list[bytes]] = {}
    bad: dict[str, list[bytes]] = {}
    async with Capture(host) as capture:
        for which, out in (("valid", valid), ("bad", bad)):
            out["delta"] = [await capture.take(push_delta(client, m)) for m in deltas[which]]
            out["model"] = [await capture.take(pull_model(client, m)) for m in models[which]]
            msgs = control_valid if which == "valid" else control_bad
            out["control"] = [await capture.take(control(client, m)) for m in msgs]
    return valid, bad


def sealer(node: Node) -> Sealer | None:
    """Seal frames as `node` does, if the library seals data-plane frames (protocol.auth)."""
    try:
        from p2pml.protocol import auth
    except ImportError:
        return None
    authenticator = getattr(node, "auth", None)
    if authenticator is None:
        return None

    def reseal(frame: bytes) -> bytes:
        digest = auth.new_digest()
        digest.update(frame)
        nonce = random.randbytes(auth.NONCE_BYTES)
        trailer = authenticator.seal(digest.digest(), now_unix_s=time.time(), nonce=nonce)
        return frame + bytes(trailer)

    return Sealer(auth.TRAILER_BYTES, auth.AUTH_MAGIC, reseal)


def routes(live: Live) -> list[Route]:
    data = FUZZ_DATA
    big, small = data.max_message_bytes, data.max_control_bytes
    return [
        Route("peer", "POST", "/v1/delta", "delta", big, 34),
        Route("peer", "POST", "/v1/model", "model", small, 14),
        Route("server", "POST", "/v1/control", "control", small, 24),
        Route("server", "POST", "/v1/delta", "delta", big, 12),
        Route("server", "POST", "/v1/model", "model", small, 6),
        Route("peer", "GET", "/v1/info", None, 0, 4),
        Route("peer", "GET", "/metrics", None, 0, 2),
        Route("server", "GET", "/v1/info", None, 0, 2),
        Route("server", "GET", "/metrics", None, 0, 2),
    ]


# -- watching -------------------------------------------------------------------------------------


class LogTally(logging.Handler):
    """Counts WARNING and above by level and logger; keeps the text of the first ERRORs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):  # aiohttp refusing bytes that are not HTTP
            self.counts[f"{record.levelname} {record.name} (not valid HTTP)"] += 1
            return
        self.counts[f"{record.levelname} {record.name}"] += 1
        if record.levelno >= logging.ERROR and len(self.errors) < 20:
            self.errors.append(logging.Formatter().format(record))


@contextlib.contextmanager
def watching(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[LogTally, list[str]]]:
    """Capture unhandled loop exceptions and WARNING+ log records while the block runs."""
    tally, errors = LogTally(), []
    previous = loop.get_exception_handler()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        errors.append(f"{context.get('message')}: {exc!r}" if exc else str(context))

    root = logging.getLogger()
    root.addHandler(tally)
    loop.set_exception_handler(handler)
    try:
        yield tally, errors
    finally:
        gc.collect()  # tasks whose exception nobody retrieved are reported when collected
        loop.set_exception_handler(previous)
        root.removeHandler(tally)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(slots=True)
class Progress:
    """Counts cases done; samples the RSS at each 10 % and drains the target's delta queue
    (as its training loop would)."""

    total: int
    target: Node
    done: int = 0
    samples: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, n: int) -> None:
        self.done += n
        while len(self.samples) <= 10 and self.done * 10 >= len(self.samples) * self.total:
            self.samples.append((10 * len(self.samples), rss_mib()))
        if self.target.n_queued >= QUEUE_DRAIN_AT:
            self.target.take_deltas()


# -- health ---------------------------------------------------------------------------------------


class Probes:
    """Calls that must succeed within HEALTH_TIMEOUT_S, and what went wrong with those that did
    not."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    async def expect(self, name: str, call: Awaitable[T], ok: Callable[[T], bool]) -> None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                result = await call
        except Exception as err:
            self.problems.append(f"{name}: {type(err).__name__}: {err}")
            return
        if not ok(result):
            self.problems.append(f"{name}: unexpected answer {result!r:.200}")


async def check_health(live: Live) -> list[str]:
    """What the honest node could not do with the target and the server after the fuzzing."""
    t, h, tag, probes = live.target, live.honest, live.manifest.tag, Probes()
    contact = Contact(t.peer_id, t.overlay.addr)
    await probes.expect("ping", h.overlay.ping(t.overlay.addr, t.peer_id), lambda c: c == contact)
    await probes.expect("step", h.overlay.step_of(contact), lambda s: s.step == t.step)
    await probes.expect("info", h.overlay.info(contact), lambda r: r.run == tag)
    t.take_deltas()  # as the target's training loop would, so the push is not refused as busy
    # a step no fuzzed delta used: a second delta of a sender's step is refused as a duplicate
    fresh = (1 << 40) + secrets.randbelow(1 << 20)
    ack = Ack(tag, t.peer_id, fresh)
    push = h.client.push_delta(t.server.addr, delta(live, step=fresh, base_version=fresh))
    await probes.expect("push", push, ack.__eq__)
    model = StaticModel().tensors
    await probes.expect(
        "pull",
        h.client.pull_model(t.server.addr, ModelRequest(tag, h.peer_id, NO_VERSION)),
        lambda r: isinstance(r, ModelReply) and r.tensors == model,
    )
    await probes.expect("http info", h.client.info(t.server.addr), lambda d: d["status"] == "ok")
    await probes.expect(
        "register",
        h.client.control(live.server.data.addr, Register(tag, h.peer_id, 0)),
        lambda s: isinstance(s, ServerStatus),
    )
    await probes.expect("server apply thread", live.server.flush(), lambda _: True)
    return probes.problems


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FuzzReport:
    """What one run sent, what came back, and whether the node survived it."""

    seed: int
    duration_s: float
    sent: dict[str, int]
    outcomes: dict[str, dict[str, int]]
    reproducers: list[str]
    node_failures: list[str]
    loop_errors: list[str]
    error_logs: list[str]
    log_counts: dict[str, int]
    counters: dict[str, dict[str, int]]
    rss_mib: list[tuple[int, float]]
    udp_drops: dict[str, int]
    slow_clients: list[str]
    health: list[str]

    @property
    def n_datagrams(self) -> int:
        return sum(n for kind, n in self.sent.items() if kind.startswith("dgram "))

    @property
    def n_bodies(self) -> int:
        return sum(n for kind, n in self.sent.items() if not kind.startswith("dgram "))

    def _count(self, match: Callable[[str], bool]) -> int:
        return sum(n for row in self.outcomes.values() for o, n in row.items() if match(o))

    @property
    def n_crashes(self) -> int:
        """5xx replies (503 is a refusal), handler exceptions the DHT caught, ERROR logs."""
        server_errors = self._count(lambda o: o[:1] == "5" and not o.startswith("503"))
        internal = sum(c.get("internal_error", 0) for c in self.counters.values())
        return server_errors + internal + len(self.error_logs) + len(self.node_failures)

    @property
    def n_bad_refusals(self) -> int:
        return self._count(lambda o: "no JSON" in o)

    @property
    def n_slow_failures(self) -> int:
        return sum(1 for s in self.slow_clients if "FAILED" in s)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_mib[-1][1] - self.rss_mib[0][1]

    @property
    def is_memory_bounded(self) -> bool:
        """Growth within RSS_BOUND_MIB, and flattening: not linear in the number of inputs."""
        rss = dict(self.rss_mib)
        if 50 not in rss or 100 not in rss:
            return self.rss_growth_mib <= RSS_BOUND_MIB
        first, second = rss[50] - rss[0], rss[100] - rss[50]
        return self.rss_growth_mib <= RSS_BOUND_MIB and second <= first / 2 + PLATEAU_SLACK_MIB

    @property
    def ok(self) -> bool:
        return (
            self.n_crashes == 0
            and not self.loop_errors
            and self.n_bad_refusals == 0
            and self.n_slow_failures == 0
            and self.is_memory_bounded
            and not self.health
        )

    def verdict(self) -> str:
        memory = f"RSS {self.rss_growth_mib:+.1f} MiB"
        if not self.is_memory_bounded:
            memory += f" (NOT bounded: limit {RSS_BOUND_MIB:g} MiB, must flatten)"
        line = (
            f"fuzz: {self.n_datagrams} datagrams + {self.n_bodies} bodies, "
            f"{self.n_crashes} crashes, {len(self.loop_errors)} unhandled exceptions, {memory}, "
            + ("node healthy" if not self.health else "node UNHEALTHY: " + "; ".join(self.health))
        )
        if self.n_bad_refusals:
            line += f", {self.n_bad_refusals} refusals without a JSON error body"
        if self.n_slow_failures:
            line += f", {self.n_slow_failures} slow clients held a connection"
        return line


async def slow_client(http: HttpFuzzer, route: Route, stage: str) -> str:
    limit_s = FUZZ_DATA.idle_timeout_s + FUZZ_DATA.body_deadline_s(1 << 12) + 8.0
    try:
        return await http.slow_client(route, stage, SLOW_TRICKLE_S, limit_s)
    except TimeoutError:
        return f"FAILED: slow {stage} to {route.name} still connected after {limit_s:.0f} s"


async def run_fuzz(
    n_datagrams: int,
    n_bodies: int,
    seed: int,
    *,
    first: int = 0,
    concurrency: int = 32,
    datagram_rate_per_s: float = DATAGRAM_RATE_PER_S,
    n_datagram_hosts: int = N_DATAGRAM_HOSTS,
) -> FuzzReport:
    """Fuzz live nodes on 127.0.0.(first + 2)... and report (see the module docstring)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with watching(loop) as (tally, loop_errors):
        async with live_nodes(first) as live:
            t, fuzz_host = live.target, loopback_host(first + 3)
            valid, bad = await build_corpus(live, fuzz_host)
            all_routes = routes(live)
            targets = {"peer": t.server.addr, "server": live.server.data.addr}
            http = HttpFuzzer(targets, all_routes, valid, bad, seed, sealer=sealer(live.honest))
            protocol = t.overlay.endpoint.protocol
            assert protocol is not None
            fd = protocol.transport.get_extra_info("socket").fileno()
            dgram = DatagramFuzzer(
                t.overlay.addr, fd, NodeKey.generate(), seed, rate_per_s=datagram_rate_per_s
            )
            await dgram.open([f"127.0.2.{2 + i}" for i in range(n_datagram_hosts)])
            drops = {"target": udp_drops(t.overlay.addr), "fuzzer": dgram.drops()}
            progress = Progress(n_datagrams + n_bodies, t)
            progress(0)
            try:
                async with asyncio.TaskGroup() as tg:
                    slow = [
                        tg.create_task(slow_client(http, route, stage))
                        for route in (all_routes[0], all_routes[2])
                        for stage in ("headers", "body")
                    ]
                    tg.create_task(dgram.run(n_datagrams, lambda: t.overlay.counters, progress))
                    tg.create_task(http.run(n_bodies, concurrency, progress))
                health = await check_health(live)
                drops = {
                    "target": udp_drops(t.overlay.addr) - drops["target"],
                    "fuzzer": dgram.drops() - drops["fuzzer"],
                }
            finally:
                dgram.close()
            counters = {
                "peer node": dict(t.counters),
                "peer dht": dict(t.overlay.counters),
                "peer http refusals": dict(t.server.rejections),
                "server": dict(live.server.counters),
                "server http refusals": dict(live.server.data.rejections),
                "honest dht": dict(live.honest.overlay.counters),
            }
    outcomes: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in (dgram.outcomes + http.outcomes).items():
        outcomes.setdefault(kind, {})[outcome] = n
    return FuzzReport(
        seed=seed,
        duration_s=round(loop.time() - started, 2),
        sent=dict(dgram.sent + http.sent),
        outcomes=outcomes,
        reproducers=dgram.reproducers + http.reproducers,
        node_failures=dgram.node_failures,
        loop_errors=loop_errors,
        error_logs=tally.errors,
        log_counts=dict(tally.counts),
        counters=counters,
        rss_mib=[(pct, round(mib, 1)) for pct, mib in progress.samples],
        udp_drops=drops,
        slow_clients=[s.result() for s in slow],
        health=health,
    )


# -- output ---------------------------------------------------------------------------------------


def _row(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_report(report: FuzzReport) -> str:
    lines = [f"{'kind':<36} {'sent':>7}  outcomes (answered by status / dropped with counter)"]
    for kind in sorted(report.sent):
        lines.append(f"{kind:<36} {report.sent[kind]:>7}  {_row(report.outcomes.get(kind, {}))}")
    lines.append("")
    for name, counts in report.counters.items():
        lines.append(f"{name + ':':<22} {_row(counts) or '-'}")
    lines.append(f"{'log records:':<22} {_row(report.log_counts) or '-'}")
    lines.append(f"{'kernel UDP drops:':<22} {_row(report.udp_drops)}")
    samples = " ".join(f"{pct}%:{mib:.0f}" for pct, mib in report.rss_mib)
    lines.append(f"{'RSS MiB by progress:':<22} {samples}")
    lines.extend(f"{'slow client:':<22} {s}" for s in report.slow_clients)
    lines.append(f"{'duration:':<22} {report.duration_s:.1f} s")
    for title, items in (
        ("REPRODUCER", report.reproducers),
        ("NODE SENT", report.node_failures),
        ("UNHANDLED", report.loop_errors),
        ("ERROR LOG", report.error_logs),
    ):
        lines.extend(f"{title}: {item}" for item in items)
    lines.append(report.verdict())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fuzz a live p2pml node (issue 8)")
    parser.add_argument("--datagrams", type=int, default=60_000)
    parser.add_argument("--bodies", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    parser.add_argument("--datagram-rate", type=float, default=DATAGRAM_RATE_PER_S)
    parser.add_argument(
        "--datagram-hosts",
        type=int,
        default=N_DATAGRAM_HOSTS,
        help="source addresses of the datagrams (1 puts them all under one per-address limit)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    wall = time.monotonic()
    report = asyncio.run(
        run_fuzz(
            args.datagrams,
            args.bodies,
            args.seed,
            concurrency=args.concurrency,
            datagram_rate_per_s=args.datagram_rate,
            n_datagram_hosts=args.datagram_hosts,
        )
    )
    print(format_report(report))
    print(f"wall time {time.monotonic() - wall:.1f} s")
    if args.json is not None:
        doc = {**dataclasses.asdict(report), "verdict": report.verdict(), "ok": report.ok}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
