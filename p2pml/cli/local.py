"""``p2pml local``: a whole run on this machine, one OS process per node.

Peer mode (the default) starts a seed node and ``--nodes`` peers (``p2pml run``) on 127.0.0.1 with
ephemeral ports, each with its own shard of the data and its own key; ``--role server`` starts a
parameter server and ``--nodes`` workers instead. ``--slow 0,0,0,2.5`` gives node i an extra
``slow[i]`` seconds per step (a straggler); the barrier and model flags are those of ``p2pml run``,
and anything after ``--`` goes to every node's ``p2pml run`` unchanged.

Everything lands in ``--out`` (default ``runs/<timestamp>``): ``metadata.json`` (every parameter,
package versions, seeds, host, each node's command line), one JSON-lines step log per node
(``node-0.jsonl``, ...; ``server.jsonl`` and ``worker-0.jsonl``, ... in the centralised mode),
each node's stderr (``<name>.stderr.log``), ``summary.json`` and the plots (``training.png``,
``steps.png``; `report/runs.py`).

While it runs, a live table shows every node's step, loss, accuracy, time waiting and N^. A node
that crashes is reported with its last log lines and the run goes on. Ctrl-C (or SIGTERM) stops
every child (SIGINT, then SIGKILL after a grace period), still writes the summary of what ran, and
exits with 130.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pml import __version__
from p2pml.cli.args import UsageError, bad_flag
from p2pml.core.barrier import get_policy
from p2pml.core.sampling import SampleSize
from p2pml.errors import ConfigError

__all__ = ["local", "parse_slow"]

MAX_NODES = 64
GRACE_S = 10.0  # how long a child has to stop after SIGINT before it is killed
START_TIMEOUT_S = 60.0  # a seed or server that has not said where it listens by then failed
_OWN_FLAGS = {  # set per node by p2pml local, or a path every node would share
    "--save",
    "--checkpoint-dir",
    "--resume",
    "--config",
    "--print-config",
    "--listen",
    "--http-listen",
    "--bootstrap",
    "--shard",
    "--log",
    "--role",
    "--server",
    "--key",
    "--slow",
    "--advertise",
    "--run-key",
    "--allow-keys",
}
_CONTACT = re.compile(r"^seed [0-9a-f]+ contact (\S+)$", re.MULTILINE)
_LISTENING = re.compile(r"listening on (\S+) \(workers:")
_VERSIONED = ("numpy", "torch", "kademlia", "aiohttp", "msgpack", "mlxtend", "scikit-learn")


def parse_slow(text: str, nodes: int) -> list[float]:
    """``--slow``: empty (nobody slow), one number for every node, or one per node."""
    if not text.strip():
        return [0.0] * nodes
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise bad_flag("--slow", text, "seconds per node, comma-separated (0,0,0,2.5)") from None
    if any(not (0 <= v < float("inf")) for v in values):
        raise bad_flag("--slow", text, "seconds >= 0")
    if len(values) == 1:
        return values * nodes
    if len(values) != nodes:
        raise bad_flag("--slow", text, f"one number, or {nodes} (one per node)")
    return values


@dataclass(slots=True)
class Child:
    """One process of the run and what the launcher knows of it."""

    name: str
    role: str
    argv: list[str]
    log: Path
    stderr: Path
    proc: subprocess.Popen[bytes] | None = None
    status: str = "starting"
    exit_code: int | None = None
    stopping: bool = False
    offset: int = 0
    last: dict[str, object] = field(default_factory=dict)
    wait_s: float = 0.0
    slow: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.exit_code is None

    def start(self, env: dict[str, str]) -> None:
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err if self.role == "seed" else subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher, which stops us
            )
        self.status = "running"

    def poll(self) -> int | None:
        """Read new log lines; returns the exit code once the process has ended."""
        self._read()
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        code = self.proc.poll()
        if code is None:
            return None
        self._read()
        self.exit_code = code
        if self.stopping:
            self.status = "stopped"
        elif code == 0:
            self.status = "finished"
        else:
            self.status = "crashed"
        return code

    def _read(self) -> None:
        if self.role == "seed" or not self.log.exists():
            return
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in chunk[: end + 1].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.last.update({k: v for k, v in record.items() if v is not None})
                wait = record.get("wait_s")
                if isinstance(wait, int | float):
                    self.wait_s += float(wait)

    def interrupt(self) -> None:
        if self.alive and self.proc is not None:
            self.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.alive and self.proc is not None:
            self.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.poll()

    def tail(self, lines: int = 6) -> list[str]:
        try:
            text = self.stderr.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"p2pml": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    return found


def _host() -> dict[str, object]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


class _Stop:
    """Set by SIGINT or SIGTERM: the launcher stops its children and writes what it has."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signal = signum


