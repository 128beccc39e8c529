"""EmbeddedNode: real nodes on loopback driven from plain threads, training a numpy model."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from nodes import node_config

from p2pml.errors import BarrierTimeout, ConfigError, OverlayError
from p2pml.node.embed import EmbeddedNode, NodeStopped, numpy_manifest

pytestmark = pytest.mark.integration

DIM, BATCH, LR = 4, 16, 0.05
W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


def batch(node_index: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([node_index, step])
    x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    return x, x @ W_TRUE + np.float32(0.01) * rng.standard_normal(BATCH).astype(np.float32)


def sgd_update(w: np.ndarray, node_index: int, step: int) -> np.ndarray:
    x, y = batch(node_index, step)
    return -LR * (2.0 / BATCH) * (x.T @ (x @ w - y))


def manifest(run_id: str):
    return numpy_manifest(run_id, {"w": np.zeros(DIM, np.float32)}, {"barrier": "bsp", "lr": LR})


@contextlib.contextmanager
def embedded(n: int, run_id: str, *, first: int = 0, model=None, **changes):
    """n started EmbeddedNodes of one run, each knowing the others; stopped in reverse."""
    nodes: list[EmbeddedNode] = []
    try:
        for i in range(n):
            boot = (nodes[0].addr,) if nodes else ()
            config = node_config(first + i, bootstrap=boot, barrier="bsp", **changes)
            nodes.append(EmbeddedNode(config, manifest(run_id), model=model))
            nodes[-1].start(timeout_s=10)
        for node in nodes:
            node.wait_for_peers(n - 1, timeout_s=10)
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def in_threads(*jobs, timeout_s: float = 10.0) -> list:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result(timeout_s) for f in futures]


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_embedded_nodes_train_like_single_process_sgd_on_the_union_of_batches():
    steps, n = 12, 3

    def train(node: EmbeddedNode, index: int) -> np.ndarray:
        w = np.zeros(DIM, np.float32)
        for t in range(steps):
            w += node.step({"w": sgd_update(w, index, t)})["w"]
        return w

    with embedded(n, "embed-equiv") as nodes:
        jobs = [lambda node=node, i=i: train(node, i) for i, node in enumerate(nodes)]
        results = in_threads(*jobs)
        order = [i for _, i in sorted((node.peer_id, i) for i, node in enumerate(nodes))]
        assert [node.completed_steps for node in nodes] == [steps] * n
        assert all(node.counters["deltas_received"] == steps * (n - 1) for node in nodes)
    for w in results[1:]:
        assert np.array_equal(w, results[0])  # same deltas, same order: the same bits
    expected = np.zeros(DIM, np.float32)
    for t in range(steps):
        total = np.zeros(DIM, np.float32)
        for i in order:
            total += sgd_update(expected, i, t)
        expected += total / n
    np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(expected - W_TRUE) < np.linalg.norm(W_TRUE)


def test_embedded_node_stop_from_another_thread_unblocks_a_step_at_the_barrier():
    with embedded(2, "embed-stop", first=3) as (ahead, behind):
        errors: list[BaseException] = []

        def step_once() -> None:
            try:
                ahead.step({"w": np.ones(DIM, np.float32)})  # waits for `behind` under BSP
            except BaseException as exc:
                errors.append(exc)

        stepper = threading.Thread(target=step_once)
        stepper.start()
        wait_until(lambda: behind.counters.get("deltas_received", 0) == 1)
        ahead.stop(timeout_s=5)
        stepper.join(5)
        assert not stepper.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], NodeStopped), errors
        assert "stopped" in str(errors[0])
        assert not ahead.running
        ahead.stop()  # idempotent
        with pytest.raises(NodeStopped):
            ahead.step({"w": np.ones(DIM, np.float32)})


def test_embedded_node_barrier_timeout_keeps_its_type_and_its_update():
    ones, twos = np.ones(DIM, np.float32), np.full(DIM, 2.0, np.float32)
    with embedded(2, "embed-timeout", first=5) as (a, b):
        with pytest.raises(BarrierTimeout, match="before step 1"):
            a.step({"w": ones}, timeout_s=0.2)  # b has not stepped: a's update is kept
        got_a, (got_b0, got_b1) = in_threads(
            lambda: a.step({"w": 4 * ones}),
            lambda: (b.step({"w": twos}), b.step({"w": 8 * ones})),
        )
    np.testing.assert_array_equal(got_b0["w"] + got_b1["w"], got_a["w"])
    np.testing.assert_array_equal(got_a["w"], np.full(DIM, 7.5, np.float32))  # (1+4+2+8)/2


def test_embedded_node_loop_errors_reraise_with_their_type_and_leave_it_stopped():
    config = node_config(7, barrier="bsp", min_peers=3)
    node = EmbeddedNode(config, manifest("embed-alone"))
    with pytest.raises(OverlayError, match="found 0 of the 3"):
        node.start(timeout_s=0.3)
    assert not node.running
    with pytest.raises(NodeStopped):
        node.step({"w": np.zeros(DIM, np.float32)})


def test_embedded_node_rejects_an_update_that_does_not_match_the_manifest():
    with EmbeddedNode(node_config(8), manifest("embed-bad")) as node:
        with pytest.raises(ConfigError, match="shape"):
            node.step({"w": np.zeros(DIM + 1, np.float32)})
        with pytest.raises(ConfigError, match="finite"):
            node.step({"w": np.full(DIM, np.nan, np.float32)})
        with pytest.raises(ConfigError, match="parameters"):
            node.step({"v": np.zeros(DIM, np.float32)})
        assert node.completed_steps == 0


def test_embedded_node_step_before_start_is_a_clear_error():
    node = EmbeddedNode(node_config(9), manifest("embed-early"))
    with pytest.raises(RuntimeError, match="start"):
        node.step({"w": np.zeros(DIM, np.float32)})
    node.stop()  # a node never started stops at once


def test_embedded_node_serialises_steps_from_several_threads():
    per_thread, n_threads = 15, 3
    model = {"w": np.zeros(DIM, np.float32)}
    with EmbeddedNode(
        node_config(10, barrier="bsp"), manifest("embed-threads"), model=model
    ) as node:
        in_threads(
            *[
                lambda: [node.step({"w": np.ones(DIM, np.float32)}) for _ in range(per_thread)]
                for _ in range(n_threads)
            ]
        )
        assert node.completed_steps == per_thread * n_threads
        held = node.parameters()
    assert held is not None
    np.testing.assert_array_equal(held["w"], np.full(DIM, per_thread * n_threads, np.float32))


def test_embedded_node_joining_mid_run_gets_the_held_model():
    model = {"w": np.zeros(DIM, np.float32)}
    with embedded(2, "embed-join", first=11, model=model) as nodes:
        ones = np.ones(DIM, np.float32)
        in_threads(*[lambda n=n: [n.step({"w": ones}) for _ in range(3)] for n in nodes])
        config = node_config(13, bootstrap=(nodes[0].addr,), barrier="bsp", min_peers=2)
        late_node = EmbeddedNode(config, manifest("embed-join"))
        try:
            loaded = late_node.start(timeout_s=10)
            assert loaded is not None and late_node.completed_steps == 3
            np.testing.assert_array_equal(loaded["w"], nodes[0].parameters()["w"])
        finally:
            late_node.stop()


def test_embedded_nodes_beyond_full_delivery_average_their_held_models():
    steps, n = 6, 4
    model = {"w": np.zeros(DIM, np.float32)}

    def train(node: EmbeddedNode, index: int) -> np.ndarray:
        w = np.zeros(DIM, np.float32)
        for t in range(steps):
            w += node.step({"w": sgd_update(w, index, t)})["w"]
        return w

    gossip = {"full_delivery_max": 2, "fanout": 1, "average_every": 2}
    with embedded(n, "embed-gossip", first=14, model=model, **gossip) as nodes:
        results = in_threads(
            *[lambda node=node, i=i: train(node, i) for i, node in enumerate(nodes)]
        )
        held = [node.parameters() for node in nodes]
        counters = [node.counters for node in nodes]
    assert all(c["deltas_sent"] <= steps for c in counters)  # one target per step
    assert all(c["model_averages"] >= 1 for c in counters)
    for w, params in zip(results, held, strict=True):
        assert np.array_equal(w, params["w"])  # the caller's model is the node's held model


def test_embedded_node_without_training_never_imports_torch():
    code = (
        "import sys, p2pml\n"
        "from p2pml import EmbeddedNode\n"
        "from p2pml.core.run import NodeConfig\n"
        "from p2pml.node.embed import numpy_manifest\n"
        "import numpy as np\n"
        "m = numpy_manifest('overlay-only', {'w': np.zeros(2, np.float32)})\n"
        "with EmbeddedNode(NodeConfig(linger_s=0.0), m) as node:\n"
        "    node.step({'w': np.ones(2, np.float32)})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_lazy_numpy_manifest_from_p2pml_imports_no_network_package():
    code = (
        "import sys, numpy as np, p2pml\n"
        "p2pml.numpy_manifest('lazy', {'w': np.zeros(2, np.float32)})\n"
        "print(','.join(m for m in ('torch', 'aiohttp', 'kademlia') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.strip() == "", out.stderr
