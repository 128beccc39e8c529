"""The command line as a user runs it: a subprocess, JSON out, one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SMALL = ["--nodes", "30", "--duration", "20", "--seed", "4"]
RUN_FIELDS = {
    "barrier",
    "sample",
    "staleness",
    "nodes",
    "duration",
    "min",
    "median",
    "mean",
    "max",
    "wall_s",
    "spread",
    "steps",
}


def p2pml(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pml", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def simulate_json(tmp_path: Path, *args: str, name: str = "out.json") -> dict:
    out = tmp_path / name
    proc = p2pml("simulate", *args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_simulate_writes_one_run_per_barrier_with_the_contract_fields(tmp_path):
    data = simulate_json(tmp_path, *SMALL, "--barrier", "bsp,ssp,asp,pbsp,pssp")
    assert [r["barrier"] for r in data["runs"]] == ["bsp", "ssp", "asp", "pbsp", "pssp"]
    for run in data["runs"]:
        assert set(run) >= RUN_FIELDS
        assert run["min"] <= run["median"] <= run["max"]
        assert len(run["steps"]) == 30
    assert data["params"]["nodes"] == 30
    assert [r["sample"] for r in data["runs"]] == [None, None, None, 10, 10]
    assert [r["staleness"] for r in data["runs"]] == [None, 4, None, None, 4]


def test_simulate_comma_lists_run_a_sweep(tmp_path):
    data = simulate_json(
        tmp_path, *SMALL, "--barrier", "pssp", "--sample", "2,4,10%", "--staleness", "1,3"
    )
    assert [(r["sample"], r["staleness"]) for r in data["runs"]] == [
        (2, 1),
        (2, 3),
        (4, 1),
        (4, 3),
        (3, 1),
        (3, 3),
    ]


def test_simulate_same_seed_same_json_except_wall_times(tmp_path):
    first = simulate_json(tmp_path, *SMALL, name="a.json")
    second = simulate_json(tmp_path, *SMALL, name="b.json")
    for data in (first, second):
        for run in data["runs"]:
            run.pop("wall_s")
    assert first == second


def test_simulate_different_seeds_give_different_runs(tmp_path):
    first = simulate_json(tmp_path, *SMALL, name="a.json")
    second = simulate_json(tmp_path, *SMALL[:-1], "5", name="b.json")
    assert [r["steps"] for r in first["runs"]] != [r["steps"] for r in second["runs"]]


def test_simulate_writes_a_png_plot_and_prints_a_table(tmp_path):
    png = tmp_path / "cdf.png"
    proc = p2pml("simulate", *SMALL, "--barrier", "bsp,pssp", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert "median" in proc.stdout and "pssp" in proc.stdout
    assert str(png) in proc.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "abc"], "--nodes"),
        (["--sample", "-1"], "--sample"),
        (["--sample", "1,x"], "--sample"),
        (["--barrier", "foo"], "--barrier"),
        (["--barrier", "bsp,bsp"], "--barrier"),
        (["--staleness", "-2"], "--staleness"),
        (["--duration", "0"], "--duration"),
        (["--poll", "-1"], "--poll"),
        (["--step-time", "weibull"], "--step-time"),
        (["--stragglers", "2"], "--stragglers"),
        (["--engine", "turbo"], "--engine"),
        (["--json", "/nonexistent-dir/out.json"], "--json"),
        (["--plot", "/nonexistent-dir/out.png"], "--plot"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_simulate_bad_input_is_one_line_naming_the_flag_with_exit_2(args, flag):
    proc = p2pml("simulate", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_simulate_unwritable_json_fails_before_running(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    proc = p2pml("simulate", "--nodes", "10000", "--json", str(target))
    assert proc.returncode == 2
    assert "--json" in proc.stderr and "directory" in proc.stderr


def test_bounds_json_reproduces_the_published_minima(tmp_path):
    out = tmp_path / "bounds.json"
    proc = p2pml(
        "bounds", "--staleness", "4", "--length", "10000", "--sample", "1,2,128", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    runs = {r["sample"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs[1]["min_mean"] == pytest.approx(14.66, abs=0.05)
    assert runs[2]["min_second"] == pytest.approx(48.57, abs=0.05)
    assert runs[128]["min_mean"] == pytest.approx(9.58, abs=0.05)
    assert {"argmin_mean_a", "argmin_second_a", "curve"} <= set(runs[1])
    assert len(runs[1]["curve"]) == 199


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--sample", "0"], "--sample"),
        (["--length", "3"], "--length"),
        (["--staleness", "-1"], "--staleness"),
        (["--points", "1"], "--points"),
    ],
)
def test_bounds_bad_input_is_one_line_naming_the_flag_with_exit_2(args, flag):
    proc = p2pml("bounds", *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert flag in proc.stderr


def test_version_and_help_exit_zero():
    assert p2pml("--version").stdout.startswith("p2pml ")
    help_text = p2pml("simulate", "--help")
    assert help_text.returncode == 0
    assert "--barrier" in help_text.stdout
