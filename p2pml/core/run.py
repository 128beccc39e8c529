"""A training run's identity and a peer-mode node's settings: `RunManifest` and `NodeConfig`.

Nodes train together only when they agree on the run ID and on the manifest: the hyperparameters
that must match (barrier, staleness, learning rate, model, ...) and the model's parameter names,
shapes and dtypes. Both are folded into one short *run tag*, ``<run id>@<16 hex digits>``, that a
node publishes in its signed ``info`` record and puts in every delta and model request; a peer whose
tag differs is refused with a message that says which part differs.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from p2pml.core.barrier import BarrierParams, make_params
from p2pml.core.config import DataPlaneConfig, OverlayConfig, _is_finite, _is_int
from p2pml.core.faults import FaultPlan
from p2pml.core.sampling import SampleSize
from p2pml.core.types import Address
from p2pml.errors import ConfigError

__all__ = [
    "HyperValue",
    "NodeConfig",
    "RunManifest",
    "TensorSpec",
    "parse_run_tag",
]

HyperValue = str | int | float | bool | None
_RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_DIGEST_BYTES: Final = 8
_DTYPES: Final = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A parameter as the manifest sees it: name, wire dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RunManifest:
    """What every node of a run must agree on.

    Attributes:
        run_id: letters, digits, ``.``, ``_`` and ``-``, at most 96 characters.
        hyperparameters: the settings that must match, as (name, value) pairs.
        params: the model's parameters in order.
    """

    run_id: str
    hyperparameters: tuple[tuple[str, HyperValue], ...]
    params: tuple[TensorSpec, ...]

    @classmethod
    def build(
        cls, run_id: str, hyperparameters: Mapping[str, HyperValue], params: Sequence[TensorSpec]
    ) -> RunManifest:
        """A validated manifest; hyperparameters are kept sorted by name.

        Raises:
            ConfigError: for a bad run ID, a non-finite number or an empty parameter list.
        """
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise ConfigError(
                "run_id",
                run_id,
                "1-96 letters, digits, '.', '_' or '-', starting with one of the first two",
            )
        for name, value in hyperparameters.items():
            if not isinstance(name, str) or not isinstance(value, HyperValue):
                raise ConfigError(
                    f"hyperparameter {name}", value, "a string, number, boolean or None"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"hyperparameter {name}", value, "a finite number")
        for spec in params:
            if spec.dtype not in _DTYPES or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in spec.shape
            ):
                raise ConfigError(
                    f"parameter {spec.name}",
                    f"{spec.dtype} {spec.shape}",
                    f"a dtype of {', '.join(_DTYPES)} and dimensions >= 0",
                )
        if not params:
            raise ConfigError("model parameters", "none", "at least one parameter tensor")
        return cls(run_id, tuple(sorted(hyperparameters.items())), tuple(params))

    @property
    def params_digest(self) -> str:
        """16 hex digits over the parameter names, dtypes and shapes."""
        rows = [[p.name, p.dtype, list(p.shape)] for p in self.params]
        return _digest(rows)

    @property
    def hyper_digest(self) -> str:
        """16 hex digits over the hyperparameters."""
        return _digest([[k, v] for k, v in self.hyperparameters])

    @property
    def digest(self) -> str:
        return _digest([self.hyper_digest, self.params_digest])

    @property
    def tag(self) -> str:
        """``<run id>@<digest>``: what peers compare."""
        return f"{self.run_id}@{self.digest}"

    def mismatch(self, other_tag: str) -> str | None:
        """None when `other_tag` is this run's tag, else a sentence saying what differs."""
        if other_tag == self.tag:
            return None
        other_id, _, other_digest = other_tag.partition("@")
        if not other_id:
            return f"it is in no run, this node in run {self.run_id!r}"
        if other_id != self.run_id:
            return f"it is in run {other_id!r}, this node in run {self.run_id!r}"
        return (
            f"its manifest {other_digest or '(none)'} differs from this node's {self.digest}: "
            "the hyperparameters or the model's parameter names, shapes or dtypes differ"
        )


def _digest(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST_BYTES).hexdigest()


