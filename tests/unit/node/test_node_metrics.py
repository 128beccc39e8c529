"""`node/metrics.py` without sockets: separate registries per node, bounded reason labels."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pml.core.run import NodeConfig, RunManifest, TensorSpec
from p2pml.node.metrics import MAX_REASONS, bounded_reasons
from p2pml.node.node import Node

MANIFEST = RunManifest.build("metrics", {}, [TensorSpec("w", "float32", (4,))])


def samples(node: Node) -> dict[str, float]:
    text = node.metrics.render().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels or s.name.endswith("_count")
    }


def test_node_metrics_registries_are_separate_per_node():
    first, second = Node(NodeConfig(), MANIFEST), Node(NodeConfig(), MANIFEST)
    first.metrics.barrier_wait.observe(0.5)
    assert samples(first)["p2pml_barrier_wait_seconds_count"] == 1
    assert samples(second)["p2pml_barrier_wait_seconds_count"] == 0


def test_node_metrics_render_before_the_node_starts_without_overlay_values():
    got = samples(Node(NodeConfig(), MANIFEST))
    assert got["p2pml_step"] == 0
    assert "p2pml_dht_contacts" not in got and "p2pml_population_estimate" not in got
    assert "p2pml_loss" not in got  # nothing reported yet


def test_node_metrics_show_the_reported_loss_and_accuracy():
    node = Node(NodeConfig(), MANIFEST)
    node.record_loss(7, 1.5)
    node.record_accuracy(8, 0.75)
    got = samples(node)
    assert (got["p2pml_loss"], got["p2pml_loss_step"]) == (1.5, 7)
    assert (got["p2pml_accuracy"], got["p2pml_accuracy_step"]) == (0.75, 8)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"stale": 2, "shape": 1}, {"shape": 1, "stale": 2}),
        ({"Bad Code": 1, "x" * 40: 2, "ok": 3}, {"other": 3, "ok": 3}),
        ({"other": 1, "{evil}": 1}, {"other": 2}),
    ],
)
def test_bounded_reasons_merges_malformed_reasons_into_other(counts, expected):
    assert bounded_reasons(counts) == expected


def test_bounded_reasons_caps_the_number_of_distinct_reasons():
    counts = {f"r{i:03d}": 1 for i in range(MAX_REASONS + 10)}
    got = bounded_reasons(counts)
    assert len(got) == MAX_REASONS + 1 and got["other"] == 10
    assert sum(got.values()) == len(counts)
