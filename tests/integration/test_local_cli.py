"""``p2pml local`` and ``p2pml plot`` as a user runs them: a whole run of three OS processes with
every output file, Ctrl-C, a crashed node, the centralised mode, and bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pml.cli import main

pytestmark = pytest.mark.integration

SMALL = ["--dataset", "digits", "--eval-every", "5", "--", "--batch-size", "16"]
STEP_FIELDS = {"step", "loss", "accuracy", "wait_s", "n_hat", "deltas_sent", "deltas_received"}
SUMMARY_FIELDS = {
    "name",
    "status",
    "exit_code",
    "steps",
    "final_loss",
    "final_accuracy",
    "wait_s",
    "deltas_sent",
    "deltas_received",
    "deltas_rejected",
}


def launch(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pml", "local", "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def wait_until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def node_pids(out: Path) -> dict[str, int]:
    meta = json.loads((out / "metadata.json").read_text())
    return {n["name"]: n["pid"] for n in meta["nodes"]}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_three_nodes_write_every_output_file_with_the_documented_fields(tmp_path):
    out = tmp_path / "run"
    # This shell's P2PML_* settings are p2pml run's, not the launcher's: they must not reach
    # the nodes (three nodes on one HTTP port, one model file for all).
    leaks = {"P2PML_HTTP_LISTEN": "127.0.0.1:9", "P2PML_SAVE": str(tmp_path / "shared.p2pml")}
    proc = launch(out, "--nodes", "3", "--steps", "12", "--slow", "0,0,0.02", *SMALL, env=leaks)
    output, _ = proc.communicate(timeout=110)
    assert proc.returncode == 0, output

    meta = json.loads((out / "metadata.json").read_text())
    assert {"command", "started_at", "params", "versions", "seeds", "host", "nodes"} <= set(meta)
    assert meta["params"]["nodes"] == 3 and meta["params"]["slow"] == [0.0, 0.0, 0.02]
    assert meta["versions"]["p2pml"] and meta["versions"]["torch"]
    assert meta["host"]["cpus"] >= 1
    assert [n["name"] for n in meta["nodes"]] == ["seed", "node-0", "node-1", "node-2"]
    assert "--batch-size" in meta["nodes"][1]["argv"]  # flags after -- reach every node

    for i in range(3):
        log = lines(out / f"node-{i}.jsonl")
        assert [r["step"] for r in log] == list(range(12))
        assert set(log[-1]) >= STEP_FIELDS and log[-1]["accuracy"] is not None
        assert (out / f"node-{i}.stderr.log").stat().st_size > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    rows = {r["name"]: r for r in summary["nodes"]}
    assert set(rows) == {"node-0", "node-1", "node-2"}
    for row in rows.values():
        assert set(row) >= SUMMARY_FIELDS
        assert row["status"] == "finished" and row["exit_code"] == 0 and row["steps"] == 12
        assert 0 < row["final_accuracy"] <= 1 and row["final_loss"] > 0
        assert row["deltas_received"] > 0 and row["deltas_rejected"] == 0
    assert rows["node-2"]["slow_s"] == 0.02

    for png in ("training.png", "steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "finished" in output and "summary.json" in output
    assert not (tmp_path / "shared.p2pml").exists()

    # p2pml plot redraws it and overlays it with itself, with one verdict line per run.
    (out / "training.png").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "p2pml", "plot", str(out), str(out), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "training.png").exists() and (tmp_path / "compare.png").exists()
    verdicts = done.stdout.splitlines()
    assert len(verdicts) == 2 and "median 12 steps per node" in verdicts[0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_child_and_still_writes_the_summary(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "--nodes", "3", "--steps", "100000", *SMALL)
    try:
        wait_until(
            lambda: all(lines(out / f"node-{i}.jsonl") for i in range(3)), 90, "three nodes' steps"
        )
        pids = node_pids(out)
        assert all(alive(p) for p in pids.values())
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    wait_until(lambda: not any(alive(p) for p in pids.values()), 10, "no child left")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert {r["status"] for r in summary["nodes"]} == {"stopped"}
    assert all(r["steps"] >= 1 for r in summary["nodes"])


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_crashed_node_is_reported_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "--nodes", "3", "--steps", "60", "--barrier", "asp", *SMALL)
    try:
        wait_until(lambda: lines(out / "node-1.jsonl"), 90, "node-1's first step")
        os.kill(node_pids(out)["node-1"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "node-1 crashed (exit -9); the run goes on" in output
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["nodes"]}
    assert rows["node-1"]["status"] == "crashed" and rows["node-1"]["exit_code"] == -9
    assert rows["node-0"]["status"] == rows["node-2"]["status"] == "finished"
    assert rows["node-0"]["steps"] == rows["node-2"]["steps"] == 60


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_centralised_mode_runs_a_server_and_workers(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        out,
        *("--role", "server", "--nodes", "2", "--steps", "10", "--barrier", "bsp"),
        *("--time-budget", "300"),  # the workers' budget: the server stops with them
        *SMALL,
    )
    output, _ = proc.communicate(timeout=110)
    assert proc.returncode == 0, output
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["nodes"]}
    assert set(rows) == {"server", "worker-0", "worker-1"}
    assert rows["server"]["model_version"] == 10  # BSP: one update per round of 2 deltas
    assert rows["worker-0"]["steps"] == rows["worker-1"]["steps"] == 10
    assert lines(out / "server.jsonl")[-1]["version"] == 10


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_each_node_checkpoints_into_its_own_folder_and_a_rerun_starts_afresh(tmp_path):
    out = tmp_path / "run"
    for _ in range(2):  # the second run replaces the first's outputs, checkpoints included
        proc = launch(out, "--nodes", "2", "--steps", "10", *SMALL, "--checkpoint-every", "5")
        output, _ = proc.communicate(timeout=70)
        assert proc.returncode == 0, output
        for name in ("node-0", "node-1"):
            saved = sorted(p.name for p in (out / "checkpoints" / name).iterdir())
            assert saved == ["node-000000000005.p2pml", "node-000000000010.p2pml"]
        argv = json.loads((out / "metadata.json").read_text())["nodes"][1]["argv"]
        assert str(out / "checkpoints" / "node-0") in argv


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_run_where_no_node_finished_fails(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, "--nodes", "2", "--model", "resnet", *SMALL)
    output, _ = proc.communicate(timeout=80)
    assert proc.returncode == 1, output
    assert "no node finished" in output and "--model" in output  # each crash's own line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert {r["status"] for r in summary["nodes"]} == {"crashed"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--", "--save", "model.p2pml"], "--save"),
        (["--", "--checkpoint-dir", "ck"], "--checkpoint-dir"),
        (["--staleness", "-1"], "--staleness"),
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "3", "--slow", "1,2"], "--slow"),
        (["--slow", "-1"], "--slow"),
        (["--barrier", "fastest"], "--barrier"),
        (["--role", "worker"], "--role"),
        (["--steps", "0"], "--steps"),
        (["--", "--listen", "127.0.0.1:5"], "--listen"),
        (["--", "--no-such-flag", "1"], "--no-such-flag"),
        (["--", "--lr", "fast"], "--lr"),
        (["--dataset", "mnist"], "--data-dir"),
    ],
)
def test_bad_flags_end_with_one_line_naming_the_flag(tmp_path, capsys, args, named):
    assert main(["local", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metadata.json").exists()


@pytest.mark.parametrize("metadata", [None, '{"project": "mine"}'])
def test_a_folder_that_is_not_a_run_is_never_overwritten(tmp_path, capsys, metadata):
    (tmp_path / "notes.jsonl").write_text("mine\n")
    if metadata is not None:  # somebody else's metadata.json is not a run's
        (tmp_path / "metadata.json").write_text(metadata)
    assert main(["local", "--out", str(tmp_path), "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.jsonl").read_text() == "mine\n"


def test_plot_refuses_a_folder_without_logs(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "node logs" in err and len(err.strip().splitlines()) == 1
