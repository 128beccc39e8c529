"""``p2pml run`` checkpoints and start-up mistakes as a user meets them: kill -9 of a node and
``--resume``, a truncated checkpoint, a busy port, checkpoint flags a role cannot take."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pml.cli import main

pytestmark = pytest.mark.integration

ALONE = ["--dataset", "digits", "--batch-size", "16", "--eval-every", "0", "--quiet"]


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("node-*.p2pml"))


def step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def steps_logged(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [json.loads(x)["step"] for x in log.read_text().splitlines() if x.endswith("}")]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    key = tmp_path / "node.key"
    args = [*ALONE, "--steps", "80", "--key", str(key), "--checkpoint-every", "10"]
    where = ["--checkpoint-dir", str(ckpt), "--log", str(first)]
    with (tmp_path / "first.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pml", "run", *args, "--slow", "0.05", *where],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 90
        while not any(step_of(p) >= 20 for p in checkpoints(ckpt)):
            assert proc.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline, "no checkpoint at step 20 within 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = max(step_of(p) for p in checkpoints(ckpt))
    assert 20 <= last < 80 and max(steps_logged(first)) >= last - 1

    done = subprocess.run(
        [sys.executable, "-m", "p2pml", "run", *args, "--resume", str(ckpt), "--log", str(second)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert steps_logged(second) == list(range(last, 80))  # on from the checkpoint, to the end
    assert f"80 steps (from {last})" in done.stderr
    assert max(step_of(p) for p in checkpoints(ckpt)) == 80  # it kept checkpointing there


def test_resume_skips_a_truncated_checkpoint_and_refuses_when_none_is_good(
    tmp_path, capsys, caplog
):
    ckpt = tmp_path / "ckpt"
    where = ["--checkpoint-dir", str(ckpt), "--log", str(tmp_path / "a.jsonl")]
    assert main(["run", *ALONE, "--steps", "10", "--checkpoint-every", "5", *where]) == 0
    assert [step_of(p) for p in checkpoints(ckpt)] == [5, 10]
    newest = ckpt / "node-000000000010.p2pml"
    newest.write_bytes(newest.read_bytes()[:-100])  # a write cut short
    capsys.readouterr()

    log = tmp_path / "b.jsonl"
    assert main(["run", *ALONE, "--steps", "12", "--resume", str(ckpt), "--log", str(log)]) == 0
    assert "node-000000000010.p2pml refused" in caplog.text  # named, and passed over
    assert steps_logged(log)[0] == 5  # from the previous good one

    for path in checkpoints(ckpt):
        path.write_bytes(path.read_bytes()[:50])
    assert main(["run", *ALONE, "--steps", "12", "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("p2pml run: error: Invalid value for '--resume'")
    assert "refused" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--resume", "{tmp}/none"], "--resume"),
        (["--checkpoint-every", "5"], "--checkpoint-dir"),
        (["--role", "worker", "--server", "127.0.0.1:9", "--resume", "{tmp}"], "--resume"),
        (["--role", "worker", "--server", "127.0.0.1:9", "--checkpoint-every", "3"], "--checkp"),
    ],
)
def test_checkpoint_flags_a_node_cannot_use_are_refused(tmp_path, capsys, args, named):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["run", *ALONE, "--steps", "3", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("which", ["--listen", "--http-listen", "server --listen"])
def test_a_port_in_use_is_one_line_naming_the_flag(tmp_path, capsys, which):
    kind = socket.SOCK_DGRAM if which == "--listen" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        flag = which.split()[-1]
        role = ["--role", "server"] if which.startswith("server") else []
        assert main(["run", *ALONE, "--steps", "3", *role, flag, addr]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"p2pml run: error: Invalid value for '{flag}'")
    assert addr in err[-1] and "in use" in err[-1]
