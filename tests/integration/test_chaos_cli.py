"""benchmarks/chaos.py (issue 8): its measures on hand-made traces, and one small chaos run of real
processes (4 nodes, one kill -9 and restart, a 5 s partition, the seed killed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("chaos_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_chaos_convergence_counts_from_the_heal_until_the_spread_is_back_within_s():
    chaos = load_script()
    times = tuple(k / 2 for k in range(41))  # 0, 0.5, ..., 20 s
    # node-0 steps at 2 steps/s; node-1 is 8 ahead until the heal at t = 10, then waits at
    # step 29 until node-0 is 2 behind it (t = 13), then steps along: spread 4 at t = 12.
    steady = tuple(2 * round(t * 2) // 2 + 1 for t in times)
    runner = tuple(s + 8 if t <= 10 else max(29, s + 2) for t, s in zip(times, steady, strict=True))
    traces = [
        chaos.Trace("node-0", 0, times, steady, 20.0),
        chaos.Trace("node-1", 1, times, runner, 20.0),
    ]
    assert [chaos.spread_at(traces, t) for t in (10.0, 11.0, 12.0, 13.0, 19.0)] == [8, 6, 4, 2, 2]
    seconds, steps = chaos.convergence(traces, 10.0, 20.0, bound=4, hold_s=2.0, dt=0.25)
    assert seconds == pytest.approx(2.0)
    assert steps == 2  # the median of node-0's 4 steps and node-1's none
    assert chaos.convergence(traces, 10.0, 20.0, bound=1, hold_s=2.0, dt=0.25) is None


def test_chaos_spread_leaves_out_a_node_once_it_is_killed():
    chaos = load_script()
    times = tuple(float(t) for t in range(21))
    steady = chaos.Trace("node-0", 0, times, tuple(range(1, 22)), 20.0)
    dead = chaos.Trace("node-2", 2, times[:5], (1, 2, 3, 4, 5), 5.5)  # killed at t = 5.5
    assert chaos.spread_at([steady, dead], 5.0) == 1
    assert chaos.spread_at([steady, dead], 12.0) == 0
    assert chaos.steps_between([steady, dead], 2.0, 12.0) == {"node-0": 10, "node-2": 2}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_script_small_run_reports_every_phase_and_its_expectations(tmp_path):
    # No random loss here (a delay and the partition only): this small run checks the script and
    # the phases; the lossy must-shows are the full benchmark's (benchmarks/chaos.py).
    out = tmp_path / "chaos"
    args = [
        "--part", "chaos", "--nodes", "4", "--kill", "3", "--dataset", "digits", "--loss", "0",
        "--node-slow-s", "0.05", "--checkpoint-every", "5", "--chaos-eval-every", "20",
        "--warmup-s", "2", "--down-s", "1.5", "--settle-s", "3", "--plan-lead-s", "1.5",
        "--partition-s", "4", "--heal-s", "4", "--tail-s", "2", "--end-timeout-s", "60",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=230,
    )
    report = done.stdout + done.stderr
    result = json.loads((out / "chaos.json").read_text())
    checks = result["expectations"]
    assert done.returncode == (0 if all(c["ok"] for c in checks) else 1), report
    held = {c["expectation"].split(" (")[0].split(" at most")[0]: c["ok"] for c in checks}
    for name in (
        "chaos: every node not killed finishes",
        "chaos: the restarted node trains again",
        "chaos: both halves train during the partition",
        "chaos: training continues after the seed died",
    ):
        assert held[name], (name, checks, report)
    chaos = result["chaos"]
    assert [row["phase"] for row in chaos["phases"]] == [
        "a lossy training",
        "b kill -9",
        "c restart",
        "d partition",
        "d heal",
        "e seed down",
        "f finish",
    ]
    assert chaos["nodes"]["node-3"]["killed"] and chaos["nodes"]["node-3"]["exit_code"] != 0
    assert chaos["nodes"]["node-3r"]["exit_code"] == 0
    assert chaos["figures"]["rejoin"]["source"] in ("checkpoint", "peer")
    heal = chaos["figures"]["heal"]
    assert isinstance(heal["spread_at_heal"], int) and "converged_after_s" in heal
    assert chaos["figures"]["remerge"]["plan_reloaded_by"] >= 3  # every node then alive
    assert (out / "chaos.png").stat().st_size > 0
    for name in ("node-0.jsonl", "node-3r.jsonl", "node-3r.stderr.log", "seed.log", "faults.toml"):
        assert (out / "chaos" / name).exists(), name
    assert "d partition" in done.stdout
