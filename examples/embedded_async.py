"""Three peer-mode nodes train a numpy linear regression with the asyncio API of `Node`; no torch.

    python examples/embedded_async.py [--steps 100] [--nodes 3]

For programs that already run an event loop: ``async with Node(config, manifest) as node`` and
drive the step protocol yourself (the same one `p2pml.train.loop.Trainer` drives for torch):

    await node.barrier()                 # may this node start its next step?
    inputs = await node.inputs()         # the peers' deltas that are due, and their weight 1/P
    w += weight * delta, for each delta  # then compute this step's update u on w
    w += weight * u                      # keep 1/P of your own update ...
    await node.publish(step, [u])        # ... and push all of it to the peers

With BSP and delivery to every node, every node ends each step with the mean of the nodes'
updates (synchronous data-parallel SGD). Each node holds its own shard of synthetic data; the
script prints each node's held-out loss before and after, and how far the nodes' models differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import numpy as np
import numpy.typing as npt

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig
from p2pml.core.types import Address
from p2pml.log import setup_logging
from p2pml.node.arrays import numpy_manifest
from p2pml.node.node import Node
from p2pml.protocol.messages import TensorBlob

Array = npt.NDArray[np.float32]
DIM, BATCH, LR = 8, 32, 0.05


def make_data(seed: int, n: int) -> tuple[Array, Array]:
    """y = x . w_true + noise, with the same w_true for every node."""
    w_true = np.linspace(-2.0, 2.0, DIM, dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    noise = 0.1 * rng.standard_normal(n).astype(np.float32)
    return x, x @ w_true + noise


def loss(w: Array, x: Array, y: Array) -> float:
    return float(np.mean((x @ w - y) ** 2))


def sgd_update(w: Array, x: Array, y: Array) -> Array:
    """-lr times the gradient of the mean squared error: this node's change of one step."""
    return (-LR * (2.0 / len(y)) * (x.T @ (x @ w - y))).astype(np.float32, copy=False)


async def train(node: Node, data: tuple[Array, Array], steps: int) -> Array:
    x, y = data
    w = np.zeros(DIM, np.float32)  # every node starts from the same parameters
    weight = 1.0
    for step in range(steps):
        await node.barrier()
        inputs = await node.inputs()
        weight = inputs.weight
        for delta in inputs.deltas:  # the peers' updates of the previous step
            w += weight * np.asarray(delta.tensors[0].array, np.float32)
        rows = slice((step * BATCH) % len(y), (step * BATCH) % len(y) + BATCH)
        update = sgd_update(w, x[rows], y[rows])  # tiny; offload a real model's compute
        w += weight * update
        await node.publish(step, [TensorBlob.of("w", update)])
    await node.barrier()  # wait until the peers are done too, then apply their last deltas
    for delta in (await node.inputs()).deltas:
        w += weight * np.asarray(delta.tensors[0].array, np.float32)
    await node.finish()
    return w


async def main(steps: int, n_nodes: int) -> None:
    manifest = numpy_manifest("embedded-async", {"w": np.zeros(DIM, np.float32)}, {"lr": LR})
    shards = [make_data(seed=i, n=512) for i in range(n_nodes)]
    x_test, y_test = make_data(seed=999, n=1000)
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(n_nodes):
            host = f"127.0.0.{2 + i}"
            config = NodeConfig(
                overlay=OverlayConfig(listen=Address(host, 0)),
                data=DataPlaneConfig(listen=Address(host, 0)),
                bootstrap=(nodes[0].overlay.addr,) if nodes else (),
                barrier="bsp",
                linger_s=0.2,
            )
            nodes.append(await stack.enter_async_context(Node(config, manifest)))
        for node in nodes:
            await node.wait_for_peers(n_nodes - 1, timeout_s=10)
        models = await asyncio.gather(
            *(train(node, shard, steps) for node, shard in zip(nodes, shards, strict=True))
        )
    before = loss(np.zeros(DIM, np.float32), x_test, y_test)
    print("node      steps  loss_before  loss_after")
    for node, w in zip(nodes, models, strict=True):
        print(f"{node.short_id}  {node.step:5d}  {before:11.4f}  {loss(w, x_test, y_test):10.4f}")
    spread = max(float(np.abs(w - models[0]).max()) for w in models)
    print(f"largest difference between the nodes' parameters: {spread:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    setup_logging(logging.WARNING)
    asyncio.run(main(args.steps, args.nodes))
