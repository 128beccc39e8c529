"""Real `p2pml run` processes in network namespaces (see conftest.py): training through
kernel-level loss and a rate limit, and a partition that blocks the exchange of deltas and then
heals. Root only; both tests share one running swarm, whose start takes most of the time."""

from __future__ import annotations

import time

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(180),  # includes starting the swarm's four processes
]

N_NODES = 3
START_TIMEOUT_S = 150.0  # four processes importing torch on a busy 2-core machine


def delta_count(line: dict[str, object]) -> int:
    """Deltas that reached the node: taken, or refused (as stale, after a partition)."""
    return int(line["deltas_received"]) + int(line["deltas_rejected"])  # type: ignore[call-overload]


def last_step(swarm, i: int) -> int:
    log = swarm.steps(i)
    return int(log[-1]["step"]) if log else -1  # type: ignore[call-overload]


def test_netns_nodes_train_through_loss_and_a_rate_limit(swarm):
    steps = 40
    swarm.wait_for(
        f"every node trains {steps} steps",
        lambda: all(last_step(swarm, i) >= steps - 1 for i in range(N_NODES)),
        START_TIMEOUT_S,
    )
    for i in range(N_NODES):
        log = swarm.steps(i)
        first = int(log[0]["step"])  # a node that starts late joins at its peers' step
        assert [line["step"] for line in log] == list(range(first, first + len(log)))
        assert delta_count(log[-1]) > 0, swarm.report()
        stats = swarm.qdisc_stats(i)
        assert "tbf" in stats and " 0 bytes" not in stats.split("Sent", 1)[1][:20], stats


def test_netns_partition_blocks_deltas_and_heals(swarm):
    swarm.wait_for(
        "training starts",
        lambda: all(len(swarm.steps(i)) >= 5 for i in range(N_NODES)),
        START_TIMEOUT_S,
    )
    for j in range(1, N_NODES):  # node 0 against the others; the seed still reaches everyone
        swarm.cut(0, j)
    cut_at = time.time()

    def alone() -> bool:  # ten steps of node 0 in a row without a delta
        after = [delta_count(line) for line in swarm.steps(0) if float(line["unix_s"]) > cut_at]
        return len(after) >= 10 and after[-10] == after[-1]

    # Established TCP connections into a blackhole fail only at the push's ack timeout (5 s),
    # twice before the peers are forgotten.
    swarm.wait_for("node 0 trains alone", alone, 40)
    swarm.heal()
    blocked = delta_count(swarm.steps(0)[-1])
    swarm.wait_for(
        "deltas reach node 0 again", lambda: delta_count(swarm.steps(0)[-1]) > blocked, 30
    )
