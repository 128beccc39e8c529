"""Frozen configuration dataclasses with defaults and `validate()`, which raises `ConfigError`.

Must not import asyncio, sockets, time, module-level random, logging configuration or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from p2pml.core.barrier import BarrierParams, get_policy, make_params
from p2pml.core.limits import RateLimit
from p2pml.core.types import Address
from p2pml.errors import ConfigError

__all__ = [
    "DEFAULT_RPC_TIMEOUT_S",
    "STEP_TIME_DISTRIBUTIONS",
    "DataPlaneConfig",
    "OverlayConfig",
    "SimConfig",
    "StepTimeConfig",
]

STEP_TIME_DISTRIBUTIONS: Final[tuple[str, ...]] = ("exponential", "gamma", "lognormal", "constant")
DEFAULT_RPC_TIMEOUT_S: Final = 0.5
MAX_DATAGRAM_BYTES: Final = 8192  # the DHT's largest datagram (protocol/dht.py checks it)
SIM_ENGINES: Final[tuple[str, ...]] = ("fast", "exact")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class StepTimeConfig:
    """The distribution of one node's compute time per step.

    Attributes:
        dist: exponential, gamma, lognormal or constant.
        mean_s: the mean step time in seconds (> 0).
        shape: gamma's shape k, or lognormal's sigma; unused by exponential and constant (> 0).
    """

    dist: str = "exponential"
    mean_s: float = 0.5
    shape: float = 2.0

    def validate(self) -> StepTimeConfig:
        """Return self, or raise `ConfigError` naming the first bad field."""
        _require(
            self.dist in STEP_TIME_DISTRIBUTIONS,
            "step_time.dist",
            self.dist,
            "one of " + ", ".join(STEP_TIME_DISTRIBUTIONS),
        )
        _require(
            _is_finite(self.mean_s) and self.mean_s > 0,
            "step_time.mean_s",
            self.mean_s,
            "a finite number of seconds > 0",
        )
        _require(
            _is_finite(self.shape) and self.shape > 0,
            "step_time.shape",
            self.shape,
            "a finite number > 0",
        )
        return self


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulator run: the barrier, the population, the compute model and the seed.

    Attributes:
        barrier: a policy name (bsp, ssp, asp, pbsp, pssp).
        sample: beta, peers sampled per check (pbsp, pssp).
        staleness: s, in steps (ssp, pssp).
        strict: a lag of exactly s also blocks.
        nodes: P, the number of nodes (>= 1).
        duration_s: simulated seconds (> 0).
        step_time: the compute-time distribution.
        straggler_fraction: the fraction of nodes that are `straggler_slowdown` times slower.
        straggler_slowdown: the slowdown factor of stragglers (>= 1).
        check_delay_s: the round trip of one barrier check; a passing node starts this much later.
        hold_sample: re-check against the same sample until it passes, instead of a fresh one.
        poll_s: re-check a blocked node every `poll_s` seconds; None re-checks whenever any
            node's step changes (the model of the published PSP figures).
        seed: the run seed; the same seed gives the same trace.
        engine: "fast" (analytic pass probabilities) or "exact" (draws every sample).
    """

    barrier: str = "pssp"
    sample: int = 10
    staleness: int = 4
    strict: bool = False
    nodes: int = 200
    duration_s: float = 200.0
    step_time: StepTimeConfig = field(default_factory=StepTimeConfig)
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 4.0
    check_delay_s: float = 0.0
    hold_sample: bool = False
    poll_s: float | None = None
    seed: int = 0
    engine: str = "fast"

    def validate(self) -> SimConfig:
        """Return self, or raise `ConfigError` naming the first bad field, its value and range."""
        get_policy(self.barrier)
        _require(_is_int(self.nodes) and self.nodes >= 1, "nodes", self.nodes, "an integer >= 1")
        _require(
            _is_finite(self.duration_s) and self.duration_s > 0,
            "duration_s",
            self.duration_s,
            "a finite number of seconds > 0",
        )
        self.step_time.validate()
        _require(
            _is_finite(self.straggler_fraction) and 0 <= self.straggler_fraction <= 1,
            "straggler_fraction",
            self.straggler_fraction,
            "a fraction in [0, 1]",
        )
        _require(
            _is_finite(self.straggler_slowdown) and self.straggler_slowdown >= 1,
            "straggler_slowdown",
            self.straggler_slowdown,
            "a factor >= 1",
        )
        _require(
            _is_finite(self.check_delay_s) and self.check_delay_s >= 0,
            "check_delay_s",
            self.check_delay_s,
            "a finite number of seconds >= 0",
        )
        _require(
            self.poll_s is None or (_is_finite(self.poll_s) and self.poll_s > 0),
            "poll_s",
            self.poll_s,
            "None or a finite number of seconds > 0",
        )
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        _require(
            self.engine in SIM_ENGINES, "engine", self.engine, "one of " + ", ".join(SIM_ENGINES)
        )
        self.params()
        return self

    def params(self) -> BarrierParams:
        """The validated barrier params of this run."""
        return make_params(
            self.barrier, sample=self.sample, staleness=self.staleness, strict=self.strict
        )


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    """The HTTP data plane: where it listens, what it accepts and how long it waits.

    Attributes:
        listen: the bind address; port 0 picks a free port (read it back from the server).
        max_message_bytes: the largest delta or model body accepted (never unlimited).
        max_control_bytes: the largest body of a small message (an ack, a model request).
        idle_timeout_s: a connection that sends no complete request headers for this long is
            closed (idle keep-alive connections and slow-loris clients alike).
        body_timeout_s: the base time allowed to receive a body ...
        min_body_rate_bytes_per_s: ... plus its size at this rate; a slower sender gets 408.
        connect_timeout_s: the client's connection timeout.
        read_timeout_s: the longest the client waits for any data from a peer.
        max_connections_per_peer: the client's keep-alive pool size per peer.
        chunk_bytes: bodies are written in chunks of this size.
        read_buffer_bytes: aiohttp's read buffer (its 64 KiB default pauses reading too often).
        receive_pool_bytes: large receive buffers kept for reuse (0 turns reuse off); a buffer is
            reused only once nothing refers to the message received into it.
        peer_limit: requests and body bytes per second that one remote IP address may send
            (429 beyond); its byte burst must hold the largest message.
        max_requests_per_peer: requests of one remote IP address in progress at once (503 beyond).
        max_requests: requests in progress at once from everyone (503 beyond).
        max_limited_peers: remote addresses whose rate state is kept (least recent forgotten).
        max_skew_s: how far a frame's timestamp may be from this node's clock.
    """

    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 0))
    max_message_bytes: int = 1 << 30
    max_control_bytes: int = 64 * 1024
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 10.0
    min_body_rate_bytes_per_s: float = 5e6
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_connections_per_peer: int = 4
    chunk_bytes: int = 4 << 20
    read_buffer_bytes: int = 4 << 20
    receive_pool_bytes: int = 512 << 20
    peer_limit: RateLimit = field(
        default_factory=lambda: RateLimit(
            requests_per_s=500.0,
            request_burst=1000.0,
            bytes_per_s=float(4 << 30),
            byte_burst=float(2 << 30),
        )
    )
    max_requests_per_peer: int = 32
    max_requests: int = 512
    max_limited_peers: int = 4096
    max_skew_s: float = 120.0

    def validate(self) -> DataPlaneConfig:
        """Return self, or raise `ConfigError` naming the first bad field, its value and range."""
        for name in (
            "max_message_bytes",
            "max_control_bytes",
            "max_connections_per_peer",
            "chunk_bytes",
            "read_buffer_bytes",
            "max_requests_per_peer",
            "max_requests",
            "max_limited_peers",
        ):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        for name in (
            "idle_timeout_s",
            "body_timeout_s",
            "min_body_rate_bytes_per_s",
            "connect_timeout_s",
            "read_timeout_s",
            "max_skew_s",
        ):
            value = getattr(self, name)
            _require(_is_finite(value) and value > 0, name, value, "a finite number > 0")
        self.peer_limit.validate("peer_limit")
        limit = self.peer_limit
        _require(
            limit.bytes_per_s == 0 or limit.byte_burst >= self.max_message_bytes,
            "peer_limit.byte_burst",
            limit.byte_burst,
            f"at least max_message_bytes ({self.max_message_bytes}) when bytes are limited",
        )
        _require(
            self.max_control_bytes <= self.max_message_bytes,
            "max_control_bytes",
            self.max_control_bytes,
            f"at most max_message_bytes ({self.max_message_bytes})",
        )
        return self

    def body_deadline_s(self, n_bytes: int) -> float:
        """How long receiving a body of `n_bytes` may take."""
        return self.body_timeout_s + n_bytes / self.min_body_rate_bytes_per_s


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    """The DHT overlay: where it listens, how it looks up, estimates and samples.

    Attributes:
        listen: the UDP bind address (IPv4 or IPv6 literal); port 0 picks a free port.
        advertise: the address others should use (behind NAT, in containers), if not `listen`.
        k: Kademlia's bucket size and lookup width; also the rank of the estimator.
        alpha: lookup queries in flight at once.
        rpc_timeout_s: how long an RPC waits for its reply.
        stall_s: after this long an unanswered lookup query stops holding its slot.
        lookup_timeout_s: the budget of one whole lookup.
        evict_after_misses: consecutive unanswered RPCs after which a contact leaves the table
            (at once when a replacement is waiting).
        refresh_interval_s: how often the estimate, the sample pool and idle buckets refresh.
        refresh_after_join: run the first refresh as soon as the node has joined, rather than
            one interval later (so N^ and the pool are ready within seconds).
        estimate_lookups: L, the random lookups averaged into N^ per refresh.
        pool_draws: uniform draws added to the sample pool per refresh.
        pool_capacity: draws the pool keeps.
        max_pending_verifications: identity checks of new contacts in flight at once.
        max_stored_values: the DHT key/value store's entry cap.
        max_values_per_host: how many stored values one IP address may own.
        bootstrap_attempts: tries to reach the seeds before giving up.
        bootstrap_backoff_s: the first wait between tries; it doubles each time.
        max_contacts_per_ip: contacts from one IP address (an IPv6 /64) in the routing table,
            replacements included, in each lookup result and in the count behind N^; this node's
            own IP is exempt (its neighbours on the same machine: `p2pml local`).
        peer_limit: datagrams and bytes per second one source IP may send (replies to this
            node's own requests are not counted); excess is dropped before decoding.
        total_limit: the same for all sources together.
        max_limited_peers: source addresses whose rate state is kept (least recent forgotten).
        max_outstanding_requests: this node's requests awaiting a reply at once.
        max_skew_s: how far an info record's timestamp may be from this node's clock.
    """

    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 0))
    advertise: Address | None = None
    k: int = 20
    alpha: int = 3
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S
    stall_s: float = 0.15
    lookup_timeout_s: float = 5.0
    evict_after_misses: int = 2
    refresh_interval_s: float = 60.0
    refresh_after_join: bool = True
    estimate_lookups: int = 16
    pool_draws: int = 16
    pool_capacity: int = 64
    max_pending_verifications: int = 64
    max_stored_values: int = 1024
    max_values_per_host: int = 32
    bootstrap_attempts: int = 5
    bootstrap_backoff_s: float = 0.5
    max_contacts_per_ip: int = 3
    peer_limit: RateLimit = field(
        default_factory=lambda: RateLimit(
            requests_per_s=200.0,
            request_burst=400.0,
            bytes_per_s=float(256 << 10),
            byte_burst=float(512 << 10),
        )
    )
    total_limit: RateLimit = field(
        default_factory=lambda: RateLimit(
            requests_per_s=5000.0,
            request_burst=10000.0,
            bytes_per_s=float(8 << 20),
            byte_burst=float(16 << 20),
        )
    )
    max_limited_peers: int = 4096
    max_outstanding_requests: int = 4096
    max_skew_s: float = 120.0

    def validate(self) -> OverlayConfig:
        """Return self, or raise `ConfigError` naming the first bad field, its value and range."""
        for name, low in (
            ("k", 3),
            ("alpha", 1),
            ("evict_after_misses", 1),
            ("estimate_lookups", 1),
            ("pool_draws", 0),
            ("pool_capacity", 1),
            ("max_pending_verifications", 1),
            ("max_stored_values", 0),
            ("max_values_per_host", 0),
            ("bootstrap_attempts", 1),
            ("max_contacts_per_ip", 1),
            ("max_limited_peers", 1),
            ("max_outstanding_requests", 1),
        ):
            value = getattr(self, name)
            _require(_is_int(value) and value >= low, name, value, f"an integer >= {low}")
        for name in (
            "rpc_timeout_s",
            "stall_s",
            "lookup_timeout_s",
            "refresh_interval_s",
            "bootstrap_backoff_s",
            "max_skew_s",
        ):
            value = getattr(self, name)
            _require(_is_finite(value) and value > 0, name, value, "a finite number > 0")
        _require(self.k <= 64, "k", self.k, "at most 64 (replies must fit one datagram)")
        _require(
            isinstance(self.refresh_after_join, bool),
            "refresh_after_join",
            self.refresh_after_join,
            "true or false",
        )
        for name in ("peer_limit", "total_limit"):
            limit = getattr(self, name).validate(name)
            _require(
                limit.bytes_per_s == 0 or limit.byte_burst >= MAX_DATAGRAM_BYTES,
                f"{name}.byte_burst",
                limit.byte_burst,
                f"at least one datagram ({MAX_DATAGRAM_BYTES} bytes) when bytes are limited",
            )
        return self
