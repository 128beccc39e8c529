"""`EmbeddedNode`: a peer-mode `Node` on its own event-loop thread behind a small synchronous,
thread-safe API, for programs without an event loop (edge devices, numpy models, no torch).

The caller holds its model as numpy arrays and computes its own update each step (for SGD,
``-lr * gradient``). `EmbeddedNode.step` sends that update to the run's peers and returns the
change to add to the parameters::

    params = {"w": np.zeros(8, np.float32)}
    manifest = numpy_manifest("edge-run", params, {"barrier": "bsp", "lr": 0.1})
    with EmbeddedNode(NodeConfig(barrier="bsp", bootstrap=seeds), manifest) as node:
        for _ in range(100):
            change = node.step({"w": -0.1 * gradient(params["w"])})
            params["w"] += change["w"]

One step is the Trainer's step (`p2pml/train/loop.py`) with the barrier moved to its end: push
the update of step t and await the acks, wait at the barrier for step t + 1 (under BSP: every
peer has pushed its update of step t, so it is queued here), then take the due deltas. The
change returned is the weight 1/P of DESIGN.md §5 times the sum of this node's update and the
deltas taken, summed in (step, sender) order, so nodes that hold the same deltas compute
bit-identical changes. With BSP and full delivery, every node therefore adds the mean of the P
updates: synchronous data-parallel SGD over the nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Self, TypeVar

import numpy as np

from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.types import Address, PeerId
from p2pml.errors import NodeStopped
from p2pml.node.arrays import (
    Contribution,
    HeldModel,
    Params,
    Update,
    as_blobs,
    combine,
    numpy_manifest,
)
from p2pml.node.node import Node
from p2pml.protocol.auth import Admission
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import ModelReply, TensorBlob

__all__ = ["EmbeddedNode", "NodeStopped", "Params", "Update", "numpy_manifest"]

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_GRACE_S: Final = 5.0
GRACE_S: Final = 1.0
PEEK_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class _Exchange:
    """What one step brought back from the loop thread."""

    step: int
    contributions: list[Contribution]
    weight: float
    wait_s: float
    peer_model: ModelReply | None


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _reject(entered: concurrent.futures.Future[None], exc: BaseException) -> None:
    if not entered.done() and entered.set_running_or_notify_cancel():
        entered.set_exception(exc)


def _fill(fut: concurrent.futures.Future[T], read: Callable[[Node], T], node: Node) -> None:
    try:
        fut.set_result(read(node))
    except Exception as exc:
        fut.set_exception(exc)


class EmbeddedNode:
    """A peer-mode `Node` running on its own daemon thread; every method may be called from any
    thread. `start`, `step` and `wait_for_peers` run one at a time; `stop` interrupts them.
    Exceptions raised on the loop thread re-raise in the calling thread with their own type.

    Args:
        config, manifest, key, rng, admission: as for `Node`.
        model: the initial parameters; when given, the node keeps a copy, changed by every
            step's result, to serve peers that join the run later and, beyond
            `full_delivery_max` nodes, to average with a random peer's model (gossip; the
            change `step` returns then includes the averaging).
    """

    def __init__(
        self,
        config: NodeConfig,
        manifest: RunManifest,
        *,
        model: Update | None = None,
        key: NodeKey | None = None,
        rng: random.Random | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config.validate()
        self.manifest = manifest
        self.key = key or NodeKey.generate()
        self.admission = admission
        self.waited_s = 0.0
        self._rng = rng
        self._held = (
            None if model is None else HeldModel(as_blobs(model, manifest.params, what="model"))
        )
        self._state = threading.Lock()  # guards the fields below
        self._calls = threading.Lock()  # one start/step/wait_for_peers at a time
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._closing: asyncio.Event | None = None
        self._node: Node | None = None
        self._open = False  # the loop thread accepts calls
        self._stopping = False
        self._failure: BaseException | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._unapplied: list[Contribution] = []  # own updates sent but not yet returned
        self._warned = False

    # -- state -----------------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def addr(self) -> Address:
        """The overlay (DHT) address other nodes bootstrap from."""
        return self._started().overlay.addr

    @property
    def running(self) -> bool:
        return self._open and not self._stopping

    @property
    def completed_steps(self) -> int:
        """Steps this node has completed (`Node.step`)."""
        node = self._node
        return 0 if node is None else node.step

    @property
    def n_hat(self) -> float:
        """The node's population estimate N^ (1.0 before it starts)."""
        return self._peek(lambda n: n.n_hat(), 1.0)

    @property
    def n_peers(self) -> int:
        """The other live nodes of the run that this node knows."""
        return self._peek(lambda n: len(n.peers.live()), 0)

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the node's counters (deltas sent, received, rejected, ...)."""
        return self._peek(lambda n: dict(n.counters), {})

    def parameters(self) -> Params | None:
        """A copy of the model the node holds (None when it was created without `model`)."""
        return None if self._held is None else self._held.copy()

    # -- the synchronous API ---------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, timeout_s: float | None = None) -> Params | None:
        """Start the loop thread and the node, wait for `config.min_peers` other nodes, and join
        the run; returns once the node is listening and has joined, or raises.

        Args:
            timeout_s: the whole budget; `config.join_timeout_s` by default.

        Returns:
            None for a fresh run; for a run in progress, the parameters to load (the node then
            continues from the step its peer had reached, and a held model is replaced).

        Raises:
            RuntimeError: when the node was already started.
            OverlayError: when fewer than `min_peers` nodes were found in time.
            TimeoutError: when the budget ran out.
        """
        budget = self.config.join_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        with self._calls:
            entered = self._launch()
            try:
                self._settle(entered, budget, "start()")
                # the join's own deadlines raise first; this one only guards the loop
                reply = self._call(self._join(deadline), _left(deadline) + GRACE_S, "start()")
            except BaseException:
                with contextlib.suppress(TimeoutError):
                    self.stop()
                raise
        if reply is None:
            return None
        arrays = {blob.name: np.array(blob.array) for blob in reply.tensors}
        if self._held is not None:
            self._held.replace(arrays, reply.step)
        return arrays

    def wait_for_peers(self, n_peers: int, *, timeout_s: float | None = None) -> None:
        """Wait until at least `n_peers` other nodes of the run are known (see `Node`)."""
        with self._calls:
            node = self._started()
            self._call(node.wait_for_peers(n_peers, timeout_s=timeout_s), None, "wait_for_peers()")

    def step(self, update: Update, *, timeout_s: float | None = None) -> Params:
        """One training step: push `update` (this node's change of this step, computed on the
        current parameters) to the run's peers, wait at the barrier for the next step, and
        return the change to add to the parameters (see the module docstring).

        The arrays of `update` must not change until the call returns. When the barrier fails
        after the push, the update is kept and returned within the next step's change.

        Args:
            update: one array per parameter of the manifest, by name (or as `TensorBlob`s).
            timeout_s: the barrier's budget; `config.barrier_timeout_s` by default.

        Raises:
            ConfigError: for an update that does not match the manifest or is not finite.
            BarrierTimeout: when the barrier did not pass in time.
            NodeStopped: when `stop()` was called before or during the step.
        """
        blobs = as_blobs(update, self.manifest.params)
        with self._calls:
            self._started()
            done = self._call(self._exchange(blobs, timeout_s), None, "step()")
            change = combine(done.contributions, self.manifest.params, done.weight)
            if self._held is not None:
                peer = None if done.peer_model is None else done.peer_model.tensors
                self._held.apply(change, done.step + 1, peer=peer)
            self.waited_s += done.wait_s
        return change

    def stop(self, *, timeout_s: float | None = None) -> None:
        """Finish (announce it, so no barrier waits on this node, and linger) and close the
        node. Idempotent; a call in progress raises `NodeStopped` in its thread.

        Args:
            timeout_s: `config.linger_s` plus a few seconds by default.

        Raises:
            TimeoutError: when the loop thread did not end in time.
        """
        budget = self.config.linger_s + STOP_GRACE_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        with self._state:
            first, self._stopping = not self._stopping, True
            thread, pending = self._thread, list(self._inflight)
        if thread is None:
            return
        self._check_thread()
        if first:
            for fut in pending:
                fut.cancel()
            self._close(deadline)
        thread.join(_left(deadline))
        if thread.is_alive():
            raise TimeoutError(f"the embedded node did not stop within {budget:g} s")

    # -- bridging to the loop thread -------------------------------------------------------------
    def _launch(self) -> concurrent.futures.Future[None]:
        entered: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._state:
            if self._stopping:
                raise NodeStopped("start(): the node was stopped before it started")
            if self._thread is not None:
                raise RuntimeError("the node was already started; create a new EmbeddedNode")
            name = f"p2pml-embed-{self.peer_id.hex()[:8]}"
            self._thread = threading.Thread(
                target=self._run, args=(entered,), name=name, daemon=True
            )
            self._thread.start()
        return entered

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None, what: str) -> T:
        """Run `coro` on the loop thread and wait for it; `stop()` cancels it."""
        self._check_thread()
        with self._state:
            if not self._open or self._stopping:
                coro.close()
                raise self._gone(what) from self._failure
            assert self._loop is not None
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._inflight.add(fut)
        try:
            return self._settle(fut, timeout_s, what)
        finally:
            with self._state:
                self._inflight.discard(fut)

    def _settle(self, fut: concurrent.futures.Future[T], timeout_s: float | None, what: str) -> T:
        done, _ = concurrent.futures.wait([fut], timeout=timeout_s)
        if not done:
            fut.cancel()
            raise TimeoutError(f"{what} did not complete within {timeout_s:g} s")
        if fut.cancelled():
            raise self._gone(what) from self._failure
        return fut.result()  # the loop thread's exception, re-raised here with its type

    def _gone(self, what: str) -> Exception:
        if self._thread is None:
            return RuntimeError(f"{what}: start() the node first")
        if self._failure is not None:
            return NodeStopped(f"{what}: the node's loop thread failed: {self._failure!r}")
        return NodeStopped(f"{what}: the node was stopped")

    def _started(self) -> Node:
        node = self._node
        if node is None:
            raise RuntimeError("start() the node first")
        return node

    def _check_thread(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("the EmbeddedNode's synchronous API cannot be used on its loop")

    def _peek(self, read: Callable[[Node], T], idle: T) -> T:
        """`read(node)` on the loop thread (directly once the loop is done with the node)."""
        self._check_thread()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._state:
            node = self._node
            if node is None:
                return idle
            if not self._open:
                return read(node)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_fill, fut, read, node)
        return fut.result(PEEK_TIMEOUT_S)

    def _close(self, deadline: float) -> None:
        with self._state:
            if not self._open:
                return  # the loop thread is ending on its own
            assert self._loop is not None
            fut = asyncio.run_coroutine_threadsafe(self._finish(), self._loop)
        try:
            fut.result(_left(deadline))
        except TimeoutError:
            fut.cancel()  # its `finally` still closes the node
        except (Exception, concurrent.futures.CancelledError) as err:
            log.warning("finishing the embedded node failed: %r", err)

    # -- the loop thread -------------------------------------------------------------------------
    def _run(self, entered: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._serve(entered))
        except BaseException as exc:  # reported to the calling threads, never lost
            stopped = self._stopping and isinstance(exc, asyncio.CancelledError)
            if not stopped:
                self._failure = exc
                log.error("embedded node %s failed: %r", self.peer_id.hex()[:8], exc)
            _reject(entered, NodeStopped("start(): stopped while starting") if stopped else exc)
        finally:
            with self._state:
                self._open = False
                pending = list(self._inflight)
            for fut in pending:
                fut.cancel()
            _reject(entered, NodeStopped("start(): stopped while starting"))

    async def _serve(self, entered: concurrent.futures.Future[None]) -> None:
        closing = asyncio.Event()
        with self._state:
            if self._stopping:
                return
            self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
            self._closing, self._open = closing, True
        try:
            node = Node(
                self.config, self.manifest, key=self.key, rng=self._rng, admission=self.admission
            )
            if self._held is not None:
                node.attach(self._held)
            async with node:
                self._node = node
                if entered.set_running_or_notify_cancel():  # else start() gave up waiting
                    entered.set_result(None)
                await closing.wait()
        finally:
            with self._state:
                self._open = False

    async def _join(self, deadline: float) -> ModelReply | None:
        node = self._started()
        if self.config.min_peers:
            await node.wait_for_peers(self.config.min_peers, timeout_s=_left(deadline))
        budget = asyncio.timeout(_left(deadline))
        try:
            async with budget:
                return await node.start()
        except TimeoutError:
            if not budget.expired():
                raise
            raise TimeoutError("start(): joining the run did not complete in time") from None

    async def _exchange(self, blobs: tuple[TensorBlob, ...], timeout_s: float | None) -> _Exchange:
        node = self._started()
        step = node.step
        await node.publish(step, blobs)
        try:
            wait = await node.barrier(timeout_s=timeout_s)
        except BaseException:
            # Kept for the next step: a copy, as the caller may reuse its buffers meanwhile
            # (when the barrier passes, the caller's arrays are combined before it has them back).
            kept = tuple(TensorBlob(b.name, b.array.copy()) for b in blobs)
            self._unapplied.append((step, node.peer_id, kept))
            raise
        self._unapplied.append((step, node.peer_id, blobs))
        own, self._unapplied = self._unapplied, []
        received = [(m.step, m.sender, m.tensors) for m in node.take_deltas()]
        weight = node.weight()
        peer = None
        if self._held is not None:
            peer = await node.after_step(step)
        elif node.gossiping and not self._warned:
            self._warned = True
            log.warning("gossip mode: no model averaging without EmbeddedNode(..., model=...)")
        return _Exchange(step, own + received, weight, wait.wait_s, peer)

    async def _finish(self) -> None:
        try:
            if self._node is not None:
                await self._node.finish()
        finally:
            if self._node is not None and self._closing is not None:
                self._closing.set()
            elif self._main is not None:
                self._main.cancel()  # still entering the node
