"""`Node`: a peer-mode node: the overlay, the data plane, barrier waits and delta exchange.

``async with Node(config, manifest) as node:`` binds the DHT socket and the HTTP data plane, joins
through `config.bootstrap`, publishes the run tag and step in its signed records, and runs the
background discovery of run peers; leaving the block stops every task and releases both ports.

The training layer drives a node step by step (`p2pml/train/loop.py`)::

    await node.barrier()                    # SyncMachine over sampled peers' step RPCs
    deltas = node.take_deltas()             # received, validated, due (DESIGN.md §5)
    ... compute the step off the loop, applying the deltas with weight node.weight() ...
    await node.publish(step, own_delta)     # push, await every ack, then announce step + 1

The node never touches torch: models cross as `TensorBlob`s, and the model it serves to joining
peers comes from an attached `ModelSource`. Its Prometheus metrics (`node/metrics.py`) are served at
``GET /metrics`` of its data plane; the training layer reports its loss and accuracy with
`record_loss` and `record_accuracy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, Self

from p2pml.core.barrier import Decision
from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.sampling import sample_peers
from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import (
    BarrierTimeout,
    ConfigError,
    OverlayError,
    P2PMLError,
    PeerRejected,
    ProtocolError,
    Refused,
    TransportError,
)
from p2pml.io.faults import injector_for
from p2pml.io.http import (
    PLANE_CODES,
    DataPlaneClient,
    DataPlaneServer,
    InfoValue,
    loopback_source,
)
from p2pml.io.overlay import KademliaOverlay
from p2pml.node.admission import warn_if_open
from p2pml.node.metrics import NodeMetrics
from p2pml.node.peers import RunPeers
from p2pml.protocol import deltas as rules
from p2pml.protocol.auth import Admission, Authenticator
from p2pml.protocol.dht import Contact, StepReport
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    NO_VERSION,
    Ack,
    DeltaPush,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    TensorBlob,
)
from p2pml.protocol.sync import SyncMachine, WaitRecord

__all__ = ["ModelSource", "Node", "PushReport", "StepInputs"]

log = logging.getLogger(__name__)

OFFLOAD_BYTES: Final = 1 << 20
MAX_WAIT_RECORDS: Final = 10_000
_UNKNOWN_SENDER_TTL_S: Final = 5.0
MAX_SEEN_DELTAS: Final = 1 << 16
"""(sender, step) pairs of accepted deltas remembered to refuse duplicates."""
MAX_LOST_PEERS: Final = 256
MAX_LOST_PROBES: Final = 16
"""Lost run peers probed per discovery round (each probe waits up to the RPC timeout)."""
LOST_PEER_TTL_S: Final = 600.0
"""How long a run peer that stopped answering is still probed (a partition may heal)."""


async def ask_steps(
    overlay: KademliaOverlay, contacts: Sequence[Contact]
) -> dict[PeerId, StepReport | None]:
    """Each contact's signed step, asked in parallel; None for one that did not answer validly."""
    results = await asyncio.gather(*(overlay.step_of(c) for c in contacts), return_exceptions=True)
    answers: dict[PeerId, StepReport | None] = {}
    for contact, result in zip(contacts, results, strict=True):
        if isinstance(result, StepReport):
            answers[contact.peer_id] = result
        elif isinstance(result, P2PMLError | TimeoutError):
            answers[contact.peer_id] = None
        else:
            raise result
    return answers


class ModelSource(Protocol):
    """What serves this node's model to peers that join: (completed steps, parameters)."""

    async def snapshot(self) -> tuple[int, tuple[TensorBlob, ...]]: ...


