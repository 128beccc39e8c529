"""Fault injection on real sockets: the datagram wrapper, the HTTP client wrapper, plan files
reloaded at run time, the --faults flag, and peer-mode nodes training on a lossy network."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time

import numpy as np
import pytest
from nodes import FAST_OVERLAY, cluster, node_config

from p2pml.cli import main
from p2pml.core.config import DataPlaneConfig
from p2pml.core.faults import FaultPlan, Partition
from p2pml.core.run import RunManifest, TensorSpec
from p2pml.core.types import Address, PeerId
from p2pml.errors import ConfigError, PeerTimeout, PeerUnreachable
from p2pml.io.faults import FaultInjector, FaultyDatagramTransport, read_plan
from p2pml.io.http import DataPlaneClient, DataPlaneServer
from p2pml.io.overlay import KademliaOverlay
from p2pml.node.node import Node
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import Ack, DeltaPush, ModelRequest, TensorBlob

pytestmark = pytest.mark.integration

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"


class Sink(asyncio.DatagramProtocol):
    """Collects datagrams; `wait_for(n)` returns once n have arrived."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.changed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.changed.set()

    async def wait_for(self, n: int) -> None:
        while len(self.received) < n:
            self.changed.clear()
            await self.changed.wait()


@contextlib.asynccontextmanager
async def datagram_pair(injector: FaultInjector):
    """A sender's transport wrapped by `injector` and a Sink on another loopback address."""
    loop = asyncio.get_running_loop()
    sink_transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=(HOST_B, 0))
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(HOST_A, 0)
    )
    try:
        async with injector:
            yield FaultyDatagramTransport(transport, injector), sink, sink_transport
    finally:
        transport.close()
        sink_transport.close()


async def send_numbered(sender, sink, sink_transport, n: int) -> None:
    """Send n numbered datagrams in batches, each batch once the sink holds all that are due
    (the rest wait in the injector's timers): loopback UDP loses only on a full buffer."""
    addr = sink_transport.get_extra_info("sockname")[:2]
    injector, c = sender.injector, sender.injector.counters
    for i in range(n):
        sender.sendto(i.to_bytes(4, "big"), addr)
        if i % 20 == 19 or i == n - 1:
            due = c["udp_sent"] - c["udp_dropped"] + c["udp_duplicated"] - injector.n_pending
            async with asyncio.timeout(5):
                await sink.wait_for(due)


# --- datagrams ----------------------------------------------------------------------------------


async def test_datagram_wrapper_delivers_exactly_what_its_counters_say():
    plan = FaultPlan(seed=1, loss=0.3, duplicate=0.1)
    injector = FaultInjector(plan)
    async with datagram_pair(injector) as (sender, sink, sink_transport):
        await send_numbered(sender, sink, sink_transport, 400)
        c = injector.counters
        expected = c["udp_sent"] - c["udp_dropped"] + c["udp_duplicated"]
        async with asyncio.timeout(5):
            await sink.wait_for(expected)
    assert c["udp_sent"] == 400
    assert 0.3 * 400 - 50 < c["udp_dropped"] < 0.3 * 400 + 50
    assert c["udp_duplicated"] > 0
    assert len(sink.received) == expected
    assert c["dropped"] == c["udp_dropped"]


async def test_datagram_wrapper_reorders_and_delays_through_owned_timers():
    plan = FaultPlan(seed=2, reorder=0.3, reorder_delay_s=0.05, delay_s=0.01)
    injector = FaultInjector(plan)
    async with datagram_pair(injector) as (sender, sink, sink_transport):
        started = time.monotonic()
        await send_numbered(sender, sink, sink_transport, 100)
        assert injector.n_pending > 0
        async with asyncio.timeout(5):
            await sink.wait_for(100)
        assert time.monotonic() - started >= 0.01
        assert injector.n_pending == 0
    order = [int.from_bytes(d, "big") for d in sink.received]
    assert sorted(order) == list(range(100))
    assert order != sorted(order)
    assert injector.counters["udp_reordered"] > 0
    assert injector.counters["udp_delayed"] == 100


