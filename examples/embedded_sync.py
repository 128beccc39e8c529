"""Three edge programs train a numpy logistic regression through `EmbeddedNode`; no event loop in
the program and no torch anywhere.

    python examples/embedded_sync.py [--steps 100] [--nodes 3]

Each `EmbeddedNode` runs a peer-mode node on its own thread behind a synchronous API, so plain
threads (or a plain ``main()``) can train with it::

    with EmbeddedNode(config, manifest) as node:         # start() ... stop()
        for _ in range(steps):
            change = node.step({"w": update_w, "b": update_b})  # push, barrier, combine
            w += change["w"]; b += change["b"]

`step()` pushes this program's update to the peers, waits at the barrier, and returns the change
to add: with BSP the mean of every node's update, identical on every node. The script prints
each node's held-out loss and accuracy, and checks that torch was never imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

import numpy as np
import numpy.typing as npt

from p2pml import EmbeddedNode, NodeConfig, numpy_manifest
from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.types import Address
from p2pml.log import setup_logging

Array = npt.NDArray[np.float32]
DIM, BATCH, LR = 10, 32, 0.5


def make_data(seed: int, n: int) -> tuple[Array, Array]:
    """Two classes split by the same hyperplane for every node, with 5% of labels flipped."""
    w_true = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    y = (x @ w_true > 0).astype(np.float32)
    flip = rng.random(n) < 0.05
    y[flip] = 1.0 - y[flip]
    return x, y


def predict(params: dict[str, Array], x: Array) -> Array:
    z: Array = x @ params["w"] + params["b"]
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32, copy=False)


def evaluate(params: dict[str, Array], x: Array, y: Array) -> tuple[float, float]:
    """(log loss, accuracy)."""
    p = np.clip(predict(params, x), 1e-7, 1 - 1e-7)
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return log_loss, float(np.mean((p > 0.5) == (y > 0.5)))


def sgd_update(params: dict[str, Array], x: Array, y: Array) -> dict[str, Array]:
    """-lr times the gradient of the log loss on one batch."""
    error = predict(params, x) - y
    return {"w": -LR * (x.T @ error) / len(y), "b": -LR * np.mean(error, keepdims=True)}


def edge_program(
    node: EmbeddedNode, data: tuple[Array, Array], steps: int, out: dict[bytes, dict[str, Array]]
) -> None:
    """What runs on one device: its own model, its own data, synchronous calls only."""
    x, y = data
    params = {"w": np.zeros(DIM, np.float32), "b": np.zeros(1, np.float32)}
    for step in range(steps):
        rows = slice((step * BATCH) % len(y), (step * BATCH) % len(y) + BATCH)
        change = node.step(sgd_update(params, x[rows], y[rows]))
        for name, value in change.items():
            params[name] += value
    out[node.peer_id] = params


def main(steps: int, n_nodes: int) -> None:
    start = {"w": np.zeros(DIM, np.float32), "b": np.zeros(1, np.float32)}
    manifest = numpy_manifest("embedded-sync", start, {"barrier": "bsp", "lr": LR})
    x_test, y_test = make_data(seed=999, n=2000)
    nodes: list[EmbeddedNode] = []
    for i in range(n_nodes):
        host = f"127.0.0.{2 + i}"
        config = NodeConfig(
            overlay=OverlayConfig(listen=Address(host, 0)),
            data=DataPlaneConfig(listen=Address(host, 0)),
            bootstrap=(nodes[0].addr,) if nodes else (),
            barrier="bsp",
            linger_s=0.2,
        )
        nodes.append(EmbeddedNode(config, manifest))
        nodes[-1].start(timeout_s=10)
    results: dict[bytes, dict[str, Array]] = {}
    try:
        for node in nodes:
            node.wait_for_peers(n_nodes - 1, timeout_s=10)
        threads = [
            threading.Thread(target=edge_program, args=(node, make_data(i, 640), steps, results))
            for i, node in enumerate(nodes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for node in nodes:
            node.stop()
    loss0, _ = evaluate(start, x_test, y_test)
    print("node      steps  loss_before  loss_after  accuracy")
    for node in nodes:
        loss1, acc1 = evaluate(results[node.peer_id], x_test, y_test)
        short, steps_done = node.peer_id.hex()[:8], node.completed_steps
        print(f"{short}  {steps_done:5d}  {loss0:11.4f}  {loss1:10.4f}  {acc1:8.3f}")
    first = results[nodes[0].peer_id]
    same = all(np.array_equal(r[k], first[k]) for r in results.values() for k in first)
    print(f"identical parameters on every node: {same}")
    print(f"torch imported: {'torch' in sys.modules}")
    assert "torch" not in sys.modules, "an embedded numpy node must not import torch"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    setup_logging(logging.WARNING)
    main(args.steps, args.nodes)