def parse_run_tag(tag: str) -> tuple[str, str]:
    """Split a run tag into (run id, digest); ("", "") for a node in no run."""
    run_id, _, digest = tag.partition("@")
    return run_id, digest


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node of a run (peer, server or worker): its overlay, data plane, barrier and deltas.

    Attributes:
        overlay, data: the DHT and the HTTP data plane.
        bootstrap: seed or peer addresses to join through (none: this node starts a network).
        barrier, sample, staleness, strict: the barrier (`core/barrier.py`); `sample` is beta.
        min_peers: training starts only once this many other nodes of the run are known (so that
            a BSP run over "every known node" starts with everyone); 0 starts at once.
        join_timeout_s: how long to wait for `min_peers`.
        full_delivery_max: while the run has at most this many nodes, every delta goes to every
            node; beyond it, to `fanout` sampled nodes, with model averaging every `average_every`
            steps (0 turns averaging off).
        max_delta_age: a delta of step t reaching a node that has completed c steps is refused as
            stale when c - 1 - t exceeds this; None means the staleness bound s.
        recheck_s, recheck_max_s: a blocked barrier re-checks after `recheck_s`, doubling up to
            `recheck_max_s`; keep the cap well below a step time (a check is beta small RPCs), or
            a probabilistic barrier spends its gains sleeping (benchmarks/stragglers.py).
        barrier_timeout_s: the longest one barrier wait may take (BarrierTimeout after it).
        ack_timeout_s: how long a push waits for its acknowledgement, on top of the time the
            data plane allows for sending the body (`DataPlaneConfig.body_deadline_s`).
        max_queued_deltas: received deltas waiting to be applied; more are refused (503) by a
            peer, while a server delays its acknowledgement until the backlog drains.
        misses_to_forget: unanswered RPCs after which a run peer is forgotten.
        discover_interval_s: how often the node looks for run peers it does not know yet.
        linger_s: how long a finished node keeps answering before it leaves.
        heartbeat_interval_s: (worker) how often a worker tells its server it is alive.
        heartbeat_timeout_s: (server) a worker silent for this long is evicted.
        poll_s: (server) the long-poll window of a barrier request; a worker still blocked when it
            ends asks again.
        server_timeout_s: (worker) how long a worker keeps retrying, with backoff, a server it
            cannot reach before it fails.
        checkpoint_every: (server) save the model every this many updates (0: never).
        faults: a fault plan injected into this node's outgoing traffic (tests, chaos runs;
            `p2pml/io/faults.py`); None: none. faults_file: the file it came from, re-read
            when it changes so that a script can start and heal partitions at run time.
    """

    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    data: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    bootstrap: tuple[Address, ...] = ()
    barrier: str = "pssp"
    sample: SampleSize = field(default_factory=lambda: SampleSize(count=10))
    staleness: int = 4
    strict: bool = False
    min_peers: int = 0
    join_timeout_s: float = 60.0
    full_delivery_max: int = 32
    fanout: int = 8
    average_every: int = 10
    max_delta_age: int | None = None
    recheck_s: float = 0.002
    recheck_max_s: float = 0.025
    barrier_timeout_s: float = 600.0
    ack_timeout_s: float = 5.0
    max_queued_deltas: int = 256
    misses_to_forget: int = 2
    discover_interval_s: float = 2.0
    linger_s: float = 1.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    poll_s: float = 5.0
    server_timeout_s: float = 60.0
    checkpoint_every: int = 0
    faults: FaultPlan | None = None
    faults_file: str | None = None

    def validate(self) -> NodeConfig:
        """Return self, or raise `ConfigError` naming the first bad field, its value and range."""
        self.overlay.validate()
        self.data.validate()
        self.params()
        if self.faults is not None:
            self.faults.validate()
        for name, low in (
            ("min_peers", 0),
            ("full_delivery_max", 1),
            ("fanout", 1),
            ("average_every", 0),
            ("max_queued_deltas", 1),
            ("misses_to_forget", 1),
            ("checkpoint_every", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(name, value, f"an integer >= {low}")
        age = self.max_delta_age
        if age is not None and (not _is_int(age) or age < 0):
            raise ConfigError("max_delta_age", age, "an integer >= 0, or unset for s")
        if not isinstance(self.strict, bool):
            raise ConfigError("strict", self.strict, "true or false")
        beta = self.sample
        if not isinstance(beta, SampleSize) or (beta.count is None) == (beta.fraction is None):
            raise ConfigError("sample", beta, "a count of peers or a fraction of N^")
        if beta.count is not None and beta.count < 0:
            raise ConfigError("sample", beta.count, "a whole number of peers >= 0")
        for name in (
            "join_timeout_s",
            "recheck_s",
            "recheck_max_s",
            "barrier_timeout_s",
            "ack_timeout_s",
            "discover_interval_s",
            "heartbeat_interval_s",
            "heartbeat_timeout_s",
            "poll_s",
            "server_timeout_s",
        ):
            value = getattr(self, name)
            if not _is_finite(value) or value <= 0:
                raise ConfigError(name, value, "a finite number > 0")
        if not _is_finite(self.linger_s) or self.linger_s < 0:
            raise ConfigError("linger_s", self.linger_s, "a finite number >= 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "heartbeat_timeout_s",
                self.heartbeat_timeout_s,
                f"> heartbeat_interval_s ({self.heartbeat_interval_s})",
            )
        if self.poll_s >= self.data.read_timeout_s:
            limit = self.data.read_timeout_s
            raise ConfigError("poll_s", self.poll_s, f"< the data plane's read timeout ({limit})")
        if self.recheck_max_s < self.recheck_s:
            raise ConfigError(
                "recheck_max_s", self.recheck_max_s, f">= recheck_s ({self.recheck_s})"
            )
        return self

    def params(self) -> BarrierParams:
        """The barrier params; beta is resolved per check, so pbsp/pssp hold a placeholder 0."""
        return make_params(self.barrier, staleness=self.staleness, strict=self.strict)

    @property
    def delta_age_limit(self) -> int:
        return self.staleness if self.max_delta_age is None else self.max_delta_age
