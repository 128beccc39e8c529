"""Three peer-mode nodes train your own torch model together, in one process, with no server.

    python examples/three_nodes.py [--steps 200] [--barrier pssp]

Each node has its own loopback address and its own shard of scikit-learn's digits. Every step a
node waits at its barrier (sampling one peer's step), trains one batch in its compute thread, and
pushes the change straight to the other two, which apply it. Prints each node's final accuracy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import torch

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.node.node import Node
from p2pml.train.datasets import batches, load_dataset, shard
from p2pml.train.loop import Trainer
from p2pml.train.tensors import run_manifest


def my_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every node starts from the same parameters
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


async def main(steps: int, barrier: str) -> None:
    data = load_dataset("digits")
    models = [my_model() for _ in range(3)]
    manifest = run_manifest("three-nodes", models[0], {"lr": 0.1, "barrier": barrier})
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(3):
            host = f"127.0.0.{2 + i}"
            config = NodeConfig(
                overlay=OverlayConfig(listen=Address(host, 0)),
                data=DataPlaneConfig(listen=Address(host, 0)),
                bootstrap=(nodes[0].overlay.addr,) if nodes else (),
                barrier=barrier,
                sample=SampleSize(count=1),
                linger_s=0.2,
            )
            nodes.append(await stack.enter_async_context(Node(config, manifest)))
        for node in nodes:
            await node.wait_for_peers(2, timeout_s=10)
        jobs = []
        for i, (node, model) in enumerate(zip(nodes, models, strict=True)):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            trainer = await stack.enter_async_context(
                Trainer(node, model, optimizer, eval_data=(data.x_test, data.y_test))
            )
            x, y = shard(data.x_train, data.y_train, i, 3, seed=0)
            jobs.append(trainer.train(batches(x, y, 32, seed=i), steps=steps))
        results = await asyncio.gather(*jobs)
    print("node      steps  accuracy  waited_s  deltas_received")
    for node, result in zip(nodes, results, strict=True):
        print(
            f"{node.short_id}  {result.steps:5d}  {result.final_accuracy:8.3f}  "
            f"{result.wait_s:8.2f}  {result.counters.get('deltas_received', 0):15d}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--barrier", default="pssp")
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.barrier))
