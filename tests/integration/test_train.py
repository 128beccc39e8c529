"""Training built-in models through real peer-mode nodes (Session, as ``p2pml run`` does)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from nodes import node_config

from p2pml.core.sampling import SampleSize
from p2pml.io.modelfile import load_model
from p2pml.train.session import Session

pytestmark = pytest.mark.integration


async def run_sessions(n: int, *, steps: int, tmp_path=None, **node_fields):
    """n Sessions on mnist-5k with the mlp, node 0 the others' entry point, shards i/n."""
    first: asyncio.Future = asyncio.get_running_loop().create_future()
    sessions = []
    for i in range(n):
        config = node_config(i, min_peers=n - 1, **node_fields)
        sessions.append(
            Session.build(
                config,
                run_id="converge",
                model="mlp",
                dataset="mnist-5k",
                lr=0.05,
                momentum=0.9,
                batch_size=64,
                seed=3,
                shard=(i, n),
            )
        )

    async def one(i: int, session: Session):
        if i > 0:
            addr = await first
            session.config = dataclasses.replace(session.config, bootstrap=(addr,))
        save = tmp_path / f"node{i}.p2pml" if tmp_path is not None else None
        ready = (lambda node: first.set_result(node.overlay.addr)) if i == 0 else None
        return await session.run(steps=steps, eval_every=0, on_ready=ready, save=save)

    return await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_four_nodes_with_pssp_reach_90_percent_on_mnist_5k(tmp_path):
    results = await run_sessions(
        4, steps=300, tmp_path=tmp_path, barrier="pssp", sample=SampleSize(count=2), staleness=4
    )
    accuracies = [r.final_accuracy for r in results]
    assert all(a is not None and a >= 0.90 for a in accuracies), accuracies
    assert all(r.counters["deltas_received"] > 0 for r in results)
    saved = load_model(tmp_path / "node0.p2pml")
    assert saved.step == 300 and saved.run_tag.startswith("converge@")
    assert [b.name for b in saved.tensors] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(torch.isfinite(torch.from_numpy(b.array.copy())).all() for b in saved.tensors)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_server_with_four_ssp_workers_reaches_90_percent_on_mnist_5k(tmp_path):
    n, steps = 4, 300

    def build(i: int, **fields) -> Session:
        config = node_config(i, barrier="ssp", staleness=4, **fields)
        return Session.build(
            config,
            run_id="central",
            model="mlp",
            dataset="mnist-5k",
            lr=0.05,
            momentum=0.9,
            batch_size=64,
            seed=3,
            shard=(i - 1, n) if i else None,
        )

    server_session = build(0, min_peers=n, checkpoint_every=100)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    lines = []
    serving = asyncio.create_task(
        server_session.serve(
            checkpoint_dir=tmp_path,
            on_update=lines.append,
            on_ready=lambda server: ready.set_result(server.data.addr),
        )
    )
    addr = await ready
    results = await asyncio.gather(
        *(build(i).run(steps=steps, server=addr) for i in range(1, n + 1))
    )
    summary = await asyncio.wait_for(serving, 30)
    assert summary["accuracy"] >= 0.90, summary
    assert summary["version"] == n * steps  # SSP applies each delta as it arrives
    stale = summary["staleness"]
    assert stale["n"] == n * steps and 0 < stale["mean"] < n * (4 + 1)
    assert all(r.steps == steps and r.final_accuracy >= 0.90 for r in results)
    assert len(lines) == n * steps
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "server-000000001100.p2pml",
        "server-000000001200.p2pml",
    ]
