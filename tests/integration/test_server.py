"""The centralised mode on loopback: a parameter server and its workers in one process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from nodes import cluster, node_config
from test_node import (
    endless_batches,
    node_batches,
    reference,
    sgd,
    tiny_model,
    wait_until,
)

from p2pml.core.types import Address
from p2pml.errors import PeerRejected, PeerUnreachable
from p2pml.io.http import DataPlaneClient
from p2pml.io.modelfile import load_latest
from p2pml.node.server import CHECKPOINT_PREFIX, ParameterServer
from p2pml.node.worker import Worker
from p2pml.protocol.auth import Authenticator
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import DeltaPush, Register, TensorBlob
from p2pml.train.loop import Trainer
from p2pml.train.tensors import run_manifest, trainable

pytestmark = pytest.mark.integration

FAST = {
    "heartbeat_interval_s": 0.1,
    "heartbeat_timeout_s": 0.6,
    "poll_s": 1.0,
    "server_timeout_s": 5.0,
}


def server_params(model: torch.nn.Module) -> list[TensorBlob]:
    return [TensorBlob(n, p.detach().numpy()) for n, p in trainable(model)]


def config(index: int, **changes: object):
    return node_config(index, **{**FAST, **changes})


@contextlib.asynccontextmanager
async def parameter_server(manifest, model, **changes):
    extra = {k: changes.pop(k) for k in ("checkpoint_dir", "on_update", "version") if k in changes}
    cfg = config(0, **changes)
    async with ParameterServer(cfg, manifest, server_params(model), **extra) as server:
        yield server


@contextlib.asynccontextmanager
async def workers(n, manifest, server_addr, *, first=1, keys=None, **changes):
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(n):
            key = keys[i] if keys else None
            worker = Worker(config(first + i, **changes), manifest, server_addr, key=key)
            out.append(await stack.enter_async_context(worker))
        yield out


async def train_all(ws, models, steps, batches=node_batches, slow_s=0.0):
    async with contextlib.AsyncExitStack() as stack:
        trainers = [
            await stack.enter_async_context(Trainer(w, m, sgd(m), slow_s=slow_s))
            for w, m in zip(ws, models, strict=True)
        ]
        return await asyncio.wait_for(
            asyncio.gather(
                *(t.train(batches(i, steps), steps=steps) for i, t in enumerate(trainers))
            ),
            timeout=60,
        )


def assert_same_params(got_model, want_model):
    for (name, got), want in zip(
        got_model.named_parameters(), want_model.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


# -- equivalence ----------------------------------------------------------------------------------


async def test_bsp_server_with_four_workers_equals_single_process_sgd_and_peer_mode():
    steps, n = 20, 4
    server_model = tiny_model()
    manifest = run_manifest("equiv", server_model, {"barrier": "bsp", "lr": 0.1})
    worker_models = [tiny_model() for _ in range(n)]
    async with (
        parameter_server(manifest, server_model, barrier="bsp", min_peers=n) as server,
        workers(n, manifest, server.data.addr, barrier="bsp") as ws,
    ):
        results = await train_all(ws, worker_models, steps)
        await server.wait_finished(timeout_s=10)
    peer_models = [tiny_model() for _ in range(n)]
    async with cluster(n, manifest, first=10, barrier="bsp") as nodes:
        await train_all(nodes, peer_models, steps)

    expected = reference(steps, n)
    assert_same_params(server_model, expected)
    assert_same_params(server_model, peer_models[0])
    for model in worker_models:  # each worker ends holding the server's final model
        assert_same_params(model, server_model)
    assert [r.steps for r in results] == [steps] * n
    assert server.version == steps  # one update per BSP round
    assert server.staleness.n == steps * n and server.staleness.max == 0
    assert server.counters["deltas_received"] == steps * n
    assert server.counters.get("deltas_rejected", 0) == 0


async def test_a_worker_pulls_the_model_only_when_its_version_changed():
    model = tiny_model()
    manifest = run_manifest("pull", model, {})
    async with (
        parameter_server(manifest, model, barrier="asp") as server,
        workers(1, manifest, server.data.addr) as (w,),
    ):
        first = await w.inputs()
        again = await w.inputs()
        assert first.model is not None and first.model.version == 0
        assert again.model is None and w.counters["models_unchanged"] == 1
        assert server.counters["models_unchanged"] == 1


# -- staleness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("barrier", "stale"), [("asp", True), ("bsp", False)])
async def test_staleness_is_measured_per_push(barrier, stale):
    n, steps = 3, 12
    server_model = tiny_model()
    manifest = run_manifest("stale", server_model, {"barrier": barrier})
    lines = []
    async with (
        parameter_server(
            manifest, server_model, barrier=barrier, min_peers=n, on_update=lines.append
        ) as server,
        workers(n, manifest, server.data.addr, barrier=barrier) as ws,
    ):
        await train_all(ws, [tiny_model() for _ in range(n)], steps)
        await server.wait_finished(timeout_s=10)
    stats = server.summary()["staleness"]
    assert stats["n"] == n * steps
    assert (stats["max"] > 0) is stale
    assert sum(len(line.staleness) for line in lines) == n * steps
    assert all(line.version == i + 1 for i, line in enumerate(lines))


# -- refusals -------------------------------------------------------------------------------------


async def test_a_worker_of_another_run_is_refused_with_a_clear_message():
    model = tiny_model()
    manifest = run_manifest("mine", model, {"lr": 0.1})
    other = run_manifest("mine", model, {"lr": 0.2})
    async with parameter_server(manifest, model) as server:
        with pytest.raises(PeerRejected, match="manifest") as info:
            async with workers(1, other, server.data.addr):
                pass
        assert info.value.code == "other_run"
        assert server.counters["rejected_other_run"] == 1
        assert not server.machine.workers


def bad_delta(model, sender, **overrides):
    blobs = []
    for name, param in model.named_parameters():
        array = overrides.get(name, np.full(tuple(param.shape), 0.5, dtype=np.float32))
        blobs.append(TensorBlob.of(name, array))
    return tuple(blobs)


@pytest.mark.parametrize(
    ("case", "code"),
    [("nan", "nonfinite"), ("shape", "shape"), ("unregistered", "unknown_worker")],
)
async def test_bad_deltas_are_refused_counted_and_never_reach_the_model(case, code):
    model = tiny_model()
    manifest = run_manifest("bad", model, {})
    before = [p.detach().clone() for p in model.parameters()]
    async with (
        parameter_server(manifest, model, barrier="asp") as server,
        workers(1, manifest, server.data.addr) as (w,),
        contextlib.AsyncExitStack() as stack,
    ):
        name = next(iter(dict(model.named_parameters())))
        shape = tuple(dict(model.named_parameters())[name].shape)
        overrides = {
            "nan": {name: np.full(shape, np.nan, dtype=np.float32)},
            "shape": {name: np.zeros((2, 2), dtype=np.float32)},
            "unregistered": {},
        }[case]
        client = w.client
        if case == "unregistered":  # a valid key that never registered
            stranger = Authenticator(NodeKey.generate())
            client = await stack.enter_async_context(DataPlaneClient(w.config.data, auth=stranger))
        sender = client.auth.key.peer_id
        msg = DeltaPush(manifest.tag, sender, 0, 0, bad_delta(model, sender, **overrides))
        with pytest.raises(PeerRejected) as info:
            await client.push_delta(server.data.addr, msg)
        assert info.value.code == code
        await server.flush()
        assert server.counters[f"rejected_{code}"] == 1
        assert server.version == 0
    for got, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(got, want)


# -- liveness -------------------------------------------------------------------------------------


async def test_a_dead_worker_is_evicted_so_bsp_finishes_and_a_restarted_worker_rejoins():
    n, steps = 3, 30
    server_model = tiny_model()
    manifest = run_manifest("evict", server_model, {"barrier": "bsp"})
    keys = [NodeKey.generate() for _ in range(n)]
    models = [tiny_model() for _ in range(n)]
    async with (
        parameter_server(manifest, server_model, barrier="bsp", min_peers=n) as server,
        workers(n - 1, manifest, server.data.addr, keys=keys[:-1]) as alive,
    ):
        async with contextlib.AsyncExitStack() as stack:
            survivors = [
                await stack.enter_async_context(Trainer(w, m, sgd(m), slow_s=0.01))
                for w, m in zip(alive, models[:-1], strict=True)
            ]
            runs = [
                asyncio.create_task(t.train(endless_batches(i), steps=steps))
                for i, t in enumerate(survivors)
            ]
            # the third worker trains a few steps, then dies without a word (its heartbeats stop)
            doomed_stack = contextlib.AsyncExitStack()
            doomed = await doomed_stack.enter_async_context(
                Worker(config(9), manifest, server.data.addr, key=keys[-1])
            )
            doomed_trainer = await doomed_stack.enter_async_context(
                Trainer(doomed, models[-1], sgd(models[-1]), slow_s=0.01)
            )
            dying = asyncio.create_task(doomed_trainer.train(endless_batches(9), steps=steps))
            await wait_until(lambda: doomed.step >= 3)
            dying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dying
            await doomed_stack.aclose()
            await wait_until(lambda: server.counters["evictions"] == 1, timeout_s=10)
            assert keys[-1].peer_id not in server.machine.workers

            # restarted with the same key, it rejoins at the run's current step
            at_rejoin = min(w.step for w in alive)
            fresh = tiny_model(seed=5)
            async with (
                Worker(config(9), manifest, server.data.addr, key=keys[-1]) as back,
                Trainer(back, fresh, sgd(fresh), slow_s=0.01) as trainer,
            ):
                assert back.step >= at_rejoin > 3
                result = await asyncio.wait_for(trainer.train(endless_batches(9), steps=steps), 60)
            done = await asyncio.wait_for(asyncio.gather(*runs), 60)
        await server.wait_finished(timeout_s=10)
    assert [r.steps for r in done] == [steps, steps] and result.steps == steps
    assert result.start_step >= at_rejoin
    assert_same_params(fresh, server_model)  # it trained from the server's model, not its own


async def test_a_worker_whose_server_is_gone_fails_with_a_clear_error_after_retrying():
    model = tiny_model()
    manifest = run_manifest("gone", model, {})
    async with parameter_server(manifest, model) as server:
        addr = server.data.addr
        async with workers(1, manifest, addr, server_timeout_s=0.5):
            pass
    cfg = config(1, server_timeout_s=0.5)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(PeerUnreachable, match=r"unreachable for 0.5 s during registration"):
        async with Worker(cfg, manifest, addr):
            pass
    assert 0.3 < loop.time() - began < 5


# -- checkpoints ----------------------------------------------------------------------------------


async def test_a_restarted_server_resumes_from_its_checkpoint_and_its_workers_reconnect(tmp_path):
    n, steps = 2, 40
    model = tiny_model()
    manifest = run_manifest("restart", model, {"barrier": "ssp"})
    keys = [NodeKey.generate() for _ in range(n)]
    models = [tiny_model() for _ in range(n)]
    first = parameter_server(
        manifest, model, barrier="ssp", min_peers=n, checkpoint_every=5, checkpoint_dir=tmp_path
    )
    server = await first.__aenter__()
    addr = server.data.addr
    async with (
        workers(n, manifest, addr, keys=keys, barrier="ssp", server_timeout_s=20) as ws,
        contextlib.AsyncExitStack() as stack,
    ):
        trainers = [
            await stack.enter_async_context(Trainer(w, m, sgd(m), slow_s=0.01))
            for w, m in zip(ws, models, strict=True)
        ]
        runs = [
            asyncio.create_task(t.train(endless_batches(i), steps=steps))
            for i, t in enumerate(trainers)
        ]
        await wait_until(lambda: server.version >= 12)
        await first.__aexit__(None, None, None)  # the server goes away mid-run
        found = load_latest(tmp_path, CHECKPOINT_PREFIX, manifest.tag)
        assert found is not None
        saved = found[1]
        assert saved.version >= 10 and saved.version % 5 == 0

        restored = tiny_model(seed=3)
        from p2pml.train.tensors import load_blobs

        load_blobs(trainable(restored), saved.tensors)
        again = dataclasses.replace(
            config(0, barrier="ssp", min_peers=n),
            data=dataclasses.replace(config(0).data, listen=Address(addr.host, addr.port)),
        )
        async with ParameterServer(
            again, manifest, server_params(restored), version=saved.version
        ) as second:
            results = await asyncio.wait_for(asyncio.gather(*runs), 60)
            await second.wait_finished(timeout_s=10)
    assert [r.steps for r in results] == [steps] * n
    assert all(w.counters["reregistered"] >= 1 for w in ws)
    assert second.version > saved.version
    assert second.summary()["workers_registered"] == n


async def test_register_messages_of_another_run_never_enter_the_table():
    model = tiny_model()
    manifest = run_manifest("table", model, {})
    async with parameter_server(manifest, model) as server:
        async with workers(1, manifest, server.data.addr) as (w,):
            with pytest.raises(PeerRejected, match="in run 'else'"):
                await w.client.control(server.data.addr, Register("else@0000", w.peer_id, 0))
            with pytest.raises(PeerRejected) as forged:  # an ID that is not the sealing key's
                await w.client.control(
                    server.data.addr, Register(manifest.tag, NodeKey.generate().peer_id, 0)
                )
            assert forged.value.code == "forged"
        assert len(server.machine.workers) == 1
