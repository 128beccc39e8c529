"""A parameter server and three workers train your own torch model, in one process.

    python examples/parameter_server.py [--steps 200] [--barrier ssp]

The server holds the model (numpy arrays it updates in place) and applies the barrier centrally
over its step table; each worker long-polls that barrier, pulls the model when its version
changed, trains one batch of its shard of scikit-learn's digits, and pushes the change. Prints
each worker's steps and the server's final accuracy and staleness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import torch

from p2pml.core.config import DataPlaneConfig
from p2pml.core.run import NodeConfig
from p2pml.core.types import Address
from p2pml.node.server import ParameterServer
from p2pml.node.worker import Worker
from p2pml.protocol.messages import TensorBlob
from p2pml.train.datasets import batches, load_dataset, shard
from p2pml.train.loop import Trainer, accuracy
from p2pml.train.tensors import run_manifest, trainable


def my_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the server and every worker start from the same parameters
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def config(i: int, barrier: str) -> NodeConfig:
    return NodeConfig(
        data=DataPlaneConfig(listen=Address(f"127.0.0.{2 + i}", 0)),
        barrier=barrier,
        staleness=2,
        min_peers=3,  # the server holds the first step until three workers came
    )


async def main(steps: int, barrier: str) -> None:
    data = load_dataset("digits")
    server_model = my_model()
    manifest = run_manifest("ps-example", server_model, {"lr": 0.1, "barrier": barrier})
    params = [TensorBlob(n, p.detach().numpy()) for n, p in trainable(server_model)]
    evaluate = lambda: accuracy(server_model, (data.x_test, data.y_test))  # noqa: E731
    async with (
        ParameterServer(config(0, barrier), manifest, params, evaluate=evaluate) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        jobs = []
        for i in range(3):
            worker = await stack.enter_async_context(
                Worker(config(1 + i, barrier), manifest, server.data.addr)
            )
            model = my_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            trainer = await stack.enter_async_context(Trainer(worker, model, optimizer))
            x, y = shard(data.x_train, data.y_train, i, 3, seed=0)
            jobs.append(trainer.train(batches(x, y, 32, seed=i), steps=steps))
        results = await asyncio.gather(*jobs)
        await server.wait_finished(timeout_s=30)
    print("worker  steps  waited_s")
    for i, result in enumerate(results):
        print(f"{i:6d}  {result.steps:5d}  {result.wait_s:8.2f}")
    stale = server.staleness
    print(
        f"server: model version {server.version}, accuracy {server.accuracy:.3f}, "
        f"staleness mean {stale.mean:.2f} max {stale.max}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--barrier", default="ssp")
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.barrier))