def _wait_for(child: Child, pattern: re.Pattern[str], stop: _Stop) -> str:
    """The first match of `pattern` in a starting child's output (its contact or address)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and stop.signal is None:
        found = pattern.search(child.stderr.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found.group(1)
        if child.poll() is not None:
            break
        time.sleep(0.05)
    if stop.signal is not None:
        return ""
    lines = "\n  ".join(child.tail()) or "(no output)"
    child.kill()
    raise _StartFailed(f"{child.name} did not start; its last lines:\n  {lines}")


class _StartFailed(Exception):
    pass


def _fmt(value: object, spec: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return "-"


def _flow(values: Mapping[str, object]) -> str:
    """Deltas sent/received/rejected, for a table cell."""
    return "/".join(
        _fmt(values.get(k), "d") for k in ("deltas_sent", "deltas_received", "deltas_rejected")
    )


def _table(children: list[Child], steps: int, elapsed: float, title: str) -> Table:
    table = Table(title=f"{title} · {elapsed:.0f} s", title_justify="left")
    for column in ("node", "state", "step", "loss", "accuracy", "waited s", "N^", "sent/recv/rej"):
        table.add_column(column, justify="left" if column in ("node", "state") else "right")
    for child in children:
        if child.role == "seed":
            continue
        last = child.last
        if child.role == "server":
            table.add_row(
                child.name,
                child.status,
                f"v{_fmt(last.get('version'), 'd')}",
                "-",
                _fmt(last.get("accuracy"), ".4f"),
                "-",
                _fmt(last.get("n_workers"), "d"),
                "-",
            )
            continue
        step = last.get("step")
        done = f"{step + 1}/{steps}" if isinstance(step, int) else f"-/{steps}"
        flow = _flow(last)
        slow = f" (+{child.slow:g} s)" if child.slow else ""
        table.add_row(
            child.name + slow,
            child.status,
            done,
            _fmt(last.get("loss"), ".4f"),
            _fmt(last.get("accuracy"), ".4f"),
            f"{child.wait_s:.1f}",
            _fmt(last.get("n_hat"), ".1f"),
            flow,
        )
    return table


def local(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option(help="Peers (or workers with --role server).")] = 6,
    role: Annotated[
        str, typer.Option(help="peer: peer mode with a seed; server: a server and workers.")
    ] = "peer",
    slow: Annotated[
        str, typer.Option(help="Extra seconds per step: one number, or one per node (0,0,2.5).")
    ] = "",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/<timestamp>).")
    ] = None,
    barrier: Annotated[str, typer.Option(help="bsp, ssp, asp, pbsp or pssp.")] = "pssp",
    sample: Annotated[str, typer.Option(help="Beta: peers per check, or a share (5%).")] = "2",
    staleness: Annotated[int, typer.Option(help="s, in steps (ssp, pssp).")] = 4,
    model: Annotated[str, typer.Option(help="mlp or cnn.")] = "mlp",
    dataset: Annotated[str, typer.Option(help="mnist, mnist-5k, digits or iris.")] = "mnist-5k",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the MNIST IDX files (--dataset mnist).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Steps per node.")] = 300,
    time_budget: Annotated[
        float, typer.Option(help="Stop each node after this many seconds of training (0: none).")
    ] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (and at the end).")] = 50,
    seed: Annotated[int, typer.Option(help="The run's seed (model init, shards).")] = 0,
    run_id: Annotated[str, typer.Option(help="The run's ID.")] = "local",
    timeout: Annotated[
        float, typer.Option(help="Stop everything after this many seconds (0: never).")
    ] = 0.0,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots at the end.")] = True,
    open_run: Annotated[
        bool,
        typer.Option(
            "--open",
            help="Leave the run open to any key; by default it is closed with a new run key "
            "(OUT/keys/run.secret, given to the seed and every node).",
        ),
    ] = False,
) -> None:
    """Run a whole training run on this machine: a seed and N peers (or a server and N workers),
    one process each, with live progress, logs, a summary and plots in --out. Flags after --
    go to every node's p2pml run."""
    extra = list(ctx.args)
    role = role.lower()
    if role not in ("peer", "server"):
        raise bad_flag("--role", role, "peer or server")
    if not 1 <= nodes <= MAX_NODES:
        raise bad_flag("--nodes", nodes, f"a whole number from 1 to {MAX_NODES}")
    delays = parse_slow(slow, nodes)
    try:
        barrier = get_policy(barrier.lower()).name
        SampleSize.parse(sample, field="--sample")
    except ConfigError as err:
        flag = "--barrier" if err.field == "barrier" else err.field
        raise bad_flag(flag, err.value, err.allowed) from None
    for flag, value, low in (("--steps", steps, 1), ("--eval-every", eval_every, 0)):
        if value < low:
            raise bad_flag(flag, value, f"a whole number >= {low}")
    for flag, number in (("--time-budget", time_budget), ("--timeout", timeout)):
        if not 0 <= number < float("inf"):
            raise bad_flag(flag, number, "seconds >= 0 (0: none)")
    if dataset == "mnist" and data_dir is None:
        raise bad_flag("--data-dir", None, "the folder of the MNIST IDX files for --dataset mnist")
    if data_dir is not None and not data_dir.is_dir():
        raise bad_flag("--data-dir", str(data_dir), "an existing folder")
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            raise bad_flag(name, arg, "not set by hand: p2pml local sets it for each node")
    common = [
        "--run-id", run_id,
        "--barrier", barrier,
        "--sample", sample,
        "--staleness", str(staleness),
        "--model", model,
        "--dataset", dataset,
        "--steps", str(steps),
        "--eval-every", str(eval_every),
        "--seed", str(seed),
    ]  # fmt: skip
    if data_dir is not None:
        common += ["--data-dir", str(data_dir.resolve())]
    if not staleness >= 0:
        raise bad_flag("--staleness", staleness, "a whole number of steps >= 0")
    if not any(a.split("=", 1)[0] == "--join-timeout" for a in extra):
        common += ["--join-timeout", str(max(120.0, 15.0 * nodes))]
    trains = ["--time-budget", str(time_budget)] if time_budget else []  # not the server
    _check_run_flags([*common, *trains, *extra])
    checkpoints = any(a.split("=", 1)[0] == "--checkpoint-every" for a in extra)

    folder = out if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if folder.is_dir() and any(folder.iterdir()) and not _is_run_folder(folder):
        # Reusing a folder replaces its logs: only ever one that an earlier run wrote.
        raise bad_flag("--out", str(folder), "a new or empty folder, or an earlier run's folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keys").mkdir(exist_ok=True)
        probe = folder / ".p2pml-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise bad_flag("--out", str(folder), f"a writable folder ({err.strerror})") from None
    for name in ("*.jsonl", "*.stderr.log", "*.png", "summary.json", "metadata.json"):
        for path in folder.glob(name):  # an earlier run's outputs: this run writes its own
            path.unlink()
    # and its nodes' checkpoints, which a fresh node would refuse to write beside
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    closing = [] if open_run else ["--run-key", f"@{_new_run_secret(folder / 'keys')}"]

    exe = [sys.executable, "-m", "p2pml"]
    children: list[Child] = []
    seed_child: Child | None = None
    trainer_name = "node" if role == "peer" else "worker"
    if role == "peer":
        seed_child = Child(
            "seed",
            "seed",
            [
                *exe,
                "seed",
                "--listen",
                "127.0.0.1:0",
                "--key",
                str(folder / "keys" / "seed.key"),
                *closing,
            ],
            folder / "seed.jsonl",
            folder / "seed.stderr.log",
        )
    server_child: Child | None = None
    if role == "server":
        server_child = Child(
            "server",
            "server",
            [
                *exe, "run", "--role", "server", "--listen", "127.0.0.1:0",
                "--min-peers", str(nodes), "--log", str(folder / "server.jsonl"),
                "--key", str(folder / "keys" / "server.key"), *closing, *common, *extra,
                *(["--checkpoint-dir", str(folder / "checkpoints")] if checkpoints else []),
            ],
            folder / "server.jsonl",
            folder / "server.stderr.log",
        )  # fmt: skip
    for i in range(nodes):
        name = f"{trainer_name}-{i}"
        argv = [
            *exe, "run", "--listen", "127.0.0.1:0", "--shard", f"{i}/{nodes}",
            "--log", str(folder / f"{name}.jsonl"), "--key", str(folder / "keys" / f"{name}.key"),
        ]  # fmt: skip
        if delays[i]:
            argv += ["--slow", str(delays[i])]
        if checkpoints:  # each node its own folder: checkpoint files are named by step only
            argv += ["--checkpoint-dir", str(folder / "checkpoints" / name)]
        argv += [*closing, *common, *trains, *extra]
        children.append(
            Child(name, role if role == "peer" else "worker", argv, folder / f"{name}.jsonl",
                  folder / f"{name}.stderr.log", slow=delays[i])
        )  # fmt: skip

    params = {
        "nodes": nodes, "role": role, "slow": delays, "barrier": barrier, "sample": sample,
        "staleness": staleness, "model": model, "dataset": dataset,
        "data_dir": None if data_dir is None else str(data_dir), "steps": steps,
        "time_budget": time_budget, "eval_every": eval_every, "seed": seed, "run_id": run_id,
        "timeout": timeout, "extra_run_args": extra, "closed": not open_run,
    }  # fmt: skip
    started_at = datetime.now(UTC)
    console = Console(stderr=True)
    # Every node gets exactly the flags above: P2PML_* settings of this shell (which `p2pml run`
    # would read) stay out, or one P2PML_SAVE or P2PML_HTTP_LISTEN would hit every node.
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PML_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    began = time.monotonic()
    status = "finished"
    everyone = [c for c in (seed_child, server_child) if c is not None] + children
    try:
        try:
            first = seed_child or server_child
            assert first is not None
            first.start(env)
            pattern = _CONTACT if first is seed_child else _LISTENING
            address = _wait_for(first, pattern, stop)
            if stop.signal is None:
                for child in children:
                    if role == "peer":
                        child.argv += ["--bootstrap", address, "--min-peers", str(nodes - 1)]
                    else:
                        child.argv += ["--role", "worker", "--server", address]
                    child.start(env)
        except _StartFailed as err:
            console.print(f"[red]p2pml local: error: {err}[/red]")
            status = "failed"
        _write_json(
            folder / "metadata.json",
            {
                "command": sys.argv,
                "started_at": started_at.isoformat(),
                "out": str(folder),
                "params": params,
                "versions": _versions(),
                "seeds": {"run": seed, "shards": {c.name: i for i, c in enumerate(children)}},
                "host": _host(),
                "nodes": [
                    {
                        "name": c.name,
                        "role": c.role,
                        "pid": None if c.proc is None else c.proc.pid,
                        "slow_s": c.slow,
                        "argv": c.argv,
                    }
                    for c in everyone
                ],
            },
        )
        if status == "finished":
            console.print(
                f"p2pml local: {nodes} {trainer_name}s of run {run_id}; output in {folder}"
            )
            status = _monitor(everyone, children, console, stop, steps, timeout, began)
            if status == "finished" and not any(c.status == "finished" for c in children):
                console.print(f"[red]p2pml local: no {trainer_name} finished[/red]")
                status = "failed"
    finally:
        _stop_all(everyone, trainers_done=False)  # whatever ended this, no child outlives it
        for s, handler in previous.items():
            signal.signal(s, handler)
    elapsed = time.monotonic() - began
    summary = _summarise(folder, everyone, status, started_at, elapsed)
    _print_summary(console, summary, folder)
    if plots and any(c.last for c in children):
        from p2pml.report.runs import load_run, plot_run

        for path in plot_run(load_run(folder), folder):
            console.print(f"p2pml local: plot {path}")
    if status == "interrupted":
        raise typer.Exit(130)
    if status in ("failed", "timeout"):
        raise typer.Exit(1)


