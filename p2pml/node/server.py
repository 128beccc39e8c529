"""`ParameterServer`: the centralised mode. One node holds the model and the global step table and
applies the barrier for its workers (`protocol/server.py` decides; this module drives it).

``async with ParameterServer(config, manifest, params) as server:`` serves the data plane with the
control route: workers register, heartbeat and long-poll the barrier (`/v1/control`), push deltas
(`/v1/delta`) and pull the model (`/v1/model`, answered "unchanged" when they already hold the
current version). Deltas get the same checks as in peer mode (run tag, shape, dtype, finiteness)
before they are queued; a single ``p2pml-apply`` thread adds them to the model in version order,
takes the snapshots served to workers, runs evaluations and writes checkpoints, so a snapshot or a
checkpoint of version v always holds exactly the updates up to v.

With an `AggregationConfig` other than the plain mean (issue 8), the apply thread screens every
delta first (a non-finite one, or with the norm filter on, one whose norm is more than its factor
times the median of the recently accepted ones, is dropped, counted as ``rejected_outlier`` and
logged at most once per worker per 10 s) and combines the kept deltas of a BSP round of at least
three by the rule (`protocol/aggregate.py`); the update keeps its total weight (the mean of the
kept deltas for a BSP round, 1/P for a single delta). Smaller rounds and single deltas (the other
barriers) go through unchanged: a rule needs a majority to outvote one hostile delta.

The server never touches torch: the parameters are numpy arrays it updates in place (the training
layer may hand it arrays that share memory with a torch model, to evaluate it). Its Prometheus
metrics (`node/metrics.py`) are served at ``GET /metrics`` of its data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, ParamSpec, Self, TypeVar, cast

import numpy as np
import numpy.typing as npt

from p2pml.core.barrier import Decision
from p2pml.core.limits import WarnGate
from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.types import PeerId
from p2pml.errors import ConfigError, Refused
from p2pml.io.http import PLANE_CODES, ControlMessage, DataPlaneServer, InfoValue
from p2pml.io.modelfile import save_checkpoint
from p2pml.node.admission import warn_if_open
from p2pml.node.metrics import ServerMetrics
from p2pml.protocol import deltas as rules
from p2pml.protocol.aggregate import (
    AggregationConfig,
    Array,
    admits,
    combine_group,
    delta_norm,
)
from p2pml.protocol.auth import Admission, Authenticator
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    Ack,
    BarrierRequest,
    DeltaPush,
    Heartbeat,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    Register,
    ServerStatus,
    TensorBlob,
)
from p2pml.protocol.server import Apply, Evicted, Released, ServerMachine

__all__ = ["ParameterServer", "StalenessStats", "UpdateLog"]

log = logging.getLogger(__name__)

OFFLOAD_BYTES: Final = 1 << 20
CHECKPOINT_PREFIX: Final = "server"
_TICK_S: Final = 0.1
_WARN_EVERY_S: Final = 10.0  # at most one warning per worker this often about dropped deltas
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class UpdateLog:
    """One line of the server's JSON log: one update of the model."""

    version: int
    step: int
    workers: list[str]
    staleness: list[int]
    weight: float
    n_workers: int
    accuracy: float | None
    time_s: float
    unix_s: float = 0.0  # wall-clock time of the update, the time axis shared with workers

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(slots=True)
class StalenessStats:
    """Running mean and variance of the staleness of applied deltas (Welford)."""

    n: int = 0
    mean: float = 0.0
    _m2: float = 0.0
    max: int = 0
    histogram: Counter[int] = field(default_factory=Counter)

    def add(self, value: int) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self._m2 += delta * (value - self.mean)
        self.max = max(self.max, value)
        self.histogram[value] += 1

    @property
    def variance(self) -> float:
        return self._m2 / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "mean": round(self.mean, 6),
            "variance": round(self.variance, 6),
            "max": self.max,
            "histogram": {str(k): v for k, v in sorted(self.histogram.items())},
        }


