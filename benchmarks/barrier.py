"""The cost of one sampled barrier check on loopback, against raw UDP measured in the same run.

DESIGN.md section 7: "a barrier check, beta = 10 step RPCs in parallel with signatures verified,
peers drawn from a background-refreshed uniform pool: <= 2 ms on loopback".

A second process (this script with ``--serve``, so its signing does not run on the measuring core)
hosts 10 responders, each a `KademliaOverlay` on its own loopback address (127.0.0.2, ...)
answering signed ``step`` RPCs, and 10 bare asyncio echo endpoints on the same addresses. This
process joins one `KademliaOverlay` (the checker) to the responders, then, interleaved, for
beta = 1, 2, 4 and 10:

  - barrier check (signed): a fresh sample of beta contacts (from the routing table, as
    `Membership.sample` draws while the network is counted exactly, so no lookup), their signed
    steps asked in parallel (`ask_steps`, as `Node._check` does), then the pBSP `decide`;
  - raw UDP (baseline): beta datagrams of a step request's size sent in parallel from one socket
    to beta echo endpoints, each answered by a datagram of a step reply's size (no msgpack, no
    signatures; one coroutine per datagram, gathered, as `ask_steps` does).

Ratio = median signed / median raw of the same beta; "checker CPU" is this process's CPU time per
round (near the wall time: the check is bound by the checker's CPU). The responders share one
process, so their 10 signatures are made one after another (on separate hosts they would not be).
Then the CPU cost per reply of the Ed25519 checks (`verify_signature`, the whole `open_signed`)
and of a signature on the responder side (`NodeKey.sign`), to explain the figure. ``--profile``
adds a cProfile of the checker side over beta = 10 checks.

    python benchmarks/barrier.py [--reps 300] [--warmup 30] [--json PATH] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import cast

from rich.console import Console
from rich.table import Table

from p2pml.cli.output import write_json
from p2pml.core.barrier import BarrierView, Decision, PbspParams, decide
from p2pml.core.config import DEFAULT_RPC_TIMEOUT_S, OverlayConfig
from p2pml.core.sampling import sample_peers
from p2pml.core.types import Address, Step
from p2pml.io.overlay import KademliaOverlay
from p2pml.io.overlaybench import loopback_host, quantile
from p2pml.node.node import ask_steps
from p2pml.protocol import dht
from p2pml.protocol.dht import Contact, StepReport
from p2pml.protocol.identity import NodeKey, verify_signature

RESPONDERS = 10
BETAS = (1, 2, 4, 10)
STEP = Step(5)
TARGET_MS = 2.0
TARGET_BETA = 10
N_VERIFY = 2000
VERIFY_BATCH = 100
START_TIMEOUT_S = 30.0
TAG_BYTES = 8
SCRIPT = Path(__file__).resolve()


def overlay_config(i: int) -> OverlayConfig:
    """No background refresh, to keep it out of the timing; the i-th loopback address."""
    return OverlayConfig(
        listen=Address(loopback_host(i), 0), refresh_interval_s=3600.0, refresh_after_join=False
    )


def wire_sizes() -> tuple[int, int]:
    """Bytes of a real ``step`` request datagram and of its signed reply."""
    key, msg_id = NodeKey.generate(), os.urandom(dht.MSG_ID_BYTES)
    request = dht.encode_request(msg_id, "step", [key.peer_id])
    body = dht.seal_signed(key, "step", msg_id, dht.encode_step(StepReport(STEP)))
    return len(request), len(dht.encode_reply(msg_id, body))


# -- the responder process ------------------------------------------------------------------------
class Echo(asyncio.DatagramProtocol):
    """Answers each datagram with its first bytes, padded to a step reply's size."""

    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data[:TAG_BYTES].ljust(self.reply_size, b"\0"), addr)