@dataclass(frozen=True, slots=True)
class PushReport:
    """How one step's delta went out."""

    n_targets: int
    n_acked: int
    n_failed: int


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What a step starts from: a model to load first (a joining node's or a worker's pull, else
    None), then the deltas to apply, each with `weight`; the node keeps `weight` of its own
    update (1/P in peer mode; 0 for a worker, whose server applies the update)."""

    model: ModelReply | None
    deltas: list[DeltaPush]
    weight: float


class Node:
    """A peer-mode node of one run. See the module docstring for the step protocol.

    Args:
        key: the node's identity (a new one by default); it signs every frame the node sends.
        rng: the node's randomness (samples, lookups); seeded from the OS by default.
        admission: who may take part in the run (`p2pml.protocol.auth`); open by default, which
            the node logs as a warning when it starts.
    """

    def __init__(
        self,
        config: NodeConfig,
        manifest: RunManifest,
        *,
        key: NodeKey | None = None,
        rng: random.Random | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config.validate()
        self.manifest = manifest
        self.key = key or NodeKey.generate()
        self.admission = admission or Admission()
        self.rng = rng if rng is not None else random.Random(os.urandom(16))
        self.overlay = KademliaOverlay(
            config.overlay, self.key, role="peer", rng=self.rng, admission=self.admission
        )
        self.faults = injector_for(config)  # tests and chaos runs only (io/faults.py)
        self.metrics = NodeMetrics(self)
        self.auth = Authenticator(self.key, self.admission, max_skew_s=config.data.max_skew_s)
        self.server = DataPlaneServer(
            config.data,
            self,
            auth=self.auth,
            metrics=self.metrics.render,
            on_refusal=self._count_refusal,
        )
        self.client = DataPlaneClient(  # from its own address on loopback: peers tell nodes apart
            config.data, auth=self.auth, bind_host=loopback_source(config.data.listen.host)
        )
        self.peers = RunPeers(manifest, misses_to_forget=config.misses_to_forget)
        self.sync = SyncMachine(
            config.params(),
            config.sample,
            recheck_s=config.recheck_s,
            recheck_max_s=config.recheck_max_s,
        )
        self.counters: Counter[str] = Counter()
        self.waits: deque[WaitRecord] = deque(maxlen=MAX_WAIT_RECORDS)
        self.source: ModelSource | None = None
        self._completed = 0
        self._done = False
        self._queue: deque[DeltaPush] = deque()
        self._unknown: dict[PeerId, float] = {}
        self._seen_deltas: OrderedDict[tuple[PeerId, int], None] = OrderedDict()
        self._lost: OrderedDict[PeerId, tuple[Contact, float]] = OrderedDict()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._stack.enter_async_context(self.server)
            await self._stack.enter_async_context(self.client)
            await self._stack.enter_async_context(self.overlay)
            if self.faults is not None:  # both planes; leaving cancels its delayed sends first
                self.client = self.faults.attach(self.client, self.overlay, self.server.addr)
                await self._stack.enter_async_context(self.faults)
            self.overlay.set_http(self._advertised_http())
            self.overlay.set_run(self.manifest.tag)
            if self.config.bootstrap:
                await self.overlay.bootstrap(list(self.config.bootstrap))
            group = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._tasks.append(group.create_task(self._discover_loop()))
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "node %s in run %s: DHT %s, HTTP %s, barrier %s",
            self.short_id,
            self.manifest.tag,
            self.overlay.addr,
            self.server.addr,
            self.config.barrier,
        )
        warn_if_open(self.admission, self.manifest.run_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        await self._stack.aclose()

    def _advertised_http(self) -> Address:
        port = self.server.addr.port
        advertise = self.config.overlay.advertise
        if advertise is not None:
            return Address(advertise.host, port)
        host = self.server.addr.host
        if host in ("0.0.0.0", "::"):
            raise ConfigError(
                "advertise", None, "an address peers can reach when listening on all interfaces"
            )
        return Address(host, port)

    # -- state -----------------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.overlay.peer_id

    @property
    def short_id(self) -> str:
        return self.peer_id.hex()[:8]

    @property
    def step(self) -> int:
        """Steps this node has completed (and announced)."""
        return self._completed

    @property
    def finished(self) -> bool:
        return self._done

    def n_hat(self) -> float:
        """The population estimate N^; while the network is counted exactly (or before the first
        estimate), the routing table's current size plus this node, which is fresher."""
        estimate = self.overlay.estimate
        if estimate is not None and not estimate.is_exact:
            return estimate.n_hat
        return float(len(self.overlay.contacts()) + 1)

    @property
    def n_queued(self) -> int:
        """Accepted deltas not yet taken by `take_deltas`."""
        return len(self._queue)

    def record_loss(self, step: int, loss: float) -> None:
        """Report the training loss of `step` (the metrics ``p2pml_loss`` and ``p2pml_loss_step``;
        the node itself does not use it)."""
        self.metrics.loss = (step, float(loss))

    def record_accuracy(self, step: int, accuracy: float) -> None:
        """Report the accuracy evaluated after `step` (``p2pml_accuracy``, a share in 0..1)."""
        self.metrics.accuracy = (step, float(accuracy))

    def attach(self, source: ModelSource) -> None:
        """Serve this node's model to joining peers from `source`."""
        self.source = source

    def resume_at(self, step: int) -> None:
        """Continue from `step` completed steps (after pulling the model of a run in progress)."""
        self._completed = step
        self.overlay.set_step(Step(step))

    # -- discovery -------------------------------------------------------------------------------
    async def _discover_loop(self) -> None:
        while True:
            try:
                await self.discover()
            except P2PMLError as err:
                log.debug("discovery round failed: %s", err)
            await asyncio.sleep(self.config.discover_interval_s)

    async def discover(self) -> int:
        """Ask the contacts not yet known for their records, and the run peers that stopped
        answering less than `LOST_PEER_TTL_S` ago (a healed partition or a restarted peer comes
        back without waiting for a routing-table refresh); returns the live run peers."""
        now = time.monotonic()
        for peer, (_, lost_at) in list(self._lost.items()):
            if self.peers.is_known(peer) or now - lost_at > LOST_PEER_TTL_S:
                del self._lost[peer]
        lost = [contact for contact, _ in self._lost.values()][:MAX_LOST_PROBES]
        for contact in lost:  # the next round probes the others first
            self._lost.move_to_end(contact.peer_id)
        candidates = [c for c in self._candidates() if not self.peers.is_known(c.peer_id)]
        candidates += [c for c in lost if c not in candidates]
        gate = asyncio.Semaphore(16)

        async def one(contact: Contact) -> None:
            async with gate:
                try:
                    record = await self.overlay.info(contact)
                except P2PMLError:
                    return
                self.peers.consider(contact, record)

        await asyncio.gather(*(one(c) for c in candidates))
        return len(self.peers.live())

    def _candidates(self) -> list[Contact]:
        estimate = self.overlay.estimate
        contacts = self.overlay.contacts()
        if estimate is not None and not estimate.is_exact:  # large: the uniform pool too
            contacts += self.overlay.sample_peers(self.overlay.config.pool_capacity)
        return contacts

    async def wait_for_peers(self, n_peers: int, *, timeout_s: float | None = None) -> None:
        """Wait until at least `n_peers` other nodes of the run are known.

        Raises:
            OverlayError: naming how many were found when `timeout_s` runs out.
        """
        budget = self.config.join_timeout_s if timeout_s is None else timeout_s
        delay = 0.01
        try:
            async with asyncio.timeout(budget):
                while await self.discover() < n_peers:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 0.5)
        except TimeoutError:
            raise OverlayError(
                f"found {len(self.peers.live())} of the {n_peers} other nodes of run "
                f"{self.manifest.run_id} within {budget:g} s"
            ) from None

    # -- barrier ---------------------------------------------------------------------------------
    async def barrier(self, *, timeout_s: float | None = None) -> WaitRecord:
        """Wait until the barrier lets this node start its next step; returns the wait's record.

        Raises:
            BarrierTimeout: when the wait outlasts `timeout_s` (default from config).
        """
        budget = self.config.barrier_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        self.sync.begin(Step(self._completed), now=loop.time())
        try:
            async with asyncio.timeout(budget):
                while True:
                    answers = await self._check()
                    decision = self.sync.receive(
                        answers, now=loop.time(), population_estimate=self.n_hat()
                    )
                    if decision is Decision.PROCEED:
                        break
                    deadline = self.sync.next_deadline()
                    assert deadline is not None
                    await asyncio.sleep(max(0.0, deadline - loop.time()))
                    self.sync.on_timer(now=max(loop.time(), deadline))
        except TimeoutError:
            self.counters["barrier_timeouts"] += 1
            raise BarrierTimeout(
                f"barrier {self.config.barrier} before step {self._completed} still blocked "
                f"after {budget:g} s"
            ) from None
        finally:
            self.sync.abandon()  # after a timeout or cancellation; no-op once it proceeded
        record = self.sync.drain_events()[-1]
        self.waits.append(record)
        self.metrics.barrier_wait.observe(record.wait_s)
        return record

    async def _check(self) -> dict[PeerId, StepReport | None]:
        live = self.peers.live()
        n = self.sync.sample_size(self.n_hat())
        sample = live if n is None else sample_peers(live, n, self.rng)
        self.metrics.sampled_peers.set(len(sample))
        answers = await self._ask(sample)
        self.counters["barrier_asked"] += len(answers)
        self.counters["barrier_unanswered"] += sum(1 for a in answers.values() if a is None)
        return answers

    async def _ask(self, peers: Sequence[PeerId]) -> dict[PeerId, StepReport | None]:
        """The peers' signed steps, recorded in `self.peers`; a silent peer counts a miss."""
        answers = await ask_steps(self.overlay, [self.peers.peers[p].contact for p in peers])
        for peer, report in answers.items():
            if report is None:
                self._missed(peer)
            else:
                self.peers.answered(peer, report)
        return answers

    def _missed(self, peer: PeerId) -> None:
        known = self.peers.peers.get(peer)
        if self.peers.missed(peer):
            self.overlay.membership.drop(peer)
            if known is not None:  # probed again by `discover`, in case a partition heals
                self._lost[peer] = (known.contact, time.monotonic())
                self._lost.move_to_end(peer)
                if len(self._lost) > MAX_LOST_PEERS:
                    self._lost.popitem(last=False)

    # -- deltas out ------------------------------------------------------------------------------
    def weight(self) -> float:
        """What each delta weighs now: 1/P, the participants of the current delivery plan."""
        return self._plan().weight

    def _plan(self) -> rules.Delivery:
        return rules.plan_delivery(
            self.peers.live(),
            full_delivery_max=self.config.full_delivery_max,
            fanout=self.config.fanout,
            rng=self.rng,
        )

    @property
    def gossiping(self) -> bool:
        return len(self.peers.live()) + 1 > self.config.full_delivery_max

    async def publish(self, step: int, tensors: Sequence[TensorBlob]) -> PushReport:
        """Push this node's delta of `step` to its delivery targets, await their acks, then
        announce ``step + 1`` (the ordering rule of DESIGN.md §5)."""
        if step != self._completed:
            raise ConfigError("step", step, f"the node's next step, {self._completed}")
        plan = self._plan()
        msg = DeltaPush(self.manifest.tag, self.peer_id, step, step, tuple(tensors))
        n_bytes = sum(b.nbytes for b in msg.tensors)
        budget = self.config.ack_timeout_s + self.config.data.body_deadline_s(n_bytes)
        results = await asyncio.gather(*(self._push(p, msg, budget) for p in plan.targets))
        acked = sum(results)
        self.counters["deltas_sent"] += acked
        self._completed = step + 1
        self.overlay.set_step(Step(self._completed))
        return PushReport(len(plan.targets), acked, len(results) - acked)

    async def _push(self, peer: PeerId, msg: DeltaPush, budget_s: float) -> bool:
        rp = self.peers.peers.get(peer)
        if rp is None:
            return False
        try:
            async with asyncio.timeout(budget_s):
                await self.client.push_delta(rp.http, msg)
            return True
        except PeerRejected as err:
            if err.code == "duplicate":  # it has this delta already (an earlier try got there)
                self.counters["push_duplicate"] += 1
                return True
            self.counters[f"push_refused_{err.code}"] += 1
            log.warning("peer %s refused our delta of step %d: %s", peer.hex()[:8], msg.step, err)
            if err.code in ("other_run", "not_admitted"):  # it will never take our deltas
                self.peers.mark_done(peer)
            # "not_in_run" is only for now: the peer has not discovered this node yet
        except ProtocolError as err:  # its reply was malformed, or its seal failed our checks
            self.counters["push_bad_reply"] += 1
            log.warning("delta of step %d to %s: bad reply: %s", msg.step, peer.hex()[:8], err)
            self._missed(peer)
        except (TransportError, TimeoutError) as err:
            self.counters["push_failed"] += 1
            log.warning("delta of step %d to %s failed: %s", msg.step, peer.hex()[:8], err)
            self._missed(peer)
        return False

    # -- deltas in -------------------------------------------------------------------------------
    async def on_delta(self, msg: DeltaPush) -> Ack:
        """Validate and queue a peer's delta (the data plane's handler); refusals are counted.

        A second delta of the same sender and step (a retried or duplicated push) is refused as
        ``duplicate``: it would otherwise be applied twice."""
        key = (msg.sender, msg.step)
        try:
            if key in self._seen_deltas:
                raise Refused(
                    "duplicate",
                    f"delta of step {msg.step} from {msg.sender.hex()[:8]} was received already",
                )
            self._seen_deltas[key] = None  # reserved now: a copy racing this one is refused
            try:
                await self._accept(msg)
            except BaseException:  # refused, failed or cancelled: a retry may still come
                self._seen_deltas.pop(key, None)
                raise
        except Refused as err:
            self.counters["deltas_rejected"] += 1
            self.counters[f"rejected_{err.code}"] += 1
            raise
        if len(self._seen_deltas) > MAX_SEEN_DELTAS:  # the oldest are long past the age limit
            self._seen_deltas.popitem(last=False)
        self._queue.append(msg)
        self.counters["deltas_received"] += 1
        return Ack(self.manifest.tag, self.peer_id, msg.step)

    def _count_refusal(self, path: str, code: str) -> None:
        """Count a delta the data plane refused before `on_delta` saw it (seal, size, rate)."""
        if path == "/v1/delta" and code in PLANE_CODES:
            self.counters["deltas_rejected"] += 1
            self.counters[f"rejected_{code}"] += 1

    async def _accept(self, msg: DeltaPush) -> None:
        why = self.manifest.mismatch(msg.run_id)
        if why is not None:
            raise Refused("other_run", f"delta from {msg.sender.hex()[:8]} refused: {why}")
        if not await self._is_run_peer(msg.sender):
            raise Refused(
                "not_in_run",
                f"delta from {msg.sender.hex()[:8]}: not a known peer of run "
                f"{self.manifest.run_id}",
            )
        rules.check_delta(
            msg,
            self.manifest.params,
            completed=self._completed,
            max_age=self.config.delta_age_limit,
        )
        if len(self._queue) >= self.config.max_queued_deltas:
            raise Refused("queue_full", f"{len(self._queue)} deltas already wait to be applied")
        if sum(b.nbytes for b in msg.tensors) > OFFLOAD_BYTES:
            await asyncio.to_thread(rules.check_finite, msg)
        else:
            rules.check_finite(msg)

    async def _is_run_peer(self, sender: PeerId) -> bool:
        if sender in self.peers:
            return True
        now = time.monotonic()
        if now - self._unknown.get(sender, -_UNKNOWN_SENDER_TTL_S) < _UNKNOWN_SENDER_TTL_S:
            return False
        contact = await self._find(sender)
        if contact is not None:
            with contextlib.suppress(P2PMLError):
                if self.peers.consider(contact, await self.overlay.info(contact)):
                    return True
        if len(self._unknown) > 4096:
            self._unknown.clear()
        self._unknown[sender] = now
        return False

    async def _find(self, peer: PeerId) -> Contact | None:
        for contact in self.overlay.contacts():
            if contact.peer_id == peer:
                return contact
        try:
            result = await self.overlay.lookup(peer)
        except P2PMLError:
            return None
        return next((c for c in result.contacts if c.peer_id == peer), None)

    async def inputs(self) -> StepInputs:
        """The due deltas and their weight 1/P (peer mode never loads a model between steps)."""
        return StepInputs(None, self.take_deltas(), self.weight())

    def take_deltas(self) -> list[DeltaPush]:
        """The queued deltas due before the next step (all of them, except under BSP)."""
        lockstep = self.sync.lockstep
        due = [m for m in self._queue if rules.is_due(m.step, self._completed, lockstep=lockstep)]
        if len(due) == len(self._queue):
            self._queue.clear()
        else:
            taken = {id(m) for m in due}  # identity: DeltaPush equality compares payloads
            self._queue = deque(m for m in self._queue if id(m) not in taken)
        return due

    # -- models ----------------------------------------------------------------------------------
    async def on_model_request(self, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        why = self.manifest.mismatch(msg.run_id)
        if why is not None:
            self.counters["rejected_other_run"] += 1
            raise Refused("other_run", f"model request refused: {why}")
        if self.source is None:
            raise Refused("no_model", "this node has no model to serve yet")
        version, tensors = await self.source.snapshot()
        if msg.have_version == version:
            return ModelUnchanged(self.manifest.tag, self.peer_id, version)
        return ModelReply(self.manifest.tag, self.peer_id, version, version, tensors)

    async def pull_model(self, peer: PeerId | None = None) -> ModelReply:
        """The model of `peer`, or of the most advanced live run peer that answers.

        Raises:
            OverlayError: when no run peer served a valid model.
        """
        live = self.peers.live() if peer is None else [peer]
        ranked = sorted(live, key=lambda p: -self.peers.peers[p].step)
        request = ModelRequest(self.manifest.tag, self.peer_id, NO_VERSION)
        for candidate in ranked:
            rp = self.peers.peers.get(candidate)
            if rp is None:
                continue
            try:
                reply = await self.client.pull_model(rp.http, request)
                if not isinstance(reply, ModelReply):
                    continue
                rules.check_tensors(reply.tensors, self.manifest.params, what="model")
                await asyncio.to_thread(rules.check_finite_tensors, reply.tensors, "model")
            except (P2PMLError, TimeoutError) as err:
                log.warning("model pull from %s failed: %s", candidate.hex()[:8], err)
                continue
            return reply
        raise OverlayError(f"no peer of run {self.manifest.run_id} served its model")

    async def start(self) -> ModelReply | None:
        """Join a run in progress: the model of its most advanced peer, after which this node
        continues from that peer's step; None for a fresh run (or a node that already stepped)."""
        if self._completed > 0:
            return None
        await self.discover()
        ahead = [self.peers.peers[p].step for p in self.peers.live()]
        if not ahead or max(ahead) == 0:
            return None
        reply = await self.pull_model()
        self.resume_at(reply.step)
        log.info("joined run %s in progress at step %d", self.manifest.run_id, reply.step)
        return reply

    async def after_step(self, step: int) -> ModelReply | None:
        """Gossip: every `average_every` steps while deltas fan out, a random peer's model to
        average with (None when not due or when the pull failed)."""
        every = self.config.average_every
        if not (self.gossiping and every > 0 and (step + 1) % every == 0):
            return None
        peer = self.rng.choice(self.peers.live())
        try:
            reply = await self.pull_model(peer)
        except P2PMLError as err:
            log.warning("model averaging with %s skipped: %s", peer.hex()[:8], err)
            return None
        self.counters["model_averages"] += 1
        return reply

    async def finish(self) -> None:
        """Announce that this node has finished, so no barrier waits on it, and linger until the
        known peers have finished too or `linger_s` runs out."""
        self._done = True
        self.overlay.set_step(Step(self._completed), done=True)
        log.info("node %s finished at step %d", self.short_id, self._completed)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.config.linger_s
        while (live := self.peers.live()) and loop.time() < until:
            await self._ask(live)
            await asyncio.sleep(min(0.1, max(0.0, until - loop.time())))

    # -- data plane info -------------------------------------------------------------------------
    def info(self) -> dict[str, InfoValue]:
        return {
            "peer_id": self.peer_id.hex(),
            "role": "peer",
            "run": self.manifest.tag,
            "step": self._completed,
            "done": self._done,
        }