@dataclass(frozen=True, slots=True)
class _Dropped:
    """A delta the apply thread dropped: its sender, step and norm."""

    sender: PeerId
    step: int
    norm: float


def _add_scaled(target: npt.NDArray[Any], delta: npt.NDArray[Any], weight: float) -> None:
    """target += weight * delta, in the target's dtype."""
    target += delta * np.asarray(weight, dtype=target.dtype)


class ParameterServer:
    """The parameter server of one run; see the module docstring.

    Args:
        params: the model's parameters, in manifest order, as writable numpy arrays (updated in
            place).
        version: the model version `params` hold (a checkpoint's, or 0).
        evaluate: run in the apply thread every `eval_every` updates and at the end; returns the
            accuracy of the model `params` describe.
        checkpoint_dir: where `config.checkpoint_every` writes checkpoints.
        on_update: called on the loop with each update's log line.
        aggregation: how a BSP round's deltas are combined and which deltas are dropped (see
            the module docstring); the plain mean by default.
    """

    def __init__(
        self,
        config: NodeConfig,
        manifest: RunManifest,
        params: Sequence[TensorBlob],
        *,
        version: int = 0,
        key: NodeKey | None = None,
        rng: random.Random | None = None,
        admission: Admission | None = None,
        evaluate: Callable[[], float | None] | None = None,
        eval_every: int = 0,
        checkpoint_dir: Path | None = None,
        on_update: Callable[[UpdateLog], None] | None = None,
        aggregation: AggregationConfig | None = None,
    ) -> None:
        self.config = config.validate()
        self.aggregation = (aggregation or AggregationConfig()).validate()
        self._gate = self.aggregation.norm_filter()  # the apply thread's only
        self._dropped: deque[_Dropped] = deque()  # the apply thread appends, the loop counts
        self._warned = WarnGate[PeerId](_WARN_EVERY_S)
        self.manifest = manifest
        rules.check_tensors(params, manifest.params, what="initial model")
        if any(not b.array.flags.writeable for b in params):
            raise ConfigError("params", "read-only arrays", "writable numpy arrays")
        if config.checkpoint_every and checkpoint_dir is None:
            raise ConfigError("checkpoint_dir", None, "a folder when checkpoint_every > 0")
        self.params = tuple(params)
        self.key = key or NodeKey.generate()
        self.admission = admission or Admission()
        self.auth = Authenticator(self.key, self.admission, max_skew_s=config.data.max_skew_s)
        self.machine: ServerMachine[DeltaPush] = ServerMachine(
            config.params(),
            config.sample,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            rng=rng if rng is not None else random.Random(os.urandom(16)),
            min_workers=config.min_peers,
            version=version,
        )
        self.metrics = ServerMetrics(self)
        self.data = DataPlaneServer(
            config.data,
            self,
            auth=self.auth,
            control=self,
            metrics=self.metrics.render,
            on_refusal=self._count_refusal,
        )
        self.evaluate, self.eval_every = evaluate, eval_every
        self.checkpoint_dir, self.on_update = checkpoint_dir, on_update
        self.counters: Counter[str] = Counter()
        self.staleness = StalenessStats()
        self.accuracy: float | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[Future[object]] = set()
        self._failure: BaseException | None = None
        self._waiters: dict[PeerId, asyncio.Future[bool]] = {}
        self._snapshot: tuple[int, asyncio.Future[tuple[TensorBlob, ...]]] | None = None
        self._finished = asyncio.Event()
        self._started = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._timer: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pml-apply")
        self._stack.callback(self._executor.shutdown, wait=True)
        try:
            await self._stack.enter_async_context(self.data)
            group = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._timer = group.create_task(self._timer_loop())
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "parameter server %s of run %s on %s: barrier %s, model version %d",
            self.short_id,
            self.manifest.tag,
            self.data.addr,
            self.config.barrier,
            self.version,
        )
        warn_if_open(self.admission, self.manifest.run_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        await self._stack.aclose()

    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def short_id(self) -> str:
        return self.peer_id.hex()[:8]

    @property
    def version(self) -> int:
        return self.machine.version

    @property
    def n_waiting(self) -> int:
        """Workers whose barrier request is waiting for the server's answer."""
        return len(self._waiters)

    @property
    def n_jobs(self) -> int:
        """Jobs submitted to the apply thread and not yet done."""
        return len(self._jobs)

    async def wait_finished(self, *, timeout_s: float | None = None) -> None:
        """Wait until enough workers came and every one still here has finished (or left), then
        let the updates queued so far reach the model and evaluate it."""
        async with asyncio.timeout(timeout_s):
            await self._finished.wait()
        await self.evaluate_now()

    async def evaluate_now(self) -> float | None:
        """The accuracy of the model with every update queued so far (None without `evaluate`)."""
        await self.flush()
        if self.evaluate is None:
            return None
        self.accuracy = await self._run(self.evaluate)
        return self.accuracy

    async def flush(self) -> None:
        """Wait until every update queued so far is in the model.

        Raises:
            Exception: what an apply job raised (a bug: deltas are checked before they queue).
        """
        await self._run(lambda: None)
        self._count_dropped()
        if self._failure is not None:
            raise self._failure

    # -- the apply thread ------------------------------------------------------------------------
    def _submit(self, fn: Callable[[], R]) -> Future[R]:
        if self._executor is None:
            raise RuntimeError("use the server inside 'async with ParameterServer(...)'")
        job = self._executor.submit(fn)
        self._jobs.add(job)  # type: ignore[arg-type]
        job.add_done_callback(self._job_done)  # type: ignore[arg-type]
        return job

    def _job_done(self, job: Future[object]) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None and self._failure is None:
            self._failure = job.exception()

    async def _run(self, fn: Callable[[], R]) -> R:
        return await asyncio.wrap_future(self._submit(fn))

    def _apply(self, update: Apply[DeltaPush]) -> None:
        if not self.aggregation.is_plain:
            self._apply_robust(update)
            return
        for msg in update.payloads:
            for param, blob in zip(self.params, msg.tensors, strict=True):
                _add_scaled(param.array, blob.array, update.weight)

    def _apply_robust(self, update: Apply[DeltaPush]) -> None:
        """Screen the update's deltas, then add the kept ones, combined by the rule when there
        are enough of them, with the update's total weight."""
        kept: list[tuple[DeltaPush, list[Array]]] = []
        for msg in update.payloads:
            arrays = [cast(Array, b.array) for b in msg.tensors]  # model parameters: floats
            norm = delta_norm(arrays)
            if admits(self._gate, norm):
                kept.append((msg, arrays))
            else:
                self._dropped.append(_Dropped(msg.sender, msg.step, norm))
        if not kept:
            return
        weight = update.weight * len(update.payloads) / len(kept)  # each kept delta's share
        combined = combine_group([a for _, a in kept], self.aggregation.rule)
        if combined is not None:
            for param, array in zip(self.params, combined, strict=True):
                _add_scaled(param.array, array, weight * len(kept))
            return
        for msg, _ in kept:
            for param, blob in zip(self.params, msg.tensors, strict=True):
                _add_scaled(param.array, blob.array, weight)

    def _count_dropped(self) -> None:
        """On the loop: count and log (once per worker per 10 s) the deltas dropped so far."""
        now = time.monotonic()
        while self._dropped:
            dropped = self._dropped.popleft()
            self.counters["rejected_outlier"] += 1
            if self._warned.open(dropped.sender, now=now) is None:
                continue
            log.warning(
                "dropped the delta of step %d from worker %s: its norm %.4g is out of line; "
                "more from it are counted as rejected_outlier and logged every %.0f s",
                dropped.step,
                dropped.sender.hex()[:8],
                dropped.norm,
                _WARN_EVERY_S,
            )

    def _copy(self) -> tuple[TensorBlob, ...]:
        return tuple(TensorBlob(b.name, b.array.copy()) for b in self.params)

    # -- events ----------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Act on what the machine decided: queue updates, release waiters, log evictions."""
        self._count_dropped()
        for event in self.machine.drain_events():
            match event:
                case Apply():
                    self._on_apply(event)
                case Released(worker=worker):
                    waiter = self._waiters.pop(worker, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(True)
                case Evicted():
                    self._on_evicted(event)
        if self.machine.finished and not self._finished.is_set():
            log.info("every worker has finished; model version %d", self.version)
            self._finished.set()

    def _on_apply(self, update: Apply[DeltaPush]) -> None:
        self._submit(lambda: self._apply(update))
        self.counters["updates"] += 1
        for value in update.staleness:
            self.staleness.add(value)
            self.metrics.staleness.observe(value)
        version = update.version
        every = self.config.checkpoint_every
        if every and version % every == 0:
            self._checkpoint(version)
        evaluate = self.evaluate
        due = evaluate is not None and self.eval_every and version % self.eval_every == 0
        line = UpdateLog(
            version=version,
            step=update.step,
            workers=[m.sender.hex()[:8] for m in update.payloads],
            staleness=list(update.staleness),
            weight=round(update.weight, 9),
            n_workers=len(self.machine.training()),
            accuracy=None,
            time_s=round(time.monotonic() - self._started, 4),
            unix_s=round(time.time(), 4),
        )
        if self.on_update is None:
            return
        if not due or evaluate is None:
            self.on_update(line)
            return
        callback = self.on_update
        job = asyncio.wrap_future(self._submit(evaluate))

        def report(done: asyncio.Future[float | None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.accuracy = done.result()
                callback(UpdateLog(**{**asdict(line), "accuracy": self.accuracy}))

        job.add_done_callback(report)

    def _checkpoint(self, version: int) -> None:
        folder = self.checkpoint_dir
        assert folder is not None, "checked in __init__"
        step = min((w.step for w in self.machine.workers.values()), default=0)
        tag = self.manifest.tag

        def save() -> None:
            try:
                path = save_checkpoint(
                    folder, CHECKPOINT_PREFIX, tag, self._copy(), version=version, step=step
                )
            except (ConfigError, OSError) as err:
                log.error("checkpoint of version %d failed: %s", version, err)
                return
            log.info("checkpoint of version %d written to %s", version, path)

        self._submit(save)
        self.counters["checkpoints"] += 1

    def _on_evicted(self, event: Evicted) -> None:
        who = event.worker.hex()[:8]
        if event.done:
            log.info("finished worker %s left", who)
            return
        self.counters["evictions"] += 1
        log.warning(
            "worker %s evicted at step %d: silent for %.1f s (heartbeat timeout %.1f s)",
            who,
            event.step,
            event.silent_s,
            self.config.heartbeat_timeout_s,
        )

    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self.machine.next_deadline()
            delay = _TICK_S if deadline is None else deadline - loop.time()
            await asyncio.sleep(min(_TICK_S, max(0.0, delay)))
            if self.machine.on_timer(now=loop.time()):
                self._pump()

    # -- requests --------------------------------------------------------------------------------
    def _check_run(self, run_tag: str, what: str, sender: PeerId) -> None:
        why = self.manifest.mismatch(run_tag)
        if why is not None:
            self.counters["rejected_other_run"] += 1
            raise Refused("other_run", f"{what} from {sender.hex()[:8]} refused: {why}")

    def _status(self, *, step: int, proceed: bool = False) -> ServerStatus:
        return ServerStatus(
            self.manifest.tag,
            self.peer_id,
            self.version,
            step,
            len(self.machine.training()),
            proceed,
        )

    async def on_control(self, msg: ControlMessage) -> ServerStatus:
        """A worker's Register, Heartbeat or BarrierRequest (the data plane's control route)."""
        self._check_run(msg.run_id, type(msg).__name__, msg.sender)
        now = asyncio.get_running_loop().time()
        match msg:
            case Register():
                start = self.machine.register(msg.sender, msg.step, now=now)
                self._pump()
                log.info("worker %s registered at step %d", msg.sender.hex()[:8], start)
                return self._status(step=start)
            case Heartbeat():
                self.machine.heartbeat(msg.sender, msg.step, done=msg.done, now=now)
                self._pump()
                return self._status(step=self.machine.workers[msg.sender].step)
            case BarrierRequest():
                return await self._barrier(msg)

    async def _barrier(self, msg: BarrierRequest) -> ServerStatus:
        worker = msg.sender
        decision = self.machine.ask(worker, msg.step, now=asyncio.get_running_loop().time())
        self._pump()
        step = self.machine.workers[worker].step
        if decision is Decision.PROCEED:
            return self._status(step=step, proceed=True)
        old = self._waiters.pop(worker, None)
        if old is not None and not old.done():
            old.set_result(False)  # a newer poll of the same worker replaces it
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[worker] = waiter
        try:
            async with asyncio.timeout(self.config.poll_s):
                proceed = await waiter
        except TimeoutError:
            proceed = False
        finally:
            if self._waiters.get(worker) is waiter:
                del self._waiters[worker]
                if not waiter.done():
                    self.machine.cancel(worker)
        state = self.machine.workers.get(worker)
        return self._status(step=state.step if state else step, proceed=proceed)

    def _count_refusal(self, path: str, code: str) -> None:
        """Count a delta the data plane refused before `on_delta` saw it (seal, size, rate)."""
        if path == "/v1/delta" and code in PLANE_CODES:
            self.counters["deltas_rejected"] += 1
            self.counters[f"rejected_{code}"] += 1

    async def on_delta(self, msg: DeltaPush) -> Ack:
        """Check a worker's delta and queue it (the data plane's delta route)."""
        try:
            self._check_run(msg.run_id, "delta", msg.sender)
            if msg.sender not in self.machine.workers:
                raise Refused(
                    "unknown_worker",
                    f"delta from {msg.sender.hex()[:8]}: not a registered worker "
                    "(evicted, or the server restarted); register again",
                )
            rules.check_tensors(msg.tensors, self.manifest.params)
            if sum(b.nbytes for b in msg.tensors) > OFFLOAD_BYTES:
                await asyncio.to_thread(rules.check_finite, msg)
            else:
                rules.check_finite(msg)
            if len(self._jobs) >= self.config.max_queued_deltas:
                await self._run(lambda: None)  # backpressure: the ack waits for the backlog
                self.counters["apply_backlog_waits"] += 1
            now = asyncio.get_running_loop().time()
            self.machine.push(msg.sender, msg.step, msg.base_version, msg, now=now)
        except Refused as err:
            self.counters["deltas_rejected"] += 1
            self.counters[f"rejected_{err.code}"] += 1
            raise
        self.counters["deltas_received"] += 1
        self._pump()
        return Ack(self.manifest.tag, self.peer_id, msg.step)

    async def on_model_request(self, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        """The current model, or "unchanged" when the worker already holds this version."""
        self._check_run(msg.run_id, "model request", msg.sender)
        version = self.version
        if msg.have_version == version:
            self.counters["models_unchanged"] += 1
            return ModelUnchanged(self.manifest.tag, self.peer_id, version)
        if self._snapshot is None or self._snapshot[0] != version:
            self._snapshot = (version, asyncio.wrap_future(self._submit(self._copy)))
        tensors = await asyncio.shield(self._snapshot[1])
        self.counters["models_served"] += 1
        step = min((w.step for w in self.machine.workers.values()), default=0)
        return ModelReply(self.manifest.tag, self.peer_id, version, step, tensors)

    def info(self) -> dict[str, InfoValue]:
        return {
            "peer_id": self.peer_id.hex(),
            "role": "server",
            "run": self.manifest.tag,
            "version": self.version,
            "workers": len(self.machine.workers),
        }

    def summary(self) -> dict[str, object]:
        """What the run came to at the server (for the run summary)."""
        return {
            "version": self.version,
            "accuracy": self.accuracy,
            "staleness": self.staleness.to_dict(),
            "workers_registered": self.machine.n_registered,
            "counters": dict(self.counters),
            "elapsed_s": round(time.monotonic() - self._started, 3),
        }
