"""``p2pml run --role server|worker`` as a user runs it: bad flags, and kill -9 of a worker and of
the server, each in its own OS process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2pml.cli import main

pytestmark = pytest.mark.integration

COMMON = ["--dataset", "digits", "--batch-size", "16", "--eval-every", "0"]


class Proc:
    """A ``p2pml run`` process whose stderr is collected line by line by a reader thread."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "p2pml", "run", *COMMON, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """The first stderr line matching `pattern`; fails with the log tail after `timeout_s`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    tail = "".join(self.lines[-15:])
                    pytest.fail(f"no line matching {pattern!r} within {timeout_s} s:\n{tail}")
                self._changed.wait(min(left, 0.5))

    def finish(self, timeout_s: float = 90) -> int:
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail("process did not finish:\n" + "".join(self.lines[-15:]))
        self._close()
        return code

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        """Kill the process if it still runs and release its pipe (for `finally` blocks)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.popen.stderr is not None and not self._reader.is_alive():
            self.popen.stderr.close()

    def text(self) -> str:
        return "".join(self.lines)


def start_server(tmp_path: Path, *extra: str, listen: str = "127.0.0.31:0") -> tuple[Proc, str]:
    server = Proc(
        "--role",
        "server",
        "--listen",
        listen,
        "--log",
        str(tmp_path / "server.jsonl"),
        "--heartbeat-timeout",
        "1.5",
        *extra,
    )
    addr = server.wait_for(r"listening on (\S+) ").group(1)
    return server, addr


def start_worker(tmp_path: Path, addr: str, i: int, *extra: str) -> Proc:
    return Proc(
        "--role",
        "worker",
        "--server",
        addr,
        "--listen",
        f"127.0.0.{40 + i}:0",
        "--key",
        str(tmp_path / f"w{i}.key"),
        "--log",
        str(tmp_path / f"w{i}.jsonl"),
        *extra,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--role", "boss"], "--role"),
        (["--role", "worker"], "--server"),
        (["--server", "127.0.0.1:5000"], "--server"),
        (["--role", "worker", "--server", "nohost"], "--server"),
        (["--role", "server", "--checkpoint-every", "5"], "--checkpoint-dir"),
        (["--role", "worker", "--server", "127.0.0.1:9", "--checkpoint-every", "5"], "--checkp"),
        (["--role", "server", "--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--role", "server", "--heartbeat-timeout", "0"], "--heartbeat-timeout"),
        (
            ["--role", "worker", "--server", "127.0.0.1:1", "--server-timeout", "-1"],
            "--server-timeout",
        ),
    ],
)
def test_a_bad_server_or_worker_flag_is_named_with_exit_2(args, named, capsys):
    assert main(["run", "--steps", "3", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    args = ["run", "--role", "server", "--checkpoint-every", "5", "--checkpoint-dir", str(target)]
    assert main(args) == 2
    assert "--checkpoint-dir" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_worker_without_a_server_fails_with_one_clear_line(tmp_path):
    worker = start_worker(tmp_path, "127.0.0.31:9", 0, "--steps", "5", "--server-timeout", "1")
    assert worker.finish(timeout_s=45) == 1
    errors = [line for line in worker.lines if line.startswith("p2pml run: error")]
    assert len(errors) == 1 and "unreachable for 1 s" in errors[0]
    assert "Traceback" not in worker.text()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_kill_9_of_a_worker_under_bsp_evicts_it_and_the_restarted_worker_rejoins(tmp_path):
    # long enough that the others still train when the restarted worker is back (its start-up,
    # importing torch, takes several seconds on a busy 2-core machine)
    steps = ["--steps", "300", "--slow", "0.04", "--barrier", "bsp"]
    server, addr = start_server(tmp_path, "--barrier", "bsp", "--min-peers", "3")
    workers = [start_worker(tmp_path, addr, i, *steps) for i in range(3)]
    try:
        server.wait_for(r"worker \w+ registered at step 0")
        workers[2].wait_for(r"step 31/300")  # it trains a few steps, then dies
        workers[2].kill9()
        restarted = start_worker(tmp_path, addr, 2, *steps)  # same key; starting takes a while
        workers.append(restarted)
        evicted = server.wait_for(r"worker (\w+) evicted at step (\d+)", timeout_s=20)
        rejoined = restarted.wait_for(r"registered with \S+ at step (\d+)")
        assert int(rejoined.group(1)) >= int(evicted.group(2))
        assert server.text().index("evicted") < server.text().rindex("registered at step")
        codes = [w.finish() for w in (*workers[:2], restarted)]
        assert codes == [0, 0, 0], [w.text()[-1500:] for w in workers]
        assert server.finish(timeout_s=30) == 0
    finally:
        for proc in (server, *workers):
            proc.stop()
    assert "every worker has finished" in server.text()
    rows = [json.loads(x) for x in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 299


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_kill_9_of_the_server_then_a_restart_resumes_from_its_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    ckpt = ["--checkpoint-every", "10", "--checkpoint-dir", str(folder), "--barrier", "ssp"]
    server, addr = start_server(tmp_path, *ckpt, "--min-peers", "2")
    args = ["--steps", "200", "--slow", "0.02", "--barrier", "ssp", "--server-timeout", "40"]
    workers = [start_worker(tmp_path, addr, i, *args) for i in range(2)]
    try:
        saved = server.wait_for(r"checkpoint of version (\d+) written", timeout_s=60)
        server.wait_for(r"checkpoint of version (\d*[2-9]\d|\d{3,}) written", timeout_s=60)
        server.kill9()
        again, again_addr = start_server(tmp_path, *ckpt, listen=addr)
        extra = [again]
        assert again_addr == addr
        resumed = again.wait_for(r"resuming the server from \S+ \(model version (\d+)\)")
        assert int(resumed.group(1)) >= int(saved.group(1))
        codes = [w.finish() for w in workers]
        assert codes == [0, 0], [w.text()[-1500:] for w in workers]
        assert again.finish(timeout_s=30) == 0
    finally:
        for proc in (server, *workers, *locals().get("extra", [])):
            proc.stop()
    for worker in workers:
        assert re.search(r"registering again", worker.text())
    done = again.wait_for(r"server done at model version (\d+)")
    assert int(done.group(1)) > int(resumed.group(1))
