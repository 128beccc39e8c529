from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str, timeout_s: float) -> list[str]:
    """Run ``examples/<name>`` with `args`; returns its stdout's lines once it exited 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_simulate_sweep_example_prints_one_row_per_run():
    rows = run_example("simulate_sweep.py", "--nodes", "20", "--duration", "10", timeout_s=60)
    assert rows[0].split() == ["run", "min", "median", "max", "spread"]
    assert [r.split()[0] for r in rows[1:]] == ["bsp", "asp", "pssp", "pssp", "pssp", "pssp"]


def test_overlay_swarm_example_prints_one_row_per_node():
    rows = run_example("overlay_swarm.py", "--nodes", "8", timeout_s=60)
    assert rows[0].split() == ["node", "contacts", "N^", "sample"]
    assert len(rows) == 9
    assert all(row.split()[2] == "8" for row in rows[1:])  # a small network is counted exactly
    assert all(len(row.split()) == 6 for row in rows[1:])  # three sampled peers each


def test_three_nodes_example_trains_every_node():
    rows = run_example("three_nodes.py", "--steps", "60", timeout_s=90)
    assert rows[0].split() == ["node", "steps", "accuracy", "waited_s", "deltas_received"]
    assert len(rows) == 4
    for row in rows[1:]:
        _, steps, accuracy, _, received = row.split()
        assert int(steps) == 60 and float(accuracy) > 0.5 and int(received) > 0


def test_parameter_server_example_trains_three_workers():
    rows = run_example("parameter_server.py", "--steps", "60", timeout_s=90)
    assert rows[0].split() == ["worker", "steps", "waited_s"]
    assert [int(row.split()[1]) for row in rows[1:4]] == [60, 60, 60]
    assert rows[4].startswith("server: model version 180, accuracy ")
    assert float(rows[4].split("accuracy ")[1].split(",")[0]) > 0.5


def test_embedded_async_example_trains_every_node_to_the_same_model():
    rows = run_example("embedded_async.py", "--steps", "40", timeout_s=60)
    assert rows[0].split() == ["node", "steps", "loss_before", "loss_after"]
    assert len(rows) == 5
    for row in rows[1:4]:
        _, steps, before, after = row.split()
        assert int(steps) == 40 and float(after) < float(before) / 10
    assert float(rows[4].rsplit(" ", 1)[1]) < 1e-4


def test_embedded_sync_example_trains_from_plain_threads_without_torch():
    rows = run_example("embedded_sync.py", "--steps", "40", timeout_s=60)
    assert rows[0].split() == ["node", "steps", "loss_before", "loss_after", "accuracy"]
    for row in rows[1:4]:
        _, steps, before, after, accuracy = row.split()
        assert int(steps) == 40 and float(after) < float(before) and float(accuracy) > 0.8
    assert rows[4:] == ["identical parameters on every node: True", "torch imported: False"]