async def serve(n: int, reply_size: int) -> None:
    """Start n responders and n echo endpoints, print their addresses, run until stdin closes."""
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        overlays: list[KademliaOverlay] = []
        for i in range(n):
            o = await stack.enter_async_context(
                KademliaOverlay(overlay_config(i), NodeKey.generate())
            )
            o.set_step(STEP)
            overlays.append(o)
        for o in overlays[1:]:
            await o.bootstrap([overlays[0].addr])
        echoes = []
        for i in range(n):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Echo(reply_size), local_addr=(loopback_host(i), 0)
            )
            stack.callback(transport.close)
            echoes.append(list(transport.get_extra_info("sockname")[:2]))
        addrs = [[o.addr.host, o.addr.port] for o in overlays]
        print(json.dumps({"overlays": addrs, "echoes": echoes}), flush=True)
        reader = asyncio.StreamReader()
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        stack.callback(pipe.close)
        await reader.read()  # until the measuring process closes our stdin (or dies)


# -- the measuring process ------------------------------------------------------------------------
class RawClient(asyncio.DatagramProtocol):
    """One socket; each request is a tagged datagram whose reply completes a future."""

    def __init__(self, request_size: int) -> None:
        self.request_size = request_size
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self._next = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(data[:TAG_BYTES], None)
        if future is not None and not future.done():
            future.set_result(None)

    async def ping(self, addr: tuple[str, int]) -> bool:
        """Whether the echo came back within the overlay's RPC timeout."""
        assert self.transport is not None
        self._next += 1
        tag = self._next.to_bytes(TAG_BYTES, "big")
        future = asyncio.get_running_loop().create_future()
        self.waiting[tag] = future
        try:
            self.transport.sendto(tag.ljust(self.request_size, b"\0"), addr)
            async with asyncio.timeout(DEFAULT_RPC_TIMEOUT_S):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting.pop(tag, None)


async def raw_check(
    client: RawClient, echoes: list[tuple[str, int]], beta: int, rng: random.Random
) -> int:
    """beta echoes in parallel; returns how many did not come back."""
    answered = await asyncio.gather(*(client.ping(a) for a in rng.sample(echoes, beta)))
    return answered.count(False)


async def signed_check(
    overlay: KademliaOverlay, contacts: list[Contact], beta: int, rng: random.Random
) -> int:
    """What `Node._check` does: a fresh sample, its signed steps in parallel, then the policy.

    Returns how many of the sample did not answer validly (the policy decides without them).
    """
    answers = await ask_steps(overlay, sample_peers(contacts, beta, rng))
    steps = {p: r.step for p, r in answers.items() if r is not None}
    view = BarrierView(STEP, steps, population_estimate=float(len(contacts) + 1))
    if decide(view, PbspParams(beta)) is not Decision.PROCEED:
        raise RuntimeError("every responder is at this step: the barrier must proceed")
    return beta - len(steps)


async def timed(round_: Callable[[], Awaitable[int]]) -> tuple[float, float, int]:
    """Wall and CPU seconds of one round (this process is single-threaded), and its misses."""
    started, cpu = time.perf_counter(), time.thread_time()
    missed = await round_()
    return time.perf_counter() - started, time.thread_time() - cpu, missed


async def measure(
    overlay: KademliaOverlay,
    client: RawClient,
    echoes: list[tuple[str, int]],
    *,
    reps: int,
    warmup: int,
) -> dict[str, dict[int, list[float]]]:
    """Seconds per round, interleaved: every repetition runs raw and signed at every beta.

    Keys: "raw", "signed" (wall time), "raw_cpu", "signed_cpu" (this process's CPU time) and
    "raw_missed", "signed_missed" (requests unanswered within the RPC timeout, per round).
    """
    contacts, rng = overlay.contacts(), random.Random(1)
    times: dict[str, dict[int, list[float]]] = {
        f"{name}{kind}": {b: [] for b in BETAS}
        for name in ("raw", "signed")
        for kind in ("", "_cpu", "_missed")
    }
    for rep in range(warmup + reps):
        for beta in BETAS:
            rounds = {
                "raw": lambda b=beta: raw_check(client, echoes, b, rng),
                "signed": lambda b=beta: signed_check(overlay, contacts, b, rng),
            }
            for name in sorted(rounds, reverse=rep % 2 == 1):  # alternate which goes first
                seconds, cpu, missed = await timed(rounds[name])
                if rep >= warmup:
                    times[name][beta].append(seconds)
                    times[f"{name}_cpu"][beta].append(cpu)
                    times[f"{name}_missed"][beta].append(missed)
    return times


