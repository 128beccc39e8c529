"""Peer-mode nodes training together on loopback: equivalence, churn, finishing, bad input."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from nodes import cluster
from p2pml.core.sampling import SampleSize
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
