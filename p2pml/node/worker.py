"""`Worker`: trains against a parameter server (`node/server.py`) instead of peers.

``async with Worker(config, manifest, server) as worker:`` registers with the server (which refuses
a worker of another run), then heartbeats in the background. The training layer drives it with the
same verbs as a peer-mode `Node`::

    await worker.barrier()              # long poll: the server answers when its barrier lets us go
    inputs = await worker.inputs()      # the server's model, pulled only when its version changed
    ... compute the step off the loop from that model ...
    await worker.publish(step, delta)   # push the whole change; the server weighs and applies it

If the server stops answering, every call retries with backoff for `server_timeout_s` and then
fails with `PeerUnreachable`. A worker the server does not know (evicted after missing its
heartbeats, or the server restarted) registers again, continues from the step the server gives it
and pulls the current model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Self, TypeVar

from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import (
    BarrierTimeout,
    PeerRejected,
    PeerUnreachable,
    ProtocolError,
    TransportError,
)
from p2pml.io.faults import injector_for
from p2pml.io.http import DataPlaneClient
from p2pml.node.node import ModelSource, PushReport, StepInputs
from p2pml.protocol import deltas as rules
from p2pml.protocol.auth import Admission, Authenticator
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    NO_VERSION,
    BarrierRequest,
    DeltaPush,
    Heartbeat,
    ModelReply,
    ModelRequest,
    Register,
    ServerStatus,
    TensorBlob,
)
from p2pml.protocol.sync import WaitRecord

__all__ = ["Worker"]

log = logging.getLogger(__name__)

R = TypeVar("R")
_FIRST_BACKOFF_S: Final = 0.05
_MAX_BACKOFF_S: Final = 2.0


class Worker:
    """A worker of one run, training against the parameter server at `server`."""

    def __init__(
        self,
        config: NodeConfig,
        manifest: RunManifest,
        server: Address,
        *,
        key: NodeKey | None = None,
        rng: random.Random | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config.validate()
        self.manifest = manifest
        self.server = server
        self.key = key or NodeKey.generate()
        self.admission = admission or Admission()
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self.auth = Authenticator(self.key, self.admission, max_skew_s=config.data.max_skew_s)
        self.client = DataPlaneClient(config.data, auth=self.auth)
        self.faults = injector_for(config)  # tests and chaos runs only (io/faults.py)
        self.counters: Counter[str] = Counter()
        self.last_loss: tuple[int, float] | None = None
        self.last_accuracy: tuple[int, float] | None = None
        self._completed = 0
        self._version = NO_VERSION
        self._n_workers = 1
        self._done = False
        self._registered = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            if self.faults is not None:
                self.client = self.faults.attach(self.client, None, self.config.data.listen)
                await self._stack.enter_async_context(self.faults)
            await self._stack.enter_async_context(self.client)
            await self._register()
            group = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._beat = group.create_task(self._heartbeat_loop())
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._beat.cancel()
        await self._stack.aclose()

    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def short_id(self) -> str:
        return self.peer_id.hex()[:8]

    @property
    def step(self) -> int:
        """Steps this worker has completed."""
        return self._completed

    @property
    def version(self) -> int:
        """The server's model version this worker holds (NO_VERSION before the first pull)."""
        return self._version

    def n_hat(self) -> float:
        """The server's count of training workers at the last answer."""
        return float(self._n_workers)

    def attach(self, source: ModelSource) -> None:
        """Workers serve no model (the server does)."""

    def record_loss(self, step: int, loss: float) -> None:
        """Report the training loss of `step`. A worker serves no HTTP port, so no metrics: the
        value is only kept in `last_loss`, as (step, loss)."""
        self.last_loss = (step, float(loss))

    def record_accuracy(self, step: int, accuracy: float) -> None:
        """Report the accuracy evaluated after `step`; kept in `last_accuracy`, as (step, share)."""
        self.last_accuracy = (step, float(accuracy))

    # -- talking to the server -------------------------------------------------------------------
    async def _retry(self, what: str, call: Callable[[], Awaitable[R]]) -> R:
        """`call()`, retried with backoff while the server is unreachable, for at most
        `server_timeout_s`; an unknown worker registers again first."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.config.server_timeout_s
        delay = _FIRST_BACKOFF_S
        while True:
            try:
                return await call()
            except PeerRejected as err:
                if err.code != "unknown_worker":
                    raise
                self.counters["reregistered"] += 1
                log.warning("server forgot worker %s (%s); registering again", self.short_id, err)
                await self._register()
            except TransportError as err:
                if loop.time() + delay > give_up_at:
                    raise PeerUnreachable(
                        f"parameter server {self.server} unreachable for "
                        f"{self.config.server_timeout_s:g} s during {what}; giving up "
                        f"(last error: {err})"
                    ) from None
                self.counters["server_retries"] += 1
                log.warning("%s: server %s: %s; retrying in %.2f s", what, self.server, err, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _MAX_BACKOFF_S)

    async def _send(self, msg: Register | Heartbeat | BarrierRequest) -> ServerStatus:
        status = await self.client.control(self.server, msg)
        self._n_workers = max(1, status.n_workers)
        return status

    async def _register(self) -> None:
        msg = Register(self.manifest.tag, self.peer_id, self._completed)

        async def call() -> ServerStatus:
            try:
                return await self._send(msg)
            except PeerRejected as err:
                if err.code == "unknown_worker":  # cannot happen for Register; never loop on it
                    raise PeerUnreachable(str(err)) from None
                raise

        status = await self._retry("registration", call)
        if status.step != self._completed:
            log.info(
                "worker %s continues at the server's step %d (was %d)",
                self.short_id,
                status.step,
                self._completed,
            )
        self._completed = status.step
        self._version = NO_VERSION  # pull the model afresh, whatever version we held
        self._registered.set()
        log.info("worker %s registered with %s at step %d", self.short_id, self.server, status.step)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            msg = Heartbeat(self.manifest.tag, self.peer_id, self._completed, self._done)
            try:
                async with asyncio.timeout(self.config.heartbeat_timeout_s):
                    await self._send(msg)
            except (TransportError, ProtocolError, TimeoutError) as err:
                log.debug("heartbeat to %s failed: %s", self.server, err)  # calls retry

    # -- the step protocol -----------------------------------------------------------------------
    async def start(self) -> ModelReply | None:
        """Nothing to load yet: the first `inputs()` pulls the server's model."""
        return None

    async def barrier(self, *, timeout_s: float | None = None) -> WaitRecord:
        """Long-poll the server until its barrier lets this worker start its next step.

        Raises:
            BarrierTimeout: when the wait outlasts `timeout_s` (default from config).
            PeerUnreachable: when the server stays unreachable for `server_timeout_s`.
        """
        budget = self.config.barrier_timeout_s if timeout_s is None else timeout_s
        began = time.monotonic()
        n_checks = 0
        try:
            async with asyncio.timeout(budget):
                while True:
                    n_checks += 1
                    status = await self._retry("the barrier", self._ask)
                    if status.step > self._completed:  # the server moved us on (rejoin)
                        self._completed = status.step
                    if status.proceed:
                        break
        except TimeoutError:
            raise BarrierTimeout(
                f"server barrier {self.config.barrier} before step {self._completed} still "
                f"blocked after {budget:g} s"
            ) from None
        return WaitRecord(Step(self._completed), time.monotonic() - began, n_checks, 1, 0, ())

    async def _ask(self) -> ServerStatus:
        return await self._send(BarrierRequest(self.manifest.tag, self.peer_id, self._completed))

    async def inputs(self) -> StepInputs:
        """The server's model when its version changed since the last pull (else None: the local
        copy is current); a worker applies no peer deltas and keeps none of its own update."""
        request = ModelRequest(self.manifest.tag, self.peer_id, self._version)
        reply = await self._retry(
            "the model pull", lambda: self.client.pull_model(self.server, request)
        )
        if not isinstance(reply, ModelReply):
            self.counters["models_unchanged"] += 1
            return StepInputs(None, [], 0.0)
        rules.check_tensors(reply.tensors, self.manifest.params, what="model")
        await asyncio.to_thread(rules.check_finite_tensors, reply.tensors, "model")
        self._version = reply.version
        self.counters["models_pulled"] += 1
        return StepInputs(reply, [], 0.0)

    async def publish(self, step: int, tensors: Sequence[TensorBlob]) -> PushReport:
        """Push this step's delta (computed from the model version last pulled); a delta the
        server refuses is counted and dropped, never retried into a double update."""
        msg = DeltaPush(self.manifest.tag, self.peer_id, step, self._version, tuple(tensors))
        try:
            await self._retry("the delta push", lambda: self.client.push_delta(self.server, msg))
        except PeerRejected as err:
            if err.code == "other_run":
                raise
            self.counters["deltas_rejected_by_server"] += 1
            self.counters[f"push_refused_{err.code}"] += 1
            log.warning("server refused our delta of step %d: %s", step, err)
            self._completed = max(self._completed, step + 1)
            return PushReport(1, 0, 1)
        self.counters["deltas_sent"] += 1
        self._completed = step + 1
        return PushReport(1, 1, 0)

    async def after_step(self, step: int) -> ModelReply | None:
        """Nothing to average with: the server holds the one model."""
        return None

    async def finish(self) -> None:
        """Tell the server this worker has finished, so no barrier waits on it."""
        self._done = True
        msg = Heartbeat(self.manifest.tag, self.peer_id, self._completed, True)
        try:
            await self._send(msg)
        except TransportError as err:
            log.warning("could not tell the server %s that we finished: %s", self.server, err)
        log.info("worker %s finished at step %d", self.short_id, self._completed)