async def profile_checks(overlay: KademliaOverlay, reps: int) -> None:
    """cProfile of the checker over `reps` beta = 10 checks, top functions by own time."""
    contacts, rng = overlay.contacts(), random.Random(2)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        await signed_check(overlay, contacts, TARGET_BETA, rng)
    profiler.disable()
    print(f"\ncProfile, checker side, {reps} checks of beta = {TARGET_BETA}:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def cpu_costs() -> dict[str, list[float]]:
    """Seconds per call, one value per batch of VERIFY_BATCH calls, N_VERIFY calls in all."""
    key, msg_id = NodeKey.generate(), os.urandom(dht.MSG_ID_BYTES)
    body = dht.seal_signed(key, "step", msg_id, dht.encode_step(StepReport(STEP)))
    data = bytes(range(96))
    signature = key.sign(data)
    calls: dict[str, Callable[[], object]] = {
        "Ed25519 verify_signature": lambda: verify_signature(
            key.peer_id, key.public_key, data, signature
        ),
        "open_signed (whole reply check)": lambda: dht.open_signed(
            body, "step", msg_id, key.peer_id
        ),
        "NodeKey.sign (responder side)": lambda: key.sign(data),
    }
    costs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(N_VERIFY // VERIFY_BATCH):  # interleaved, so a burst of load hits them all
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(VERIFY_BATCH):
                call()
            costs[name].append((time.perf_counter() - started) / VERIFY_BATCH)
    return costs


async def start_responders(
    stack: AsyncExitStack, request_size: int, reply_size: int
) -> dict[str, list[list[object]]]:
    """Start the ``--serve`` process, stopped when `stack` closes; returns its addresses."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--serve",
        "--reply-size",
        str(reply_size),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )

    async def stop() -> None:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the responders exit when their stdin closes
            try:
                async with asyncio.timeout(5.0):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()

    stack.push_async_callback(stop)
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT_S):
        line = await proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the responder process exited ({await proc.wait()}) before serving")
    addrs: dict[str, list[list[object]]] = json.loads(line)
    return addrs


async def bench(args: argparse.Namespace) -> dict[str, object]:
    request_size, reply_size = wire_sizes()
    load = [round(x, 2) for x in os.getloadavg()]
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        addrs = await start_responders(stack, request_size, reply_size)
        seeds = [Address(str(h), int(str(p))) for h, p in addrs["overlays"]]
        echoes = [(str(h), int(str(p))) for h, p in addrs["echoes"]]
        overlay = await stack.enter_async_context(
            KademliaOverlay(overlay_config(RESPONDERS), NodeKey.generate())
        )
        await overlay.bootstrap(seeds)
        if len(overlay.contacts()) != RESPONDERS:
            raise RuntimeError(f"joined with {len(overlay.contacts())} of {RESPONDERS} contacts")
        transport, client = await loop.create_datagram_endpoint(
            lambda: RawClient(request_size), local_addr=(loopback_host(RESPONDERS), 0)
        )
        stack.callback(transport.close)
        times = await measure(overlay, client, echoes, reps=args.reps, warmup=args.warmup)
        if args.profile:
            await profile_checks(overlay, args.reps)
        counters = dict(overlay.counters)
    return {
        "request_bytes": request_size,
        "reply_bytes": reply_size,
        "times": times,
        "cpu": cpu_costs(),
        "checker_counters": counters,
        "load_average": load,
    }


def _row(label: str, beta: int, values: list[float], **extra: object) -> dict[str, object]:
    return {
        "row": label,
        "beta": beta,
        "median_ms": statistics.median(values) * 1e3,
        "p95_ms": quantile(values, 0.95) * 1e3,
        **extra,
    }


def summarise(result: dict[str, object], reps: int) -> dict[str, object]:
    times, cpu = result["times"], result["cpu"]
    assert isinstance(times, dict) and isinstance(cpu, dict)
    rows: list[dict[str, object]] = []
    for beta in BETAS:
        raw_ms = statistics.median(times["raw"][beta]) * 1e3
        for name, label in (("raw", "raw UDP ping-pong"), ("signed", "barrier check")):
            row = _row(
                f"{label} (β={beta}{', signed' if name == 'signed' else ''})",
                beta,
                times[name][beta],
                checker_cpu_ms=statistics.median(times[f"{name}_cpu"][beta]) * 1e3,
            )
            row["ratio"] = row["median_ms"] / raw_ms  # type: ignore[operator]
            row["missed"] = sum(times[f"{name}_missed"][beta])
            rows.append(row)
    for name, values in cpu.items():
        rows.append(_row(f"{name}, per reply", 1, values, checker_cpu_ms=None, ratio=None))
    check = statistics.median(times["signed"][TARGET_BETA]) * 1e3
    check_cpu = statistics.median(times["signed_cpu"][TARGET_BETA]) * 1e3
    per_reply = statistics.median(cpu["open_signed (whole reply check)"]) * 1e3
    return {
        "reps": reps,
        "request_bytes": result["request_bytes"],
        "reply_bytes": result["reply_bytes"],
        "load_average": result["load_average"],
        "rows": rows,
        "target_ms": TARGET_MS,
        "check_median_ms": check,
        "check_cpu_median_ms": check_cpu,
        "reply_checks_ms": TARGET_BETA * per_reply,
        "meets_target": check <= TARGET_MS,
        "checker_counters": result["checker_counters"],
    }


def print_table(summary: dict[str, object], console: Console) -> None:
    title = (
        f"barrier check on loopback, {summary['reps']} interleaved reps per row; step request "
        f"{summary['request_bytes']} B, reply {summary['reply_bytes']} B"
    )
    table = Table(title=title)
    for name in ("row", "β", "median ms", "p95 ms", "checker CPU ms", "ratio vs raw UDP"):
        table.add_column(name, justify="left" if name == "row" else "right")
    rows = summary["rows"]
    assert isinstance(rows, list)
    for row in rows:
        cpu, ratio = row["checker_cpu_ms"], row["ratio"]
        table.add_row(
            row["row"],
            str(row["beta"]),
            f"{row['median_ms']:.3f}",
            f"{row['p95_ms']:.3f}",
            "" if cpu is None else f"{cpu:.3f}",
            "" if ratio is None else f"{ratio:.2f}",
        )
    console.print(table)
    missed = sum(int(row.get("missed", 0)) for row in rows)
    if missed:
        console.print(f"[yellow]{missed} requests went unanswered (see the JSON rows)[/yellow]")
    console.print(
        f"β={TARGET_BETA}: the checker spent {summary['check_cpu_median_ms']:.3f} ms of CPU per "
        f"check (median), of which {TARGET_BETA} x open_signed = {summary['reply_checks_ms']:.3f}"
        f" ms; load average (1, 5, 15 min) before the run: {summary['load_average']}"
    )
    verdict = "met" if summary["meets_target"] else "missed"
    console.print(
        f"target: β={TARGET_BETA} check <= {TARGET_MS:g} ms: {verdict} "
        f"(median {summary['check_median_ms']:.3f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="p2pml barrier check against raw UDP")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--json", dest="json_path", type=Path)
    parser.add_argument("--profile", action="store_true", help="cProfile the checker side")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reply-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(RESPONDERS, args.reply_size))
        return 0
    console = Console(width=120)
    with console.status("barrier checks ..."):
        result = asyncio.run(bench(args))
    summary = summarise(result, args.reps)
    print_table(summary, console)
    if args.json_path is not None:
        write_json(args.json_path, summary)  # type: ignore[arg-type]
        console.print(f"JSON: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
