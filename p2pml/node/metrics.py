"""Prometheus metrics of a node: `NodeMetrics` for a peer-mode `Node`, `ServerMetrics` for a
`ParameterServer`; both are served at ``GET /metrics`` of the owner's data plane.

Each owner has its own `CollectorRegistry` (several nodes share a process in tests and embeddings;
the global registry is never used). Most values are read from the owner's state when Prometheus
scrapes (its counters, the data plane's refusals and byte counts, the overlay's table), so nothing
is counted twice; only what happens at an instant is recorded as it happens: barrier wait times
and staleness (histograms), the size of the last barrier sample, and the loss and accuracy the
training layer reports.

Every name starts with ``p2pml_``. Label values that come from peers (the codes of their refusals)
are bounded: a malformed code or one past `MAX_REASONS` distinct codes counts as ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from p2pml.io.http import DataPlaneClient, DataPlaneServer
    from p2pml.node.node import Node
    from p2pml.node.server import ParameterServer

__all__ = ["BARRIER_WAIT_BUCKETS_S", "STALENESS_BUCKETS", "NodeMetrics", "ServerMetrics"]

BARRIER_WAIT_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
STALENESS_BUCKETS: Final = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
MAX_REASONS: Final = 32
_REASON: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PUSH_REFUSED: Final = "push_refused_"


def bounded_reasons(counts: Mapping[str, int]) -> dict[str, int]:
    """`counts` by reason, with malformed reasons and those past the first `MAX_REASONS` (in
    sorted order, so the choice is stable between scrapes) merged into ``other``."""
    out: dict[str, int] = {}
    for reason, n in sorted(counts.items()):
        ok = _REASON.fullmatch(reason) is not None and (reason in out or len(out) < MAX_REASONS)
        key = reason if ok else "other"
        out[key] = out.get(key, 0) + n
    return out


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


def _info(peer_id: bytes, run: str, role: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "p2pml_node_info", "Who this node is (always 1).", labels=["peer_id", "run", "role"]
    )
    family.add_metric([peer_id.hex(), run, role], 1)
    return family


def _rejections(server: DataPlaneServer) -> CounterMetricFamily:
    return _labelled(
        "p2pml_rejections",
        "Requests this node's data plane refused (deltas, model pulls, control), by reason.",
        "reason",
        bounded_reasons(server.rejections),
    )


def _traffic(server: DataPlaneServer, client: DataPlaneClient | None) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "p2pml_data_bytes",
        "Bytes of p2pml frames moved over the HTTP data plane (request and reply bodies), by "
        "direction and route.",
        labels=["direction", "route"],
    )
    for direction, mine, theirs in (
        ("in", server.bytes_in, client.bytes_in if client else None),
        ("out", server.bytes_out, client.bytes_out if client else None),
    ):
        total = mine + theirs if theirs is not None else mine
        for route, n in sorted(total.items()):
            family.add_metric([direction, route], n)
    return family


class _Registry:
    """One owner's registry and its text rendering."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)

    def render(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4 (`io.http.METRICS_CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class NodeMetrics(_Registry):
    """The metrics of one peer-mode `Node`; the node records events through its attributes.

    Attributes:
        barrier_wait: seconds of each barrier wait that let the node proceed.
        sampled_peers: peers asked in the latest barrier check.
        loss, accuracy: (step, value) as the training layer last reported them, or None.
    """

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._node = node
        self.loss: tuple[int, float] | None = None
        self.accuracy: tuple[int, float] | None = None
        self.barrier_wait = Histogram(
            "p2pml_barrier_wait_seconds",
            "Time from the start of a barrier wait until it let the node proceed.",
            buckets=BARRIER_WAIT_BUCKETS_S,
            registry=self.registry,
        )
        self.sampled_peers = Gauge(
            "p2pml_sampled_peers",
            "Run peers asked for their step in the latest barrier check.",
            registry=self.registry,
        )
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The node's state at scrape time (called by the registry)."""
        node = self._node
        counters = node.counters
        yield _info(node.peer_id, node.manifest.tag, "peer")
        yield _gauge("p2pml_step", "Steps this node has completed and announced.", node.step)
        yield from _progress(self.loss, self.accuracy)
        yield _labelled(
            "p2pml_deltas",
            "Deltas: out = pushed and acknowledged by a peer, in = received from peers and "
            "accepted.",
            "direction",
            {"out": counters["deltas_sent"], "in": counters["deltas_received"]},
        )
        yield _rejections(node.server)
        yield _labelled(
            "p2pml_push_failures",
            "Delta pushes that failed: refused by the peer (by its reason) or unreachable.",
            "reason",
            _push_failures(counters),
        )
        yield _traffic(node.server, node.client)
        yield _gauge("p2pml_queued_deltas", "Accepted deltas waiting to be applied.", node.n_queued)
        yield _counter(
            "p2pml_model_averages",
            "Models pulled from a peer to average with (gossip).",
            counters["model_averages"],
        )
        yield from self._membership()

    def _membership(self) -> Iterator[Metric]:
        """Peers, barrier checks and the overlay."""
        node = self._node
        counters = node.counters
        yield _gauge(
            "p2pml_live_peers", "Run peers known and not finished.", len(node.peers.live())
        )
        asked, silent = counters["barrier_asked"], counters["barrier_unanswered"]
        yield _labelled(
            "p2pml_barrier_queries",
            "Step queries to sampled peers during barrier waits, by outcome.",
            "outcome",
            {"answered": asked - silent, "unanswered": silent},
        )
        yield _counter(
            "p2pml_barrier_timeouts", "Barrier waits that timed out.", counters["barrier_timeouts"]
        )
        if node.overlay.endpoint.addr is not None:  # the DHT socket is open
            yield _gauge("p2pml_population_estimate", "The population estimate N^.", node.n_hat())
            yield _gauge(
                "p2pml_dht_contacts",
                "Verified contacts in the DHT routing table.",
                len(node.overlay.contacts()),
            )


def _progress(
    loss: tuple[int, float] | None, accuracy: tuple[int, float] | None
) -> Iterable[Metric]:
    """The latest training loss and accuracy with their steps, once the trainer reported them."""
    if loss is not None:
        yield _gauge("p2pml_loss", "Training loss of the latest reported step.", loss[1])
        yield _gauge("p2pml_loss_step", "The step `p2pml_loss` was measured in.", loss[0])
    if accuracy is not None:
        yield _gauge("p2pml_accuracy", "Latest evaluated accuracy (0..1).", accuracy[1])
        yield _gauge(
            "p2pml_accuracy_step", "The step `p2pml_accuracy` was measured after.", accuracy[0]
        )


def _push_failures(counters: Mapping[str, int]) -> dict[str, int]:
    refused = {
        key.removeprefix(_PUSH_REFUSED): n
        for key, n in counters.items()
        if key.startswith(_PUSH_REFUSED)
    }
    out = bounded_reasons(refused)
    out["unreachable"] = out.get("unreachable", 0) + counters.get("push_failed", 0)
    return out


class ServerMetrics(_Registry):
    """The metrics of one `ParameterServer`.

    Attributes:
        staleness: the staleness of each applied delta, in model versions (one per update).
    """

    def __init__(self, server: ParameterServer) -> None:
        super().__init__()
        self._server = server
        self.staleness = Histogram(
            "p2pml_delta_staleness_steps",
            "Staleness of each applied delta: the model version it was applied to minus the "
            "version it was computed from.",
            buckets=STALENESS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The server's state at scrape time (called by the registry)."""
        server = self._server
        counters = server.counters
        yield _info(server.peer_id, server.manifest.tag, "server")
        yield _gauge("p2pml_model_version", "Updates applied to the model so far.", server.version)
        yield from _workers(server)
        yield _counter(
            "p2pml_updates", "Model updates (batches of deltas) applied.", counters["updates"]
        )
        yield _labelled(
            "p2pml_deltas",
            "Deltas received from workers and accepted.",
            "direction",
            {"in": counters["deltas_received"]},
        )
        yield _rejections(server.data)
        yield _counter(
            "p2pml_evictions",
            "Workers evicted after missing their heartbeats (not counting finished ones).",
            counters["evictions"],
        )
        yield _labelled(
            "p2pml_model_requests",
            "Model pulls answered, by reply: the model, or unchanged when the worker held it.",
            "reply",
            {"model": counters["models_served"], "unchanged": counters["models_unchanged"]},
        )
        yield _traffic(server.data, None)
        yield _gauge("p2pml_apply_backlog", "Jobs queued for the apply thread.", server.n_jobs)
        yield _counter("p2pml_checkpoints", "Checkpoints started.", counters["checkpoints"])
        if server.accuracy is not None:
            yield _gauge("p2pml_accuracy", "Latest evaluated accuracy (0..1).", server.accuracy)


def _workers(server: ParameterServer) -> Iterator[Metric]:
    machine = server.machine
    yield _gauge(
        "p2pml_workers_registered",
        "Distinct workers that have registered (one back after eviction counts once).",
        machine.n_registered,
    )
    yield _gauge("p2pml_workers_live", "Workers in the step table.", len(machine.workers))
    yield _gauge(
        "p2pml_workers_training", "Live workers that have not finished.", len(machine.training())
    )
    yield _gauge("p2pml_barrier_waiters", "Workers long-polling the barrier.", server.n_waiting)
