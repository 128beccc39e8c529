"""``GET /metrics`` on loopback: peer-mode nodes and a parameter server, scraped and parsed with the
Prometheus text parser, the values checked against what the nodes did."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import numpy as np
import pytest
from nodes import cluster, node_config
from prometheus_client.parser import text_string_to_metric_families

from p2pml.core.config import DataPlaneConfig
from p2pml.core.run import RunManifest, TensorSpec
from p2pml.core.types import Address
from p2pml.errors import PeerRejected
from p2pml.io.http import METRICS_CONTENT_TYPE, DataPlaneServer
from p2pml.node.server import ParameterServer
from p2pml.node.worker import Worker
from p2pml.protocol.messages import DeltaPush, TensorBlob

pytestmark = pytest.mark.integration

MANIFEST = RunManifest.build("metrics", {"lr": 0.1}, [TensorSpec("w", "float32", (4,))])
WORKER_CONFIG = {
    "heartbeat_interval_s": 0.1,
    "heartbeat_timeout_s": 0.6,
    "poll_s": 1.0,
    "server_timeout_s": 5.0,
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def delta(value: float = 0.5, shape: tuple[int, ...] = (4,)) -> tuple[TensorBlob, ...]:
    return (TensorBlob.of("w", np.full(shape, value, np.float32)),)


async def scrape(addr: Address) -> Samples:
    """Every sample of ``GET /metrics`` at `addr`, parsed by the Prometheus text parser."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{addr}/metrics") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == METRICS_CONTENT_TYPE
        text = await reply.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (counters, no event to await)
            await asyncio.sleep(0.005)


# -- peer mode ------------------------------------------------------------------------------------


async def two_bsp_steps(nodes) -> None:
    for step in range(2):
        await asyncio.gather(*(n.barrier(timeout_s=5) for n in nodes))
        await asyncio.gather(*(n.publish(step, delta()) for n in nodes))


async def test_node_metrics_report_steps_deltas_and_barrier_waits():
    async with cluster(2, MANIFEST, barrier="bsp") as nodes:
        await two_bsp_steps(nodes)
        nodes[0].record_loss(1, 0.25)
        got = await scrape(nodes[0].server.addr)
        me = nodes[0]
        assert value(got, "p2pml_step") == 2
        assert value(got, "p2pml_loss") == 0.25 and value(got, "p2pml_loss_step") == 1
        assert value(got, "p2pml_deltas_total", direction="out") == 2
        assert value(got, "p2pml_deltas_total", direction="in") == 2
        assert value(got, "p2pml_barrier_wait_seconds_count") == 2
        assert value(got, "p2pml_barrier_wait_seconds_sum") == pytest.approx(
            sum(r.wait_s for r in me.waits)
        )
        assert value(got, "p2pml_sampled_peers") == 1  # bsp asks every live peer: the other one
        assert value(got, "p2pml_barrier_queries_total", outcome="answered") >= 2
        assert value(got, "p2pml_live_peers") == 1
        assert value(
            got, "p2pml_node_info", peer_id=me.peer_id.hex(), run=MANIFEST.tag, role="peer"
        )


async def test_node_metrics_report_the_population_estimate_and_dht_contacts():
    async with cluster(3, MANIFEST) as nodes:
        got = await scrape(nodes[1].server.addr)
        assert value(got, "p2pml_population_estimate") == nodes[1].n_hat() == 3.0
        assert value(got, "p2pml_dht_contacts") == len(nodes[1].overlay.contacts()) == 2


async def test_node_metrics_count_data_plane_bytes_by_direction_and_route():
    async with cluster(2, MANIFEST, barrier="bsp") as nodes:
        await two_bsp_steps(nodes)
        got = await scrape(nodes[0].server.addr)
    payload_bytes = 2 * delta()[0].nbytes  # two deltas each way, each with its header on top
    assert value(got, "p2pml_data_bytes_total", direction="out", route="/v1/delta") > payload_bytes
    assert value(got, "p2pml_data_bytes_total", direction="in", route="/v1/delta") > payload_bytes


