"""Peer-mode nodes training together on loopback: equivalence, churn, finishing, bad input."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch
from nodes import cluster, node_config

from p2pml.core.sampling import SampleSize
from p2pml.errors import BarrierTimeout, PeerRejected
from p2pml.node.node import Node
from p2pml.protocol.messages import NO_VERSION, DeltaPush, ModelRequest, TensorBlob
from p2pml.train.loop import Trainer
from p2pml.train.tensors import run_manifest

pytestmark = pytest.mark.integration

N_IN, N_OUT, BATCH = 6, 3, 8


def tiny_model(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(N_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, N_OUT)
        )


def node_batches(node_index: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1000 + node_index)
    return [
        (
            rng.standard_normal((BATCH, N_IN)).astype(np.float32),
            rng.integers(0, N_OUT, BATCH).astype(np.int64),
        )
        for _ in range(steps)
    ]


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def reference(steps: int, n_nodes: int) -> torch.nn.Module:
    """Single-process SGD with momentum on the union of every node's batch of each step."""
    model = tiny_model()
    opt = sgd(model)
    all_batches = [node_batches(i, steps) for i in range(n_nodes)]
    for t in range(steps):
        x = torch.cat([torch.from_numpy(all_batches[i][t][0]) for i in range(n_nodes)])
        y = torch.cat([torch.from_numpy(all_batches[i][t][1]) for i in range(n_nodes)])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