def _new_run_secret(keys: Path) -> Path:
    """A fresh run secret in `keys`/run.secret (mode 0600), for ``--run-key @FILE``."""
    path = keys / "run.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


def _is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds an earlier `p2pml local` run (its metadata says so)."""
    try:
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"params", "nodes", "versions"} <= set(meta)


def _check_run_flags(args: list[str]) -> None:
    """Parse the flags every node will get with `p2pml run`'s own parser, so a mistake is one
    line here rather than a crash of every node."""
    from p2pml.cli.run import run

    app = typer.Typer()
    app.command()(run)
    command = typer.main.get_command(app)
    try:
        command.make_context("p2pml run", list(args))
    except UsageError as err:
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise UsageError(f"(passed to every node's p2pml run) {message}") from None


def _monitor(
    everyone: list[Child],
    trainers: list[Child],
    console: Console,
    stop: _Stop,
    steps: int,
    timeout: float,
    began: float,
) -> str:
    """Watch the children until the trainers have ended, reporting crashes; returns the run's
    status (finished, interrupted or timeout)."""
    title = "p2pml local"
    status = "finished"
    # A terminal gets a live table; a log file or pipe a progress line every 10 s.
    live = Live(
        _table(everyone, steps, 0.0, title),
        console=console,
        refresh_per_second=4,
        transient=True,
        auto_refresh=console.is_terminal,
    )
    next_line = time.monotonic() + 10.0
    with live if console.is_terminal else contextlib.nullcontext():
        while True:
            for child in everyone:
                was_alive = child.alive
                code = child.poll()
                if was_alive and code is not None and child.status == "crashed":
                    lines = "\n  ".join(child.tail()) or "(no output)"
                    console.print(
                        f"[red]p2pml local: {child.name} crashed (exit {code}); the run goes on. "
                        f"Its last lines:[/red]\n  {lines}"
                    )
            elapsed = time.monotonic() - began
            live.update(_table(everyone, steps, elapsed, title))
            if not console.is_terminal and time.monotonic() >= next_line:
                next_line = time.monotonic() + 10.0
                progress = ", ".join(
                    f"{c.name} {int(s) + 1 if isinstance(s := c.last.get('step'), int) else 0}"
                    for c in trainers
                )
                console.print(f"p2pml local: {elapsed:.0f} s: steps {progress}")
            if stop.signal is not None:
                status = "interrupted"
                break
            if timeout and elapsed > timeout:
                status = "timeout"
                console.print(f"p2pml local: --timeout {timeout:g} s reached; stopping the run")
                break
            if all(not c.alive for c in trainers):
                break
            time.sleep(0.25)
        _stop_all(everyone, trainers_done=status == "finished")
    return status


def _stop_all(everyone: list[Child], *, trainers_done: bool) -> None:
    """Stop what still runs: a server gets a grace period to see its workers finish, then
    every child is interrupted, and killed if it outlives the grace period."""
    server = next((c for c in everyone if c.role == "server"), None)
    if trainers_done and server is not None and server.alive:
        deadline = time.monotonic() + GRACE_S
        while server.alive and time.monotonic() < deadline:
            server.poll()
            time.sleep(0.1)
    for child in everyone:
        child.interrupt()
    deadline = time.monotonic() + GRACE_S
    while any(c.alive for c in everyone) and time.monotonic() < deadline:
        for child in everyone:
            child.poll()
        time.sleep(0.05)
    for child in everyone:
        child.kill()


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _summarise(
    folder: Path, everyone: list[Child], status: str, started_at: datetime, elapsed: float
) -> dict[str, object]:
    from p2pml.report.runs import NodeTrace, node_summary, read_log

    rows = []
    for child in everyone:
        if child.role == "seed":
            continue
        records, skipped = read_log(child.log) if child.log.exists() else ([], 0)
        row: dict[str, object] = {
            "name": child.name,
            "status": child.status,
            "exit_code": child.exit_code,
        }
        row.update(node_summary(NodeTrace(child.name, records, skipped)))
        if child.role != "server":
            row["slow_s"] = child.slow
        rows.append(row)
    summary: dict[str, object] = {
        "status": status,
        "started_at": started_at.isoformat(),
        "elapsed_s": round(elapsed, 2),
        "nodes": rows,
    }
    _write_json(folder / "summary.json", summary)
    return summary


def _print_summary(console: Console, summary: dict[str, object], folder: Path) -> None:
    table = Table(title=f"p2pml local: {summary['status']} in {summary['elapsed_s']} s")
    columns = ("node", "status", "steps", "final loss", "accuracy", "waited s", "sent/recv/rej")
    for column in columns:
        table.add_column(column, justify="left" if column in ("node", "status") else "right")
    rows = summary["nodes"]
    assert isinstance(rows, list)
    for row in rows:
        if row.get("role") == "server":
            table.add_row(
                row["name"],
                row["status"],
                f"v{_fmt(row.get('model_version'), 'd')}",
                "-",
                _fmt(row.get("final_accuracy"), ".4f"),
                "-",
                "-",
            )
            continue
        flow = _flow(row)
        table.add_row(
            row["name"],
            row["status"],
            _fmt(row.get("steps"), "d"),
            _fmt(row.get("final_loss"), ".4f"),
            _fmt(row.get("final_accuracy"), ".4f"),
            _fmt(row.get("wait_s"), ".1f"),
            flow,
        )
    console.print(table)
    console.print(f"p2pml local: summary in {folder / 'summary.json'}")