async def test_node_metrics_count_refusals_by_reason_on_both_sides():
    async with cluster(2, MANIFEST, staleness=1) as (sender, receiver):
        receiver.resume_at(10)  # the sender's delta of step 0 is then 9 steps old
        report = await sender.publish(0, delta())
        assert report.n_failed == 1
        bad = DeltaPush(MANIFEST.tag, sender.peer_id, 0, 0, delta(shape=(5,)))
        with pytest.raises(PeerRejected, match="shape"):
            await sender.client.push_delta(receiver.server.addr, bad)
        async with aiohttp.ClientSession() as session:
            url = f"http://{receiver.server.addr}/v1/delta"
            async with session.post(url, data=b"\xc1 not a frame") as reply:
                assert reply.status == 400
        theirs, ours = await scrape(receiver.server.addr), await scrape(sender.server.addr)
    assert value(theirs, "p2pml_rejections_total", reason="stale") == 1
    assert value(theirs, "p2pml_rejections_total", reason="shape") == 1
    assert value(theirs, "p2pml_rejections_total", reason="bad_frame") == 1
    assert value(theirs, "p2pml_deltas_total", direction="in") == 0
    assert value(ours, "p2pml_push_failures_total", reason="stale") == 1
    assert value(ours, "p2pml_push_failures_total", reason="unreachable") == 0


# -- the data plane route -------------------------------------------------------------------------


class NoHandler:
    async def on_delta(self, msg):
        raise AssertionError("no delta expected")

    async def on_model_request(self, msg):
        raise AssertionError("no model request expected")

    def info(self):
        return {}


@pytest.mark.parametrize("has_metrics", [True, False])
async def test_data_plane_serves_metrics_only_when_given_a_callable(has_metrics):
    config = DataPlaneConfig(listen=Address("127.0.0.1", 0))
    metrics = (lambda: b"p2pml_up 1\n") if has_metrics else None
    async with (
        DataPlaneServer(config, NoHandler(), metrics=metrics) as server,
        aiohttp.ClientSession() as session,
        session.get(f"http://{server.addr}/metrics") as reply,
    ):
        assert reply.status == (200 if has_metrics else 404)
        if has_metrics:
            assert reply.headers["Content-Type"] == METRICS_CONTENT_TYPE
            assert await reply.read() == b"p2pml_up 1\n"


# -- parameter server -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server_and_workers(n_workers: int, **changes):
    params = [TensorBlob.of("w", np.zeros(4, np.float32))]
    config = node_config(0, **{**WORKER_CONFIG, **changes})
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(ParameterServer(config, MANIFEST, params))
        workers = [
            await stack.enter_async_context(
                Worker(node_config(i + 1, **WORKER_CONFIG, **changes), MANIFEST, server.data.addr)
            )
            for i in range(n_workers)
        ]
        yield server, workers


async def train_steps(worker: Worker, steps: int) -> None:
    for step in range(steps):
        await worker.barrier(timeout_s=5)
        await worker.inputs()
        await worker.publish(step, delta())


async def test_server_metrics_report_version_workers_updates_and_staleness():
    async with server_and_workers(2, barrier="asp") as (server, workers):
        await asyncio.gather(*(train_steps(w, 3) for w in workers))
        bad = DeltaPush(MANIFEST.tag, workers[0].peer_id, 3, 0, delta(shape=(2, 2)))
        with pytest.raises(PeerRejected, match="shape"):
            await workers[0].client.push_delta(server.data.addr, bad)
        got = await scrape(server.data.addr)
        assert value(got, "p2pml_model_version") == server.version == 6
        assert value(got, "p2pml_workers_registered") == 2
        assert value(got, "p2pml_workers_live") == value(got, "p2pml_workers_training") == 2
        assert value(got, "p2pml_updates_total") == server.counters["updates"] == 6
        assert value(got, "p2pml_deltas_total", direction="in") == 6
        assert value(got, "p2pml_rejections_total", reason="shape") == 1
        assert value(got, "p2pml_delta_staleness_steps_count") == server.staleness.n == 6
        assert value(got, "p2pml_delta_staleness_steps_sum") == sum(
            k * n for k, n in server.staleness.histogram.items()
        )
        assert value(got, "p2pml_model_requests_total", reply="model") >= 2
        assert value(got, "p2pml_data_bytes_total", direction="in", route="/v1/delta") > 0
        assert value(
            got, "p2pml_node_info", peer_id=server.peer_id.hex(), run=MANIFEST.tag, role="server"
        )


async def test_server_metrics_count_evicted_workers():
    async with server_and_workers(2, barrier="asp") as (server, (stays, leaves)):
        await leaves.__aexit__(None, None, None)  # stops heartbeating without finishing
        await wait_until(lambda: server.counters["evictions"] == 1)
        got = await scrape(server.data.addr)
        assert value(got, "p2pml_evictions_total") == 1
        assert value(got, "p2pml_workers_live") == 1
        assert value(got, "p2pml_workers_registered") == 2
        assert stays.peer_id in server.machine.workers