async def test_bsp_full_delivery_equals_single_process_sgd_on_the_union_of_batches():
    steps, n = 20, 4
    models = [tiny_model() for _ in range(n)]
    manifest = run_manifest("equiv", models[0], {"barrier": "bsp", "lr": 0.1})
    async with cluster(n, manifest, barrier="bsp") as nodes:
        trainers = [Trainer(node, m, sgd(m)) for node, m in zip(nodes, models, strict=True)]
        for t in trainers:
            await t.__aenter__()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(t.train(node_batches(i, steps), steps=steps) for i, t in enumerate(trainers))
                ),
                timeout=60,
            )
        finally:
            for t in trainers:
                await t.__aexit__(None, None, None)
    expected = reference(steps, n)
    assert [r.steps for r in results] == [steps] * n
    for model in models:
        for (name, got), want in zip(model.named_parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert all(r.counters["deltas_sent"] == steps * (n - 1) for r in results)
    assert all(r.counters.get("deltas_rejected", 0) == 0 for r in results)


# -- bad input ------------------------------------------------------------------------------------


def initial_params() -> list[torch.Tensor]:
    return [p.detach().clone() for p in tiny_model().parameters()]


def delta_like(model: torch.nn.Module, **overrides: np.ndarray) -> tuple[TensorBlob, ...]:
    blobs = []
    for name, param in model.named_parameters():
        array = overrides.get(name, np.full(tuple(param.shape), 0.5, dtype=np.float32))
        blobs.append(TensorBlob.of(name, array))
    return tuple(blobs)


BAD_DELTAS = {
    "wrong shape": ("shape", {"0.weight": np.zeros((8, 5), np.float32)}, {}),
    "wrong dtype": ("dtype", {"0.bias": np.zeros(8, np.float64)}, {}),
    "NaN values": ("nonfinite", {"2.bias": np.array([0.0, np.nan, 1.0], np.float32)}, {}),
    "infinite values": ("nonfinite", {"0.bias": np.full(8, np.inf, np.float32)}, {}),
    "sender ID not its key": ("forged", {}, {"sender": bytes(range(20))}),
    "stale model version": ("stale", {}, {"step": 2}),
    "another manifest": ("other_run", {}, {"run_id": "bad-input@0123456789abcdef"}),
}


@pytest.mark.parametrize("case", BAD_DELTAS)
async def test_bad_delta_is_refused_counted_and_never_reaches_the_model(case, caplog):
    code, tensors, fields = BAD_DELTAS[case]
    model = tiny_model()
    manifest = run_manifest("bad-input", model, {"barrier": "pssp"})
    async with (
        cluster(2, manifest, staleness=4) as (sender, receiver),
        Trainer(receiver, model, sgd(model)),
    ):
        receiver.resume_at(10)  # a delta of step 2 is then 7 steps old, over s = 4
        base = {"run_id": manifest.tag, "sender": sender.peer_id, "step": 9, "base_version": 9}
        msg = DeltaPush(**{**base, **fields}, tensors=delta_like(model, **tensors))
        with pytest.raises(PeerRejected) as refused:
            await sender.client.push_delta(receiver.server.addr, msg)
        assert refused.value.code == code
        assert receiver.counters[f"rejected_{code}"] == 1
        assert receiver.counters["deltas_rejected"] == 1
        assert receiver.take_deltas() == []
        assert "refused POST /v1/delta" in caplog.text
    for got, want in zip(model.parameters(), initial_params(), strict=True):
        assert torch.equal(got, want)


async def test_delta_from_a_node_the_run_does_not_know_is_refused_not_in_run():
    model = tiny_model()
    manifest = run_manifest("bad-input", model, {"barrier": "pssp"})
    async with (
        cluster(2, manifest) as (_, receiver),
        Node(node_config(7), manifest) as stranger,  # same manifest, never joined the DHT
    ):
        msg = DeltaPush(manifest.tag, stranger.peer_id, 0, 0, delta_like(model))
        with pytest.raises(PeerRejected) as refused:
            await stranger.client.push_delta(receiver.server.addr, msg)
        assert refused.value.code == "not_in_run"
        assert receiver.counters["rejected_not_in_run"] == 1
        assert receiver.take_deltas() == []


async def test_a_valid_delta_is_acknowledged_and_queued():
    model = tiny_model()
    manifest = run_manifest("good-input", model, {"barrier": "pssp"})
    async with cluster(2, manifest) as (sender, receiver):
        msg = DeltaPush(manifest.tag, sender.peer_id, 0, 0, delta_like(model))
        ack = await sender.client.push_delta(receiver.server.addr, msg)
        assert (ack.sender, ack.step) == (receiver.peer_id, 0)
        assert [m.sender for m in receiver.take_deltas()] == [sender.peer_id]


async def test_peer_with_another_manifest_is_refused_with_a_clear_message(caplog):
    model = tiny_model()
    ours = run_manifest("shared-id", model, {"lr": 0.1})
    theirs = run_manifest("shared-id", model, {"lr": 0.2})
    async with cluster(2, ours) as nodes:
        config = node_config(5, bootstrap=(nodes[0].overlay.addr,))
        async with Node(config, theirs) as stranger:
            await nodes[0].discover()
            assert stranger.peer_id not in nodes[0].peers.live()
            assert "manifest" in nodes[0].peers.strangers[stranger.peer_id]
            assert "refusing peer" in caplog.text
            msg = DeltaPush(theirs.tag, stranger.peer_id, 0, 0, delta_like(model))
            with pytest.raises(PeerRejected) as refused:
                await stranger.client.push_delta(nodes[0].server.addr, msg)
            assert refused.value.code == "other_run" and "manifest" in str(refused.value)
            request = ModelRequest(theirs.tag, stranger.peer_id, NO_VERSION)
            with pytest.raises(PeerRejected, match="other_run"):
                await stranger.client.pull_model(nodes[0].server.addr, request)


# -- churn ----------------------------------------------------------------------------------------


async def wait_until(condition, timeout_s: float = 20.0) -> None:
    """Poll `condition()` (a counter the nodes update) every few ms under a deadline."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (counters, no event to await)
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def trainers(nodes, models):
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Trainer(node, m, sgd(m), slow_s=0.002))
            for node, m in zip(nodes, models, strict=True)
        ]


def endless_batches(node_index: int):
    rng = np.random.default_rng(node_index)
    while True:
        yield (
            rng.standard_normal((BATCH, N_IN)).astype(np.float32),
            rng.integers(0, N_OUT, BATCH).astype(np.int64),
        )


async def test_node_joining_mid_run_starts_from_the_current_model_not_from_scratch():
    models = [tiny_model() for _ in range(4)]
    manifest = run_manifest("join", models[0], {"barrier": "pssp"})
    sample = SampleSize(count=2)
    async with (
        cluster(3, manifest, barrier="pssp", sample=sample) as nodes,
        trainers(nodes, models[:3]) as running,
    ):
        tasks = [
            asyncio.create_task(t.train(endless_batches(i), steps=400))
            for i, t in enumerate(running)
        ]
        await wait_until(lambda: min(n.step for n in nodes) >= 20)
        config = node_config(3, bootstrap=(nodes[0].overlay.addr,), barrier="pssp", sample=sample)
        async with (
            Node(config, manifest) as late,
            Trainer(late, models[3], sgd(models[3])) as t,
        ):
            start = await t.join()
            assert start >= 20 and late.step == start
            moved = [
                not torch.equal(a, b)
                for a, b in zip(models[3].parameters(), initial_params(), strict=True)
            ]
            assert all(moved), "the late node still holds the initial model"
            result = await asyncio.wait_for(t.train(endless_batches(3), steps=400), 60)
            assert result.start_step == start and result.steps == 400
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert [r.steps for r in results] == [400] * 3
    assert any(r.counters["deltas_received"] > 0 for r in results)


async def test_killing_one_of_six_nodes_mid_run_lets_the_others_train_and_finish():
    models = [tiny_model() for _ in range(6)]
    manifest = run_manifest("kill", models[0], {"barrier": "pssp"})
    async with (
        cluster(6, manifest, barrier="pssp", sample=SampleSize(count=2)) as nodes,
        trainers(nodes, models) as running,
    ):
        tasks = [
            asyncio.create_task(t.train(endless_batches(i), steps=150))
            for i, t in enumerate(running)
        ]
        await wait_until(lambda: nodes[5].step >= 30)
        tasks[5].cancel()  # the node vanishes: no finish, its sockets close
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[5]
        await nodes[5].__aexit__(None, None, None)
        results = await asyncio.wait_for(asyncio.gather(*tasks[:5]), 60)
    assert [r.steps for r in results] == [150] * 5
    # the dead node was noticed by missed RPCs: it is forgotten, not waited on
    assert all(nodes[5].peer_id not in n.peers.live() for n in nodes[:5])
    assert sum(n.counters["barrier_unanswered"] + n.counters["push_failed"] for n in nodes[:5])


async def test_finished_nodes_never_stall_a_bsp_run():
    models = [tiny_model() for _ in range(3)]
    manifest = run_manifest("finish", models[0], {"barrier": "bsp"})
    async with cluster(3, manifest, barrier="bsp") as nodes, trainers(nodes, models) as running:
        short, *long = [
            t.train(endless_batches(i), steps=10 if i == 0 else 40) for i, t in enumerate(running)
        ]
        results = await asyncio.wait_for(asyncio.gather(short, *long), 30)
    assert [r.steps for r in results] == [10, 40, 40]
    assert all(n.peers.peers[nodes[0].peer_id].done for n in nodes[1:])


async def test_beyond_full_delivery_deltas_fan_out_and_models_are_averaged():
    models = [tiny_model() for _ in range(4)]
    manifest = run_manifest("gossip", models[0], {"barrier": "pssp"})
    async with (
        cluster(
            4,
            manifest,
            barrier="pssp",
            sample=SampleSize(count=1),
            full_delivery_max=2,
            fanout=1,
            average_every=5,
        ) as nodes,
        trainers(nodes, models) as running,
    ):
        assert all(n.gossiping and n.weight() == 0.5 for n in nodes)
        results = await asyncio.wait_for(
            asyncio.gather(*(t.train(endless_batches(i), steps=30) for i, t in enumerate(running))),
            30,
        )
    for r in results:
        assert r.counters["deltas_sent"] <= 30  # one target per step, not three
        assert r.counters["model_averages"] >= 1


async def test_torch_runs_only_in_the_compute_thread():
    import threading

    models = [tiny_model() for _ in range(2)]
    seen: set[str] = set()
    for m in models:
        m.register_forward_hook(lambda *_: seen.add(threading.current_thread().name))
    manifest = run_manifest("threads", models[0], {})
    async with cluster(2, manifest, barrier="bsp") as nodes, trainers(nodes, models) as running:
        await asyncio.gather(*(t.train(endless_batches(i), steps=5) for i, t in enumerate(running)))
    assert seen and all(name.startswith("p2pml-compute") for name in seen), seen


async def test_a_barrier_that_times_out_raises_and_the_next_wait_starts_afresh():
    model = tiny_model()
    manifest = run_manifest("timeout", model, {})
    async with cluster(2, manifest, barrier="bsp") as (ahead, behind):
        ahead.resume_at(3)  # its peer is still at step 0: BSP must wait
        with pytest.raises(BarrierTimeout, match="before step 3"):
            await ahead.barrier(timeout_s=0.2)
        behind.resume_at(3)
        record = await ahead.barrier(timeout_s=5)
        assert record.step == 3 and record.n_checks >= 1


async def test_a_second_delta_of_the_same_sender_and_step_is_refused_as_duplicate():
    model = tiny_model()
    manifest = run_manifest("dup", model, {"barrier": "pssp"})
    async with cluster(2, manifest) as (sender, receiver):
        msg = DeltaPush(manifest.tag, sender.peer_id, 0, 0, delta_like(model))
        await sender.client.push_delta(receiver.server.addr, msg)
        with pytest.raises(PeerRejected) as refused:  # a new seal: not a replay, a duplicate
            await sender.client.push_delta(receiver.server.addr, msg)
        assert (refused.value.status, refused.value.code) == (409, "duplicate")
        assert receiver.counters["rejected_duplicate"] == 1
        assert len(receiver.take_deltas()) == 1
        bad = DeltaPush(
            manifest.tag,
            sender.peer_id,
            1,
            0,
            delta_like(model, **{"0.bias": np.full(8, np.nan, np.float32)}),
        )
        with pytest.raises(PeerRejected) as nonfinite:
            await sender.client.push_delta(receiver.server.addr, bad)
        assert nonfinite.value.code == "nonfinite"
        good = DeltaPush(manifest.tag, sender.peer_id, 1, 0, delta_like(model))
        await sender.client.push_delta(receiver.server.addr, good)  # a refused one reserves nothing
        assert len(receiver.take_deltas()) == 1
