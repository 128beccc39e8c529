"""``p2pml run`` as a user runs it: bad flags, one node alone, three nodes in three processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from p2pml.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--barrier", "fastest"], "--barrier"),
        (["--sample", "ten"], "--sample"),
        (["--sample", "150%"], "--sample"),
        (["--staleness", "-1"], "--staleness"),
        (["--shard", "4/4"], "--shard"),
        (["--steps", "0"], "--steps"),
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--slow", "-2"], "--slow"),
        (["--listen", "localhost:1"], "--listen"),
        (["--bootstrap", "nohost"], "--bootstrap"),
        (["--run-id", "no spaces"], "--run-id"),
        (["--dataset", "cifar"], "--dataset"),
        (["--model", "transformer"], "--model"),
        (["--model", "cnn", "--dataset", "iris"], "--model"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--fanout", "0"], "--fanout"),
    ],
)
def test_run_with_a_bad_flag_names_it_and_exits_2(args, named, capsys):
    assert main(["run", "--steps", "3", *args] if "--steps" not in args else ["run", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_run_with_missing_mnist_files_names_the_folder(tmp_path, capsys):
    assert main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "train-images-idx3-ubyte" in err


def test_run_with_a_log_path_that_is_a_directory_is_refused(tmp_path, capsys):
    assert main(["run", "--log", str(tmp_path)]) == 2
    assert "--log" in capsys.readouterr().err


def test_run_alone_writes_one_json_line_per_step(tmp_path, capsys):
    log = tmp_path / "steps.jsonl"
    status = main(
        [
            "run",
            "--dataset",
            "iris",
            "--steps",
            "12",
            "--batch-size",
            "16",
            "--eval-every",
            "5",
            "--log",
            str(log),
            "--save",
            str(tmp_path / "model.p2pml"),
            "--quiet",
        ]
    )
    assert status == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(12))
    for field in (
        "step",
        "loss",
        "accuracy",
        "wait_s",
        "n_hat",
        "deltas_sent",
        "deltas_received",
        "deltas_rejected",
    ):
        assert all(field in row for row in lines), field
    assert [r["step"] for r in lines if r["accuracy"] is not None] == [4, 9, 11]
    assert (tmp_path / "model.p2pml").stat().st_size > 0
    assert "12 steps" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_three_processes_train_together(tmp_path):
    def start(i: int, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pml",
                "run",
                "--listen",
                f"127.0.0.{20 + i}:{0 if i else 47311}",
                "--dataset",
                "digits",
                "--steps",
                "60",
                "--batch-size",
                "32",
                "--barrier",
                "pbsp",
                "--sample",
                "1",
                "--min-peers",
                "2",
                "--shard",
                f"{i}/3",
                "--quiet",
                "--log",
                str(tmp_path / f"n{i}.jsonl"),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(0)] + [start(i, "--bootstrap", "127.0.0.20:47311") for i in (1, 2)]
    try:
        outputs = [p.communicate(timeout=80) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outputs]
    for i in range(3):
        rows = [json.loads(line) for line in (tmp_path / f"n{i}.jsonl").read_text().splitlines()]
        assert len(rows) == 60 and rows[-1]["deltas_received"] > 0
        assert max(row["n_hat"] for row in rows) == 3  # counted exactly; peers leave at the end
        assert rows[-1]["accuracy"] > 0.5