async def test_datagram_wrapper_cancels_pending_sends_on_close():
    injector = FaultInjector(FaultPlan(delay_s=30.0))
    async with datagram_pair(injector) as (sender, sink, sink_transport):
        await send_numbered(sender, sink, sink_transport, 5)
        assert injector.n_pending == 5
    assert injector.n_pending == 0
    assert sink.received == []
    assert {t for t in asyncio.all_tasks() if not t.done()} == {asyncio.current_task()}


def test_injector_same_seed_and_salt_give_the_same_decisions():
    plan = FaultPlan(seed=5, loss=0.2, jitter_s=0.01, duplicate=0.1, reorder=0.1)
    dst = Address(HOST_B, 9)
    runs = [
        [FaultInjector(plan, salt=salt).decide("udp", dst) for _ in range(200)]
        for salt in ("a", "a", "b")
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@contextlib.asynccontextmanager
async def overlay_pair(plan: FaultPlan, **injector_args):
    """Two DHT overlays on 127.0.0.2 and .3; the first one's datagrams go through `plan`."""
    cfg = dataclasses.replace(FAST_OVERLAY, rpc_timeout_s=0.2)
    a_cfg = dataclasses.replace(cfg, listen=Address(HOST_A, 0))
    b_cfg = dataclasses.replace(cfg, listen=Address(HOST_B, 0))
    injector = FaultInjector(plan, **injector_args)
    async with (
        KademliaOverlay(a_cfg, NodeKey.generate()) as a,
        KademliaOverlay(b_cfg, NodeKey.generate()) as b,
    ):
        injector.wrap_overlay(a)
        async with injector:
            yield a, b, injector


async def test_overlay_pings_fail_when_every_datagram_is_lost():
    async with overlay_pair(FaultPlan(loss=1.0)) as (a, b, injector):
        with pytest.raises(PeerTimeout):
            await a.ping(b.addr)
        with pytest.raises(PeerTimeout):
            await b.ping(a.addr)  # b's request reaches a; a's reply is lost
    assert injector.counters["udp_dropped"] == injector.counters["udp_sent"] >= 2


async def test_overlay_pings_fail_about_as_often_as_datagrams_are_lost():
    async with overlay_pair(FaultPlan(seed=3, loss=0.3)) as (a, b, injector):
        results = await asyncio.gather(
            *(a.ping(b.addr) for _ in range(100)), return_exceptions=True
        )
    failed = sum(isinstance(r, PeerTimeout) for r in results)
    assert all(isinstance(r, PeerTimeout) or r.addr == b.addr for r in results)
    assert 10 <= failed <= 50, failed
    assert failed <= injector.counters["udp_dropped"]


async def test_overlay_partition_blocks_until_its_window_ends():
    now = time.time()
    split = Partition(now - 1, now + 0.6, ((HOST_A,), (HOST_B,)))
    async with overlay_pair(FaultPlan(partitions=(split,))) as (a, b, injector):
        with pytest.raises(PeerTimeout):
            await a.ping(b.addr)
        assert injector.counters["udp_partitioned"] >= 1
        async with asyncio.timeout(5):
            while True:  # no fixed sleep: ping until the window has passed
                with contextlib.suppress(PeerTimeout):
                    await a.ping(b.addr)
                    break
    assert time.time() >= split.end_unix_s


async def test_overlay_delay_adds_to_the_round_trip():
    async with overlay_pair(FaultPlan(delay_s=0.1)) as (a, b, _):
        await a.ping(b.addr)  # a's first ping also has b check a's ID
        started = time.monotonic()
        await a.ping(b.addr)
        assert time.monotonic() - started >= 0.1


# --- plan files ---------------------------------------------------------------------------------


def write_plan(path, text: str) -> None:
    """Write a plan file and move its mtime on, so that a rewrite within one clock tick counts."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (a file watcher's state, no event to await)
            await asyncio.sleep(0.01)


async def test_overlay_partition_from_a_file_heals_when_the_file_changes(tmp_path):
    path = tmp_path / "faults.toml"
    groups = f'groups = [["{HOST_A}"], ["{HOST_B}"]]'
    write_plan(path, f"[[partitions]]\nstart_unix_s = 0\nend_unix_s = inf\n{groups}\n")
    plan = read_plan(path)
    async with overlay_pair(plan, path=path, reload_interval_s=0.05) as (a, b, injector):
        with pytest.raises(PeerTimeout):
            await a.ping(b.addr)
        write_plan(path, "loss = 0.0\n")
        await wait_until(lambda: injector.n_reloads == 1)
        assert injector.plan == FaultPlan()
        await a.ping(b.addr)


async def test_injector_keeps_its_plan_and_warns_once_on_a_bad_file(tmp_path, caplog):
    path = tmp_path / "faults.toml"
    write_plan(path, "loss = 0.5\n")
    injector = FaultInjector(read_plan(path), path=path, reload_interval_s=0.02)
    caplog.set_level(logging.WARNING, logger="p2pml.io.faults")
    async with injector:
        write_plan(path, "loss = 5\n")
        await wait_until(lambda: "not reloaded" in caplog.text)
        write_plan(path, "delay_s = 0.5\n")
        await wait_until(lambda: injector.n_reloads == 1)
    assert caplog.text.count("not reloaded") == 1
    assert "injecting network faults (from" in caplog.text
    assert injector.plan == FaultPlan(delay_s=0.5)


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("plan.toml", "loss = [\n", "faults"),
        ("plan.json", '{"loss": 0.1, "bad": 1}', "fault plan in"),
        ("plan.toml", "delay_s = -1\n", "delay_s in"),
    ],
)
def test_read_plan_refuses_a_bad_file_naming_it(tmp_path, name, text, field):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_plan(path)
    assert info.value.field.startswith(field)


def test_read_plan_reads_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"loss": 0.1, "seed": 4}', encoding="utf-8")
    assert read_plan(path) == FaultPlan(seed=4, loss=0.1)


def test_run_faults_flag_is_checked_before_anything_starts(tmp_path, capsys, monkeypatch):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("loss = 0.05\ndelay_s = 0.02\n", encoding="utf-8")
    bad.write_text("loss = 0.05\nloss_rate = 1\n", encoding="utf-8")
    assert main(["run", "--faults", str(good), "--print-config"]) == 0
    assert f'faults = "{good}"  # flag' in capsys.readouterr().out
    monkeypatch.setenv("P2PML_FAULTS", str(bad))
    assert main(["run", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--faults" in err and "loss_rate" in err and "P2PML_FAULTS" in err


# --- the HTTP client ----------------------------------------------------------------------------

CLIENT = Address("127.0.0.9", 1)
FAST = DataPlaneConfig(idle_timeout_s=1.0, body_timeout_s=0.5, read_timeout_s=5.0)
ME, PEER = PeerId(b"\x01" * 20), PeerId(b"\x02" * 20)


def delta(step: int = 1) -> DeltaPush:
    return DeltaPush("run", PEER, step, 0, (TensorBlob.of("w", np.ones(16, np.float32)),))


class Handler:
    """A data plane's owner that records the deltas it receives."""

    def __init__(self) -> None:
        self.deltas: list[DeltaPush] = []

    async def on_delta(self, msg: DeltaPush) -> Ack:
        self.deltas.append(msg)
        return Ack("run", ME, msg.step)

    async def on_model_request(self, msg: ModelRequest):
        raise NotImplementedError

    def info(self) -> dict[str, str | int | float | bool | None]:
        return {"peer_id": ME.hex()}


@contextlib.asynccontextmanager
async def http_pair(plan: FaultPlan):
    handler = Handler()
    injector = FaultInjector(plan)
    async with DataPlaneServer(FAST, handler) as server, DataPlaneClient(FAST) as inner:
        client = injector.attach(inner, None, CLIENT)
        async with injector:
            yield handler, server, client, injector


async def test_http_dropped_request_raises_peer_unreachable():
    async with http_pair(FaultPlan(loss=1.0)) as (handler, server, client, injector):
        with pytest.raises(PeerUnreachable, match="dropped by fault injection"):
            await client.push_delta(server.addr, delta())
        with pytest.raises(PeerUnreachable):
            await client.info(server.addr)
    assert handler.deltas == []
    assert injector.counters["http_dropped"] == 2


async def test_http_request_loss_overrides_loss_for_requests():
    async with http_pair(FaultPlan(loss=1.0, request_loss=0.0)) as (handler, server, client, _):
        await client.push_delta(server.addr, delta())
    assert len(handler.deltas) == 1


async def test_http_duplicated_push_reaches_the_receiver_twice():
    async with http_pair(FaultPlan(duplicate=1.0)) as (handler, server, client, injector):
        ack = await client.push_delta(server.addr, delta(step=3))
    assert ack.step == 3
    assert [m.step for m in handler.deltas] == [3, 3]
    assert injector.counters["http_duplicated"] == 1


async def test_http_partition_refuses_requests_across_groups_only():
    window = Partition(0.0, float("inf"), ((CLIENT.host,), ("127.0.0.1",)))
    async with http_pair(FaultPlan(partitions=(window,))) as (handler, server, client, injector):
        with pytest.raises(PeerUnreachable, match="partitioned"):
            await client.push_delta(server.addr, delta())
        injector.replace(FaultPlan())  # the partition heals
        await client.push_delta(server.addr, delta())
    assert len(handler.deltas) == 1
    assert injector.counters["http_partitioned"] == 1


async def test_http_delay_is_paid_both_ways_under_the_callers_timeout():
    async with http_pair(FaultPlan(delay_s=0.1)) as (handler, server, client, _):
        started = time.monotonic()
        await client.push_delta(server.addr, delta())
        assert time.monotonic() - started >= 0.2
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.push_delta(server.addr, delta())
    assert len(handler.deltas) == 1


# --- nodes --------------------------------------------------------------------------------------

BLOBS = (TensorBlob.of("w", np.zeros(4, np.float32)),)


async def train(node, steps: int) -> None:
    for step in range(steps):
        await node.barrier(timeout_s=20)
        node.take_deltas()
        await node.publish(step, BLOBS)
    await node.finish()


async def test_nodes_with_pssp_complete_their_steps_on_a_lossy_slow_network(caplog):
    steps, n = 15, 4
    manifest = RunManifest.build("lossy", {}, [TensorSpec("w", "float32", (4,))])
    plan = FaultPlan(seed=11, loss=0.05, delay_s=0.02)
    caplog.set_level(logging.WARNING, logger="p2pml.io.faults")
    # The nodes join on a clean network (the next test joins a lossy one), then train on the
    # lossy one: the plan is swapped in as a chaos script would.
    async with cluster(n, manifest, barrier="pssp", staleness=2, faults=FaultPlan()) as nodes:
        for node in nodes:
            assert node.faults is not None
            node.faults.replace(plan)
        async with asyncio.timeout(25):
            await asyncio.gather(*(train(node, steps) for node in nodes))
        counters = [node.faults.counters for node in nodes if node.faults is not None]
    assert [node.step for node in nodes] == [steps] * n
    assert len(counters) == n
    assert sum(c["udp_dropped"] for c in counters) > 0
    assert all(c["udp_delayed"] > 0 and c["http_delayed"] > 0 for c in counters)
    assert caplog.text.count("injecting network faults") == n


async def test_nodes_join_a_lossy_network_through_overlay_refreshes():
    """A node whose identity check of another was lost keeps it out of its routing table until
    something makes it check again: a refresh here (the default interval is 60 s)."""
    n = 4
    manifest = RunManifest.build("lossy", {}, [TensorSpec("w", "float32", (4,))])
    plan = FaultPlan(seed=1, loss=0.05, delay_s=0.02)  # without refreshes, most seeds lose one
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(n):
            config = node_config(i, bootstrap=(nodes[0].overlay.addr,) if nodes else ())
            overlay = dataclasses.replace(config.overlay, refresh_interval_s=0.5)
            config = dataclasses.replace(config, overlay=overlay, faults=plan)
            nodes.append(await stack.enter_async_context(Node(config, manifest)))
        await asyncio.gather(*(node.wait_for_peers(n - 1, timeout_s=10) for node in nodes))


@contextlib.asynccontextmanager
async def seeded_nodes(n: int, manifest: RunManifest, **changes):
    """A seed on 127.0.0.9 in no partition group, and n nodes joined through it; every overlay
    refreshes twice a second (the default is once a minute)."""
    refreshing = dataclasses.replace(FAST_OVERLAY, refresh_interval_s=0.5, refresh_after_join=True)
    seed_overlay = dataclasses.replace(refreshing, listen=Address("127.0.0.9", 0))
    async with contextlib.AsyncExitStack() as stack:
        seed = KademliaOverlay(seed_overlay, NodeKey.generate(), role="seed")
        await stack.enter_async_context(seed)
        nodes: list[Node] = []
        for i in range(n):
            config = node_config(i, bootstrap=(seed.addr,), faults=FaultPlan(), **changes)
            overlay = dataclasses.replace(refreshing, listen=config.overlay.listen)
            config = dataclasses.replace(config, overlay=overlay)
            nodes.append(await stack.enter_async_context(Node(config, manifest)))
        await asyncio.gather(*(node.wait_for_peers(n - 1, timeout_s=10) for node in nodes))
        yield nodes


async def train_until(node, stop: asyncio.Event) -> None:
    step = 0
    while not stop.is_set():
        await node.barrier(timeout_s=20)
        node.take_deltas()
        await node.publish(step, BLOBS)
        step += 1
        await asyncio.sleep(0.01)  # the step's compute


async def test_nodes_split_by_a_partition_rejoin_when_it_heals_and_steps_converge():
    n, staleness = 4, 2
    manifest = RunManifest.build("split", {}, [TensorSpec("w", "float32", (4,))])
    async with seeded_nodes(n, manifest, barrier="pssp", staleness=staleness) as nodes:
        hosts = [node.overlay.addr.host for node in nodes]
        split = Partition(time.time(), float("inf"), (tuple(hosts[:2]), tuple(hosts[2:])))
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for node in nodes:
                group.create_task(train_until(node, stop))
            try:
                for node in nodes:
                    node.faults.replace(FaultPlan(partitions=(split,)))
                await wait_until(lambda: all(len(node.peers.live()) == 1 for node in nodes))
                for node in nodes:  # as a chaos script rewriting the plan file
                    node.faults.replace(FaultPlan())
                await wait_until(lambda: all(len(node.peers.live()) == n - 1 for node in nodes), 10)
                healed = [node.step for node in nodes]
                await wait_until(
                    lambda: all(
                        node.step >= h + 2 * staleness
                        for node, h in zip(nodes, healed, strict=True)
                    )
                )
                steps = [node.step for node in nodes]
            finally:
                stop.set()
    assert max(steps) - min(steps) <= staleness + 1, steps
    assert sum(node.faults.counters["partitioned"] for node in nodes) > 0


async def test_worker_duplicates_its_pushes_and_control_messages_and_still_trains():
    from test_server import parameter_server, tiny_model, train_all, workers  # torch

    from p2pml.train.tensors import run_manifest

    steps, n = 6, 2
    model = tiny_model()
    manifest = run_manifest("dup", model, {"barrier": "asp"})
    plan = FaultPlan(duplicate=1.0, delay_s=0.005)
    async with (
        parameter_server(manifest, model, barrier="asp", min_peers=n) as server,
        workers(n, manifest, server.data.addr, barrier="asp", faults=plan) as ws,
    ):
        results = await train_all(ws, [tiny_model() for _ in range(n)], steps)
        await server.wait_finished(timeout_s=10)
    assert [r.steps for r in results] == [steps] * n
    for worker in ws:
        assert worker.faults is not None
        assert worker.faults.counters["http_duplicated"] >= steps
    # The server refuses each copy as a second delta of a step it has (as stale), never
    # applying one twice.
    assert server.counters["deltas_received"] == steps * n
    assert server.counters["rejected_stale"] == steps * n
