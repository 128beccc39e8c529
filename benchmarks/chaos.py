"""Chaos run (issue 8): peer-mode nodes on a lossy network, killed, partitioned and restarted.

Each node is one OS process (``p2pml run``); the run also loses its seed.

Two parts (``--part loss|chaos|both``, default both), each a seed and ``--nodes`` ``p2pml run``
peers, node i on its own loopback address 127.0.0.(10+i) (the seed on 127.0.0.9), pSSP beta 2 s 4,
the mlp on mnist-5k:

* **loss**: the same run twice, fault-free and then with a ``--faults`` plan of 5 % loss and 20 ms
  added delay on every datagram and HTTP request, each node training ``--steps`` steps. Reported
  per run: wall time, median steps/s, final accuracy (mean and min over nodes), deltas
  sent/received/rejected, and the lossy/fault-free time ratio. Must show: the lossy run still
  reaches >= 90 % on every node.
* **chaos**: lossy from the start (the same plan), checkpoints every ``--checkpoint-every`` steps,
  and a scripted timeline in seconds after the first training step (t0): ``--warmup-s`` of lossy
  training; kill -9 of ``--kill`` (node-6, node-7); ``--down-s`` later node-7 restarts with
  ``--resume`` (same key, same host), continuing from its checkpoint or, when that is more than s
  steps behind the run, from a peer's model (read from its log); ``--settle-s`` later a
  ``--partition-s`` partition into two halves (nodes 0..n/2-1 | the rest; the seed in neither
  group, so it talks to both) written into the plan file a few seconds ahead, which ends by
  itself (the heal); ``--heal-s`` after the heal kill -9 of the seed; ``--tail-s`` more of
  training until the nodes' ``--time-budget`` ends the run.

Expectations (exit status 0 when all hold, 1 otherwise): every node of the loss part finishes and
every lossy node reaches >= 90 %; in the chaos part every node that was not killed finishes
(exit 0), the restarted node trains again, both halves train during the partition, the spread of
steps among live nodes is back within s at most ``--heal-s`` seconds after the heal (and its
median over the next ``--hold-s`` too), and the live nodes keep stepping after the seed died
(median steps > 0; a node may be held at its barrier meanwhile).

Everything lands in ``--out`` (default ``runs/chaos-<timestamp>``): per part and run a folder of
each node's step log and stderr, the seed's output, the keys, checkpoints and the fault plan;
``chaos.json`` with every figure; ``chaos.png`` (each node's step against time with the phases
shaded, and the spread of steps) and ``loss.png`` (both loss runs).

    python benchmarks/chaos.py [--part both] [--nodes 8] [--out DIR] ...
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from p2pml.cli.local import Child
from p2pml.report.runs import read_log

SEED_HOST = "127.0.0.9"
TARGET_ACCURACY = 0.90
START_TIMEOUT_S = 300.0  # from launch to every node's first step (8 torch imports on 2 cores)
GRACE_S = 10.0
_CONTACT = re.compile(r"^seed [0-9a-f]+ contact (\S+)$", re.MULTILINE)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ +\S+: (.*)$")
_OWN_ID = re.compile(r"overlay ([0-9a-f]{8}) listening on (\S+)")
_PEER_ADDED = re.compile(r"run peer ([0-9a-f]{8}) at ")
_PEER_FORGOTTEN = re.compile(r"run peer ([0-9a-f]{8}) stopped answering; forgotten")
_RESUMED = re.compile(r"resumed from checkpoint (\S+) at step (\d+)")
_BEHIND = re.compile(r"checkpoint (\S+) at step (\d+) is (\d+) steps behind the run")
_IN_PROGRESS = re.compile(r"joined run \S+ in progress at step (\d+)")
_FROM_PEER = re.compile(r"continuing from step (\d+) with the model of peer ([0-9a-f]+)")

console = Console(stderr=True)


def host_of(index: int) -> str:
    return f"127.0.0.{10 + index}"


def say(text: str) -> None:
    console.print(f"chaos: {text}", highlight=False)


# -- processes -------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A seed and peer-mode nodes of one run, as `p2pml.cli.local.Child` processes."""

    folder: Path
    common: list[str]  # flags of every node's p2pml run
    faults: Path | None = None
    seed: Child | None = None
    contact: str = ""
    nodes: dict[str, Child] = field(default_factory=dict)  # by incarnation name
    index: dict[str, int] = field(default_factory=dict)  # incarnation -> node index
    started_unix_s: dict[str, float] = field(default_factory=dict)
    ended_unix_s: dict[str, float] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        (self.folder / "keys").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PML_")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env = env

    def start_seed(self) -> None:
        argv = [sys.executable, "-m", "p2pml", "seed", "--listen", f"{SEED_HOST}:0"]
        argv += ["--key", str(self.folder / "keys" / "seed.key")]
        self.seed = Child(
            "seed", "seed", argv, self.folder / "seed.jsonl", self.folder / "seed.log"
        )
        self.seed.start(self.env)
        self.started_unix_s["seed"] = time.time()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            found = _CONTACT.search(self.seed.stderr.read_text(encoding="utf-8", errors="replace"))
            if found:
                self.contact = found.group(1)
                return
            if self.seed.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("the seed did not start: " + " | ".join(self.seed.tail()))

    def start_node(
        self,
        index: int,
        n_nodes: int,
        *,
        name: str = "",
        extra: Sequence[str] = (),
        via: str = "",
        join_timeout_s: float = START_TIMEOUT_S,
    ) -> Child:
        """Start node `index` (or a new incarnation of it called `name`), joining through the
        seed or, when given, the DHT addresses `via`."""
        name = name or f"node-{index}"
        argv = [sys.executable, "-m", "p2pml", "run", "--listen", f"{host_of(index)}:0"]
        argv += ["--shard", f"{index}/{n_nodes}", "--bootstrap", via or self.contact]
        argv += ["--join-timeout", f"{join_timeout_s:g}"]
        argv += ["--key", str(self.folder / "keys" / f"node-{index}.key")]
        argv += ["--log", str(self.folder / f"{name}.jsonl"), *self.common]
        if self.faults is not None:
            argv += ["--faults", str(self.faults)]
        child = Child(
            name,
            "peer",
            [*argv, *extra],
            self.folder / f"{name}.jsonl",
            self.folder / f"{name}.stderr.log",
        )
        child.start(self.env)
        self.nodes[name] = child
        self.index[name] = index
        self.started_unix_s[name] = time.time()
        return child

    def dht_address(self, name: str) -> str | None:
        """Where a running node's DHT listens, from its log."""
        text = self.nodes[name].stderr.read_text(encoding="utf-8", errors="replace")
        found = _OWN_ID.search(text)
        return found.group(2) if found else None

    def kill(self, name: str) -> float:
        child = self.seed if name == "seed" else self.nodes[name]
        assert child is not None
        at = time.time()
        child.kill()
        self.killed.add(name)
        self.ended_unix_s[name] = at
        return at

    def poll(self) -> None:
        for name, child in [("seed", self.seed), *self.nodes.items()]:
            if child is not None and child.alive and child.poll() is not None:
                self.ended_unix_s.setdefault(name, time.time())

    def steps(self) -> dict[str, int]:
        """Steps completed so far by each incarnation that has logged one."""
        return {
            n: int(s) + 1 for n, c in self.nodes.items() if isinstance(s := c.last.get("step"), int)
        }

    @property
    def training(self) -> list[Child]:
        return [c for c in self.nodes.values() if c.alive]

    def stop_all(self) -> None:
        everyone = [c for c in (*self.nodes.values(), self.seed) if c is not None]
        for child in everyone:
            child.interrupt()
        deadline = time.monotonic() + GRACE_S
        while any(c.alive for c in everyone) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        for child in everyone:
            child.kill()
        self.poll()

    def progress(self, t0: float | None, label: str) -> str:
        steps = self.steps()
        live = [c.name for c in self.training if c.name in steps]
        values = [steps[n] for n in live]
        spread = max(values) - min(values) if values else 0
        when = f"t0{time.time() - t0:+.0f} s" if t0 else "starting"
        if len(self.training) > len(live):
            live_text = f"{len(live)} training (+{len(self.training) - len(live)} starting)"
        else:
            live_text = f"{len(live)} training"
        shown = " ".join(f"{n.removeprefix('node-')}:{steps[n]}" for n in sorted(steps))
        return f"{label} {when}: {live_text}, spread {spread}; steps {shown or '-'}"


def write_plan(
    path: Path,
    *,
    loss: float,
    delay_s: float,
    request_loss: float | None,
    partition: tuple[float, float, list[list[str]]] | None = None,
) -> None:
    """Write the TOML fault plan atomically (nodes re-read it when its mtime changes)."""
    lines = ["seed = 1", f"loss = {loss!r}", f"delay_s = {delay_s!r}"]
    if request_loss is not None:
        lines.append(f"request_loss = {request_loss!r}")
    if partition is not None:
        start, end, groups = partition
        lines += ["", "[[partitions]]", f"start_unix_s = {start:.3f}", f"end_unix_s = {end:.3f}"]
        lines.append("groups = " + json.dumps(groups))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def node_flags(args: argparse.Namespace, *, steps: int, eval_every: int) -> list[str]:
    return [
        "--run-id",
        "chaos",
        "--barrier",
        "pssp",
        "--sample",
        str(args.sample),
        "--staleness",
        str(args.staleness),
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--steps",
        str(steps),
        "--eval-every",
        str(eval_every),
        *(["--slow", str(args.node_slow_s)] if args.node_slow_s else []),
    ]


def wait_first_step(cluster: Cluster, label: str) -> float:
    """The unix time of the run's first logged step (t0: the nodes' time budgets started with
    their training, a few seconds before); raises when a node failed first."""
    began, next_line = time.monotonic(), time.monotonic() + 5.0
    while not cluster.steps():
        cluster.poll()
        dead = [c for c in cluster.nodes.values() if c.exit_code is not None]
        if dead or time.monotonic() - began > START_TIMEOUT_S:
            tails = "; ".join(f"{c.name}: {' | '.join(c.tail(3))}" for c in dead)
            raise RuntimeError(f"{label}: no node started training ({tails or 'timeout'})")
        if time.monotonic() >= next_line:
            next_line += 5.0
            say(f"{label}: waiting for the first training step ({time.monotonic() - began:.0f} s)")
        time.sleep(0.1)
    first = [
        tr.times[0]
        for name, child in cluster.nodes.items()
        if (tr := load_trace(name, 0, child.log, None)).times
    ]
    return min(first, default=time.time())


# -- traces and measures ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trace:
    """One incarnation of a node: completed steps over unix time, live until `end_unix_s`."""

    name: str
    index: int
    times: tuple[float, ...]
    steps: tuple[int, ...]
    end_unix_s: float
    accuracy: float | None = None
    counters: tuple[int, int, int] = (0, 0, 0)  # deltas sent, received, rejected

    def is_live(self, t: float) -> bool:
        return bool(self.times) and self.times[0] <= t <= self.end_unix_s

    def step_at(self, t: float) -> int:
        """Steps completed by `t` (before its first line: the steps before the first)."""
        i = bisect.bisect_right(self.times, t)
        return self.steps[i - 1] if i else (self.steps[0] - 1 if self.steps else 0)


def load_trace(name: str, index: int, path: Path, end_unix_s: float | None) -> Trace:
    records = read_log(path)[0] if path.exists() else []
    rows = [r for r in records if isinstance(r.get("step"), int) and "unix_s" in r]
    times = tuple(float(r["unix_s"]) for r in rows)  # type: ignore[arg-type]
    steps = tuple(int(r["step"]) + 1 for r in rows)  # type: ignore[call-overload]
    last = rows[-1] if rows else {}
    accuracy = last.get("accuracy")
    counters = tuple(
        int(last.get(k, 0) or 0) for k in ("deltas_sent", "deltas_received", "deltas_rejected")
    )  # type: ignore[call-overload]
    # live until killed, or until its last line
    end = end_unix_s if end_unix_s is not None else (times[-1] if times else 0.0)
    return Trace(
        name,
        index,
        times,
        steps,
        end,
        float(accuracy) if isinstance(accuracy, int | float) else None,
        counters,
    )  # type: ignore[arg-type]


def live_steps(traces: Sequence[Trace], t: float) -> dict[str, int]:
    return {tr.name: tr.step_at(t) for tr in traces if tr.is_live(t)}


def spread_at(traces: Sequence[Trace], t: float) -> int:
    values = list(live_steps(traces, t).values())
    return max(values) - min(values) if values else 0


def steps_between(traces: Sequence[Trace], start: float, end: float) -> dict[str, int]:
    """Steps each incarnation live at `end` made since `start` (or since its first line)."""
    made = {}
    for tr in traces:
        if tr.is_live(end) or (tr.times and start <= tr.end_unix_s <= end):
            at_end = tr.step_at(min(end, tr.end_unix_s))
            base = tr.step_at(start) if tr.is_live(start) else tr.steps[0] - 1
            made[tr.name] = at_end - base
    return made


def convergence(
    traces: Sequence[Trace], heal: float, until: float, *, bound: int, hold_s: float, dt: float
) -> tuple[float, int] | None:
    """Seconds after `heal` until the spread among live nodes is back within `bound`, and the
    median steps each node made meanwhile; None if not by `until`.

    Back within means: the spread is <= `bound` now and its median over the next `hold_s`
    (sampled every `dt`) too, so that a brief excursion afterwards (pSSP bounds the lag to a
    sample of peers, not to all of them) does not undo it.
    """
    grid = [heal + k * dt for k in range(int((until - heal) / dt) + 1)]
    spreads = [spread_at(traces, t) for t in grid]
    width = max(1, round(hold_s / dt))
    for k, t in enumerate(grid):
        if spreads[k] <= bound and statistics.median(spreads[k : k + width]) <= bound:
            made = steps_between(traces, heal, t)
            return t - heal, int(statistics.median(made.values())) if made else 0
    return None


def max_spread(traces: Sequence[Trace], start: float, end: float, dt: float = 0.25) -> int:
    n = max(1, int((end - start) / dt))
    return max(spread_at(traces, start + k * dt) for k in range(n + 1))


# -- the loss part ---------------------------------------------------------------------------


def run_loss_part(args: argparse.Namespace, out: Path) -> dict[str, object]:
    runs: dict[str, dict[str, object]] = {}
    for label, lossy in (("fault-free", False), ("lossy", True)):
        folder = out / "loss" / label
        folder.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(folder, node_flags(args, steps=args.steps, eval_every=args.eval_every))
        cluster.common += ["--min-peers", str(args.nodes - 1)]
        if lossy:
            cluster.faults = folder / "faults.toml"
            write_plan(
                cluster.faults, loss=args.loss, delay_s=args.delay_s, request_loss=args.request_loss
            )
        say(f"loss part, {label} run: {args.nodes} nodes, {args.steps} steps each; in {folder}")
        began = time.time()
        try:
            cluster.start_seed()
            for i in range(args.nodes):
                cluster.start_node(i, args.nodes)
            wait_for_exit(cluster, f"loss/{label}", deadline_s=args.run_timeout_s)
        finally:
            cluster.stop_all()
        runs[label] = summarise_run(cluster, began)
        brief = {k: v for k, v in runs[label].items() if k not in ("series", "steps")}
        say(f"loss part, {label}: {json.dumps(brief)}")
    free, lossy_run = runs["fault-free"], runs["lossy"]
    ratio = {
        key: round(float(lossy_run[key]) / float(free[key]), 3)  # type: ignore[arg-type]
        for key in ("train_s", "wall_s")
        if free[key]
    }
    return {
        "runs": runs,
        "ratio_lossy_to_free": ratio,
        "plan": {
            "loss": args.loss,
            "delay_s": args.delay_s,
            "request_loss": args.loss if args.request_loss is None else args.request_loss,
            "applies_to": "DHT datagrams and HTTP requests (deltas, models, info)",
        },
    }


def wait_for_exit(cluster: Cluster, label: str, *, deadline_s: float) -> None:
    began, next_line = time.monotonic(), time.monotonic()
    while cluster.training and time.monotonic() - began < deadline_s:
        cluster.poll()
        if time.monotonic() >= next_line:
            next_line += 5.0
            say(cluster.progress(None, label))
        time.sleep(0.2)
    if cluster.training:
        say(f"{label}: still running after {deadline_s:g} s; stopping it")


def summarise_run(cluster: Cluster, began: float) -> dict[str, object]:
    traces = [load_trace(n, cluster.index[n], c.log, None) for n, c in cluster.nodes.items()]
    firsts = [tr.times[0] for tr in traces if tr.times]
    lasts = [tr.times[-1] for tr in traces if tr.times]
    rates = [
        (tr.steps[-1] - tr.steps[0]) / (tr.times[-1] - tr.times[0])
        for tr in traces
        if len(tr.times) > 1 and tr.times[-1] > tr.times[0]
    ]
    accuracies = [tr.accuracy for tr in traces if tr.accuracy is not None]
    ends = [cluster.ended_unix_s[n] for n in cluster.nodes if n in cluster.ended_unix_s]
    return {
        "nodes": len(traces),
        "finished": sum(c.exit_code == 0 for c in cluster.nodes.values()),
        "steps": [tr.steps[-1] if tr.steps else 0 for tr in traces],
        "wall_s": round(max(ends) - began, 2) if ends else None,
        "train_s": round(max(lasts) - min(firsts), 2) if firsts else None,
        "median_steps_per_s": round(statistics.median(rates), 2) if rates else None,
        "accuracy_mean": round(statistics.fmean(accuracies), 4) if accuracies else None,
        "accuracy_min": round(min(accuracies), 4) if accuracies else None,
        "deltas_sent": sum(tr.counters[0] for tr in traces),
        "deltas_received": sum(tr.counters[1] for tr in traces),
        "deltas_rejected": sum(tr.counters[2] for tr in traces),
        "series": {
            tr.name: [
                [round(t - min(firsts), 3), s] for t, s in zip(tr.times, tr.steps, strict=True)
            ]
            for tr in traces
        },
    }


# -- the chaos part --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One scripted action, `at_s` seconds after t0."""

    at_s: float
    key: str
    action: Callable[[], str]


def run_chaos_part(args: argparse.Namespace, out: Path) -> dict[str, object]:
    folder = out / "chaos"
    folder.mkdir(parents=True, exist_ok=True)
    n, half = args.nodes, args.nodes // 2
    plan = folder / "faults.toml"
    write_plan(plan, loss=args.loss, delay_s=args.delay_s, request_loss=args.request_loss)
    common = node_flags(args, steps=1_000_000, eval_every=args.chaos_eval_every)
    cluster = Cluster(folder, [*common, "--checkpoint-every", str(args.checkpoint_every)], plan)
    budget_s = args.warmup_s + args.down_s + args.settle_s + args.partition_s + args.heal_s
    budget_s += args.tail_s
    groups = [[host_of(i) for i in range(half)], [host_of(i) for i in range(half, n)]]
    say(f"chaos part: {n} nodes, time budget {budget_s:g} s, lossy from the start; in {folder}")
    marks: dict[str, float] = {}
    notes: dict[str, str] = {}
    try:
        cluster.start_seed()
        for i in range(n):
            checkpoints = folder / "checkpoints" / f"node-{i}"
            cluster.start_node(
                i,
                n,
                extra=[
                    "--checkpoint-dir",
                    str(checkpoints),
                    "--min-peers",
                    str(n - 1),
                    "--time-budget",
                    str(budget_s),
                ],
            )
        t0 = marks["t0"] = wait_first_step(cluster, "chaos")
        say(f"training has begun; t0 = {datetime.fromtimestamp(t0):%H:%M:%S}")

        def kill() -> str:
            for i in args.kill:
                cluster.kill(f"node-{i}")
            return "kill -9 " + ", ".join(f"node-{i}" for i in args.kill)

        def restart() -> str:
            i = args.restart
            # The seed and two live peers: a restarted node knows where its run was.
            peers = [cluster.dht_address(c.name) for c in cluster.training[:2]]
            via = ",".join([cluster.contact, *(p for p in peers if p)])
            saved = folder / "checkpoints" / f"node-{i}"
            # A node killed before its first checkpoint has nothing to resume: it starts afresh
            # (and joins the run in progress), in a checkpoint folder of its own.
            fresh = not any(saved.glob("node-*.p2pml"))
            where = ["--checkpoint-dir", f"{saved}r"] if fresh else ["--resume", str(saved)]
            cluster.start_node(
                i,
                n,
                name=f"node-{i}r",
                extra=[
                    *where,
                    "--min-peers",
                    "1",  # it decides between checkpoint and peer model on what it sees then
                    "--time-budget",
                    f"{max(5.0, t0 + budget_s - time.time()):.1f}",
                ],
                via=via,
                join_timeout_s=60.0,
            )
            if fresh:
                return f"node-{i} restarted afresh: it had no checkpoint (same key and host)"
            return f"node-{i} restarted with --resume (same key and host)"

        part_start, part_end = t0 + args.partition_at_s, t0 + args.partition_at_s + args.partition_s

        def write_partition() -> str:
            write_plan(
                plan,
                loss=args.loss,
                delay_s=args.delay_s,
                request_loss=args.request_loss,
                partition=(part_start, part_end, groups),
            )
            return f"plan file rewritten with a {args.partition_s:g} s partition window"

        def kill_seed() -> str:
            cluster.kill("seed")
            return "kill -9 the seed"

        events = [
            Event(args.warmup_s, "kill", kill),
            Event(args.warmup_s + args.down_s, "restart", restart),
            Event(args.partition_at_s - args.plan_lead_s, "plan", write_partition),
            Event(args.partition_at_s, "partition", lambda: "partition starts (plan window)"),
            Event(args.partition_at_s + args.partition_s, "heal", lambda: "partition ends"),
            Event(args.partition_at_s + args.partition_s + args.heal_s, "seed", kill_seed),
        ]
        drive(cluster, events, t0, marks, notes, deadline_s=budget_s + args.end_timeout_s)
    finally:
        cluster.stop_all()
    marks["end"] = max([time.time(), *cluster.ended_unix_s.values()])
    return analyse_chaos(args, cluster, marks, notes, groups)


def drive(
    cluster: Cluster,
    events: list[Event],
    t0: float,
    marks: dict[str, float],
    notes: dict[str, str],
    *,
    deadline_s: float,
) -> None:
    """Run the scripted events on time while the nodes train; returns once every node has
    ended (or at t0 + `deadline_s`)."""
    pending = sorted(events, key=lambda e: e.at_s)
    next_line = time.time()
    while time.time() < t0 + deadline_s:
        cluster.poll()
        while pending and time.time() >= t0 + pending[0].at_s:
            event = pending.pop(0)
            marks[event.key] = time.time()
            notes[event.key] = event.action()
            say(f"t0{marks[event.key] - t0:+.1f} s: {notes[event.key]}")
        if time.time() >= next_line:
            next_line += 5.0
            say(cluster.progress(t0, "chaos"))
        if not cluster.training:
            if pending:
                say("every node ended before the script did: " + ", ".join(e.key for e in pending))
            break
        time.sleep(0.1)


def _log_events(path: Path) -> tuple[str | None, list[tuple[float, str, str]]]:
    """A node's own short id and its (unix time, kind, peer) peer-table events from stderr."""
    own, found = None, []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, []
    for line in text.splitlines():
        match = _STAMP.match(line)
        if match is None:
            continue
        message = match.group(2)
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if (m := _OWN_ID.search(message)) is not None:
            own = m.group(1)
        elif (m := _PEER_ADDED.search(message)) is not None:
            found.append((at, "added", m.group(1)))
        elif (m := _PEER_FORGOTTEN.search(message)) is not None:
            found.append((at, "forgotten", m.group(1)))
    return own, found


def rejoin_source(path: Path) -> dict[str, object]:
    """Where a resumed node's model came from, as its stderr says."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    result: dict[str, object] = {"source": "unknown"}
    if (m := _BEHIND.search(text)) is not None:
        result.update(checkpoint_step=int(m.group(2)), behind_steps=int(m.group(3)))
    if (m := _FROM_PEER.search(text)) is not None:
        result.update(source="peer", from_step=int(m.group(1)), peer=m.group(2))
    elif (m := _RESUMED.search(text)) is not None:
        result.update(source="checkpoint", checkpoint_step=int(m.group(2)))
    elif (m := _IN_PROGRESS.search(text)) is not None:
        result.update(source="fresh", from_step=int(m.group(1)))
    return result


def remerge(
    cluster: Cluster, groups: list[list[str]], start: float, heal: float, *, gone: set[int]
) -> dict[str, object]:
    """Cross-half peers the nodes forgot during the partition, and how long after the heal
    the last of them was known again."""
    half_of = {i: int(host_of(i) not in groups[0]) for i in set(cluster.index.values())}
    ids: dict[str, int] = {}
    logs = {}
    for name, child in cluster.nodes.items():
        own, found = _log_events(child.stderr)
        logs[name] = found
        if own is not None:
            ids[own] = cluster.index[name]
    forgotten, relearnt = 0, []
    for name, found in logs.items():
        mine = half_of[cluster.index[name]]
        for at, kind, peer in found:
            if kind != "forgotten" or not start <= at <= heal + 5.0 or peer not in ids:
                continue
            if half_of[ids[peer]] == mine or ids[peer] in gone:
                continue
            forgotten += 1
            back = [a for a, k, p in found if k == "added" and p == peer and a > at]
            if back:
                relearnt.append(max(0.0, min(back) - heal))
    return {
        "cross_half_forgotten": forgotten,
        "relearnt": len(relearnt),
        "relearnt_after_heal_s": round(max(relearnt), 2) if relearnt else None,
        "plan_reloaded_by": sum(
            "fault plan changed" in c.stderr.read_text(encoding="utf-8", errors="replace")
            for c in cluster.nodes.values()
            if c.stderr.exists()
        ),
    }


def analyse_chaos(
    args: argparse.Namespace,
    cluster: Cluster,
    marks: dict[str, float],
    notes: dict[str, str],
    groups: list[list[str]],
) -> dict[str, object]:
    """The phase table, the figures and the traces of the chaos part."""
    traces = [
        load_trace(
            name,
            cluster.index[name],
            child.log,
            cluster.ended_unix_s.get(name) if name in cluster.killed else None,
        )
        for name, child in cluster.nodes.items()
    ]
    t0 = marks["t0"]
    survivors = [tr for tr in traces if tr.name not in cluster.killed]
    stop = min((tr.times[-1] for tr in survivors if tr.times), default=marks["end"])
    marks["stop"] = max(stop, *(v for k, v in marks.items() if k != "end"))  # after the script
    half_b = {i for i in set(cluster.index.values()) if host_of(i) in groups[1]}
    loss = f"loss {args.loss:g}, delay {args.delay_s:g} s on datagrams and HTTP requests"
    what = {
        "t0": ("a lossy training", "training under " + loss),
        "kill": ("b kill -9", notes.get("kill", "")),
        "restart": ("c restart", notes.get("restart", "")),
        "partition": ("d partition", f"A = {', '.join(groups[0])} | B = {', '.join(groups[1])}"),
        "heal": ("d heal", "partition window ends"),
        "seed": ("e seed down", notes.get("seed", "")),
        "stop": ("f finish", "the time budget ends the run"),
    }
    keys = [k for k in what if k in marks]
    rows, figures = [], {}
    for key, following in zip(keys, [*keys[1:], "end"], strict=True):
        label, action = what[key]
        row = phase_row(traces, label, marks[key], marks[following], action, t0)
        rows.append(row)
        if key == "restart":
            figures["rejoin"] = restart_notes(args, cluster, traces, marks, row)
        elif key == "partition":
            figures["partition"] = partition_notes(traces, marks, row, half_b)
            figures["remerge"] = remerge(
                cluster,
                groups,
                marks["partition"],
                marks["heal"],
                gone=set(args.kill) - {args.restart},
            )
        elif key == "heal":
            figures["heal"] = heal_notes(args, traces, marks, row, figures.get("remerge", {}))
        elif key == "seed":
            made = steps_between(traces, marks["seed"], marks["stop"])
            figures["after_seed"] = {
                "median_steps": row["steps_made"],
                "min_steps": min(made.values(), default=0),
            }
            row["notes"] = (
                f"steps after the seed died: median {row['steps_made']}, "
                f"min {figures['after_seed']['min_steps']}"
            )
        elif key == "stop":
            figures["finish"] = finish_row(cluster, traces, survivors, row, marks["stop"])
    return {
        "t0_unix_s": t0,
        "marks_s": {k: round(v - t0, 2) for k, v in marks.items()},
        "phases": rows,
        "figures": figures,
        "nodes": {
            tr.name: {
                "exit_code": cluster.nodes[tr.name].exit_code,
                "killed": tr.name in cluster.killed,
                "steps": tr.steps[-1] if tr.steps else 0,
                "accuracy": tr.accuracy,
            }
            for tr in traces
        },
        "series": {
            tr.name: [[round(t - t0, 3), s] for t, s in zip(tr.times, tr.steps, strict=True)]
            for tr in traces
        },
        "kill_s": {n: round(cluster.ended_unix_s[n] - t0, 2) for n in cluster.killed},
    }


def phase_row(
    traces: Sequence[Trace], label: str, start: float, end: float, what: str, t0: float
) -> dict[str, object]:
    steps = live_steps(traces, end)
    made = steps_between(traces, start, end)
    through = [tr.name for tr in traces if tr.is_live(start) and tr.is_live(end)]
    values = list(steps.values())
    return {
        "phase": label,
        "start_s": round(start - t0, 1),
        "end_s": round(end - t0, 1),
        "what": what,
        "live": len(steps),
        "median_step": int(statistics.median(values)) if values else None,
        "spread": max(values) - min(values) if values else None,
        "steps_made": int(statistics.median(made.values())) if made else 0,
        "continued": any(v > 0 for v in made.values()) and all(made[n] > 0 for n in through),
        "notes": "",
    }


def restart_notes(
    args: argparse.Namespace,
    cluster: Cluster,
    traces: Sequence[Trace],
    marks: dict[str, float],
    row: dict[str, object],
) -> dict[str, object]:
    name = f"node-{args.restart}r"
    found = rejoin_source(cluster.nodes[name].stderr) if name in cluster.nodes else {}
    mine = next((tr for tr in traces if tr.name == name), None)
    if mine is not None and mine.times:
        found["first_step_after_s"] = round(mine.times[0] - marks["restart"], 2)
        found["resumed_at_step"] = mine.steps[0] - 1
        found["steps_made"] = mine.steps[-1] - mine.steps[0] + 1
    source = found.get("source", "unknown")
    if source == "peer":
        text = (
            f"rejoined from a peer's model at step {found.get('from_step')} (its checkpoint "
            f"of step {found.get('checkpoint_step')} was {found.get('behind_steps')} behind)"
        )
    elif source == "checkpoint":
        text = f"rejoined from its checkpoint of step {found.get('checkpoint_step')}"
    elif source == "fresh":
        text = f"no checkpoint: joined the run in progress at step {found.get('from_step')}"
    else:
        text = "rejoin source not found in its log"
    when = found.get("first_step_after_s")
    row["notes"] = text + (
        f"; first step {when} s after the restart" if when is not None else "; it never stepped"
    )
    return found


def partition_notes(
    traces: Sequence[Trace], marks: dict[str, float], row: dict[str, object], half_b: set[int]
) -> dict[str, object]:
    made = steps_between(traces, marks["partition"], marks["heal"])
    halves = {
        "A": [v for n, v in made.items() if _index(traces, n) not in half_b],
        "B": [v for n, v in made.items() if _index(traces, n) in half_b],
    }
    medians = {h: int(statistics.median(v)) if v else 0 for h, v in halves.items()}
    worst = max_spread(traces, marks["partition"], marks["heal"])
    row["notes"] = (
        f"steps made: half A median {medians['A']}, half B median {medians['B']}; "
        f"max spread {worst}"
    )
    return {
        "half_steps_median": medians,
        "half_nodes": {h: len(v) for h, v in halves.items()},
        "max_spread": worst,
    }


def _index(traces: Sequence[Trace], name: str) -> int:
    return next(tr.index for tr in traces if tr.name == name)


def heal_notes(
    args: argparse.Namespace,
    traces: Sequence[Trace],
    marks: dict[str, float],
    row: dict[str, object],
    merge: dict[str, object],
) -> dict[str, object]:
    until = marks.get("seed", marks["stop"])
    found = convergence(
        traces, marks["heal"], until, bound=args.staleness, hold_s=args.hold_s, dt=0.25
    )
    at_heal = spread_at(traces, marks["heal"])
    if found is None:
        text = f"spread not back within s = {args.staleness} in {until - marks['heal']:.0f} s"
    else:
        text = (
            f"spread {at_heal} at the heal; within s = {args.staleness} after {found[0]:.1f} s "
            f"(+{found[1]} steps)"
        )
    relearnt = merge.get("relearnt_after_heal_s")
    if merge.get("cross_half_forgotten"):
        text += (
            f"; {merge['relearnt']}/{merge['cross_half_forgotten']} forgotten cross-half "
            f"peers known again" + (f" by +{relearnt} s" if relearnt is not None else "")
        )
    before = [
        spread_at(traces, marks["t0"] + k * 0.25)
        for k in range(int((marks["partition"] - marks["t0"]) / 0.25))
    ]
    if before:
        text += f"; spread before the partition: median {statistics.median(before):g}"
    row["notes"] = text
    return {
        "spread_before_partition_median": statistics.median(before) if before else None,
        "spread_before_partition_max": max(before, default=None),
        "spread_at_heal": at_heal,
        "converged_after_s": None if found is None else round(found[0], 2),
        "converged_steps": None if found is None else found[1],
        "bound_s": args.heal_s,
        "hold_s": args.hold_s,
    }


def finish_row(
    cluster: Cluster,
    traces: Sequence[Trace],
    survivors: Sequence[Trace],
    row: dict[str, object],
    stop: float,
) -> dict[str, object]:
    """The last row: who finished, with what accuracy; steps and spread when the first
    survivor stopped (a node restarted late has its budget end later and runs on alone)."""
    finished = [tr.name for tr in survivors if cluster.nodes[tr.name].exit_code == 0]
    accuracies = [tr.accuracy for tr in survivors if tr.accuracy is not None]
    finals = [tr.steps[-1] for tr in survivors if tr.steps]
    at_stop = list(live_steps(traces, stop).values())
    row["live"] = f"{len(finished)}/{len(survivors)} exit 0"
    row["median_step"] = int(statistics.median(at_stop)) if at_stop else None
    row["spread"] = max(at_stop) - min(at_stop) if at_stop else None
    row["continued"] = len(finished) == len(survivors)
    mean = statistics.fmean(accuracies) if accuracies else float("nan")
    row["notes"] = (
        f"finished: {', '.join(finished) or 'none'}; accuracy mean {mean:.4f}, "
        f"min {min(accuracies, default=float('nan')):.4f}; final steps "
        f"{min(finals, default=0)}..{max(finals, default=0)}"
    )
    return {
        "finished": finished,
        "survivors": [tr.name for tr in survivors],
        "accuracy_mean": round(mean, 4) if accuracies else None,
        "accuracy_min": round(min(accuracies), 4) if accuracies else None,
    }


# -- verdicts, tables, plots -----------------------------------------------------------------


def expectations(result: dict[str, object], args: argparse.Namespace) -> list[dict[str, object]]:
    checks: list[dict[str, object]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"expectation": name, "ok": bool(ok), "detail": detail})

    loss = result.get("loss")
    if isinstance(loss, dict):
        for label, run in loss["runs"].items():
            check(
                f"loss part, {label}: every node finishes",
                run["finished"] == run["nodes"],
                f"{run['finished']}/{run['nodes']} exit 0",
            )
        lossy = loss["runs"]["lossy"]
        low = lossy["accuracy_min"]
        check(
            f"loss part: every lossy node reaches >= {TARGET_ACCURACY:.0%}",
            low is not None and low >= TARGET_ACCURACY,
            f"min accuracy {low}",
        )
    chaos = result.get("chaos")
    if isinstance(chaos, dict):
        figures = chaos["figures"]
        finish = figures.get("finish", {})
        check(
            "chaos: every node not killed finishes (exit 0)",
            bool(finish) and finish["finished"] == finish["survivors"],
            f"finished {finish.get('finished')} of {finish.get('survivors')}",
        )
        rejoin = figures.get("rejoin", {})
        check(
            "chaos: the restarted node trains again",
            rejoin.get("steps_made", 0) > 0,
            f"{rejoin.get('steps_made', 0)} steps, source {rejoin.get('source')}",
        )
        part = figures.get("partition", {}).get("half_steps_median", {})
        check(
            "chaos: both halves train during the partition",
            bool(part) and min(part.values()) > 0,
            f"median steps per half {part}",
        )
        heal = figures.get("heal", {})
        after = heal.get("converged_after_s")
        check(
            f"chaos: spread back within s = {args.staleness} at most {args.heal_s:g} s after "
            f"the heal",
            after is not None and after <= args.heal_s,
            f"after {after} s, +{heal.get('converged_steps')} steps",
        )
        seed = figures.get("after_seed", {})
        check(
            "chaos: training continues after the seed died (median steps > 0)",
            seed.get("median_steps", 0) > 0,
            f"steps after: {seed}",
        )
    return checks


def print_tables(result: dict[str, object], checks: list[dict[str, object]]) -> None:
    out = Console(width=200)
    loss = result.get("loss")
    if isinstance(loss, dict):
        table = Table(title="loss part: pSSP on a lossy network", title_justify="left")
        for column in (
            "run",
            "finished",
            "wall s",
            "train s",
            "median steps/s",
            "accuracy mean",
            "accuracy min",
            "deltas sent/recv/rej",
        ):
            table.add_column(column, justify="left" if column == "run" else "right")
        for label, run in loss["runs"].items():
            table.add_row(
                label,
                f"{run['finished']}/{run['nodes']}",
                str(run["wall_s"]),
                str(run["train_s"]),
                str(run["median_steps_per_s"]),
                str(run["accuracy_mean"]),
                str(run["accuracy_min"]),
                f"{run['deltas_sent']}/{run['deltas_received']}/{run['deltas_rejected']}",
            )
        out.print(table)
        plan = loss["plan"]
        out.print(
            f"lossy plan: loss {plan['loss']}, delay {plan['delay_s']} s, request loss "
            f"{plan['request_loss']}; applies to {plan['applies_to']}. Time ratio lossy / "
            f"fault-free: {loss['ratio_lossy_to_free']}",
            highlight=False,
        )
    chaos = result.get("chaos")
    if isinstance(chaos, dict):
        table = Table(
            title="chaos part (times in s after the first training step)",
            title_justify="left",
            show_lines=True,
        )
        for column in (
            "phase",
            "start s",
            "what was done",
            "live",
            "median step",
            "spread",
            "steps in phase",
            "training continued",
            "notes",
        ):
            table.add_column(column, justify="left", overflow="fold")
        for row in chaos["phases"]:
            table.add_row(
                row["phase"],
                f"{row['start_s']:+.1f}",
                row["what"],
                str(row["live"]),
                str(row["median_step"]),
                str(row["spread"]),
                str(row["steps_made"]),
                "yes" if row["continued"] else "NO",
                row["notes"],
            )
        out.print(table)
    for item in checks:
        mark = "ok  " if item["ok"] else "FAIL"
        out.print(f"{mark} {item['expectation']}: {item['detail']}", highlight=False)


def plot_chaos(chaos: dict[str, object], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[list[float]]] = chaos["series"]  # type: ignore[assignment]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    colours = plt.get_cmap("tab10")
    traces = []
    for name, points in series.items():
        index = int(name.removeprefix("node-").rstrip("r"))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        top.plot(
            xs,
            ys,
            lw=1.2,
            color=colours(index % 10),
            ls="--" if name.endswith("r") else "-",
            label=name + (" (restarted)" if name.endswith("r") else ""),
        )
        killed: dict[str, float] = chaos["kill_s"]  # type: ignore[assignment]
        if name in killed and xs:
            top.plot([xs[-1]], [ys[-1]], "x", color="black", ms=8)
        end = killed.get(name, xs[-1] if xs else 0.0)
        traces.append(Trace(name, index, tuple(xs), tuple(int(y) for y in ys), end))
    last = max((p[-1][0] for p in series.values() if p), default=0.0)
    grid = [k * 0.25 for k in range(int(last / 0.25) + 1)]
    bottom.plot(grid, [spread_at(traces, t) for t in grid], color="black", lw=1)
    bottom.axhline(args.staleness, color="tab:red", ls=":", label=f"s = {args.staleness}")
    shades = {
        "b": "tab:orange",
        "c": "tab:green",
        "d": "tab:red",
        "e": "tab:purple",
        "f": "tab:gray",
    }
    for row in chaos["phases"]:  # type: ignore[attr-defined]
        colour = shades.get(row["phase"][0])
        alpha = 0.05 if row["phase"] == "d heal" else 0.15
        for axis in (top, bottom):
            if colour is not None:
                axis.axvspan(row["start_s"], row["end_s"], color=colour, alpha=alpha, lw=0)
        top.text(
            row["start_s"],
            1.01,
            row["phase"],
            transform=top.get_xaxis_transform(),
            fontsize=8,
            rotation=30,
            ha="left",
            va="bottom",
        )
    top.set_ylabel("steps completed")
    top.legend(fontsize=7, ncol=2, loc="upper left")
    bottom.set_yscale("symlog", linthresh=10)  # s and a runaway node on one axis
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("spread (max - min)")
    bottom.set_xlabel("seconds after the first training step")
    bottom.legend(fontsize=7, loc="upper left")
    fig.suptitle("chaos run: loss, kill -9, restart, partition and heal, seed down", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(loss: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4))
    for colour, (label, run) in zip(("tab:blue", "tab:red"), loss["runs"].items(), strict=False):
        for k, points in enumerate(run["series"].values()):
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colour,
                lw=0.8,
                alpha=0.7,
                label=label if k == 0 else None,
            )
    axis.set_xlabel("seconds after the run's first training step")
    axis.set_ylabel("steps completed")
    axis.legend()
    axis.set_title("loss part: every node's steps, fault-free and lossy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def _indices(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"node indices, comma-separated (6,7), not {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--part", choices=("loss", "chaos", "both"), default="both")
    add("--out", type=Path, help="output folder (default runs/chaos-<timestamp>); new or empty")
    add("--nodes", type=int, default=8)
    add("--sample", type=int, default=2, help="pSSP beta")
    add("--staleness", type=int, default=4, help="pSSP s")
    add("--model", default="mlp")
    add("--dataset", default="mnist-5k")
    add("--loss", type=float, default=0.05, help="datagram (and request) loss probability")
    add("--delay-s", type=float, default=0.02, help="added one-way delay, s")
    add("--request-loss", type=float, default=None, help="HTTP request loss (default --loss)")
    add("--node-slow-s", type=float, default=0.0, help="extra seconds per step on every node")
    loss = parser.add_argument_group("loss part")
    loss.add_argument("--steps", type=int, default=400, help="steps per node")
    loss.add_argument("--eval-every", type=int, default=100)
    loss.add_argument("--run-timeout-s", type=float, default=600.0)
    chaos = parser.add_argument_group("chaos part (times in s)")
    chaos.add_argument("--kill", type=_indices, default=None, help="nodes to kill -9 (n-2,n-1)")
    chaos.add_argument("--restart", type=int, default=None, help="killed node to restart")
    chaos.add_argument("--checkpoint-every", type=int, default=20)
    chaos.add_argument("--chaos-eval-every", type=int, default=50)
    chaos.add_argument("--warmup-s", type=float, default=15.0, help="t0 to the kill")
    chaos.add_argument("--down-s", type=float, default=10.0, help="kill to restart")
    chaos.add_argument("--settle-s", type=float, default=20.0, help="restart to partition")
    chaos.add_argument("--partition-s", type=float, default=30.0)
    chaos.add_argument(
        "--heal-s", type=float, default=20.0, help="heal to seed kill; the bound on re-convergence"
    )
    chaos.add_argument("--tail-s", type=float, default=20.0, help="seed kill to the budget's end")
    chaos.add_argument(
        "--plan-lead-s",
        type=float,
        default=3.0,
        help="the partition is written into the plan this long before it starts",
    )
    chaos.add_argument(
        "--hold-s",
        type=float,
        default=2.0,
        help="the spread must stay within s this long to count as converged",
    )
    chaos.add_argument("--end-timeout-s", type=float, default=90.0)
    args = parser.parse_args(argv)
    n = args.nodes
    if n < 3:
        parser.error(f"--nodes: at least 3, not {n}")
    args.kill = args.kill if args.kill is not None else [n - 2, n - 1]
    args.restart = args.restart if args.restart is not None else args.kill[-1]
    if not args.kill or any(not 0 <= i < n for i in args.kill) or len(args.kill) >= n - 1:
        parser.error(f"--kill: between 1 and {n - 2} node indices in 0..{n - 1}, not {args.kill}")
    if args.restart not in args.kill:
        parser.error(f"--restart: one of the killed nodes {args.kill}, not {args.restart}")
    if args.plan_lead_s < 1.5 or args.plan_lead_s > args.settle_s:
        parser.error(
            "--plan-lead-s: >= 1.5 (nodes re-read the plan once a second) and <= --settle-s"
        )
    args.partition_at_s = args.warmup_s + args.down_s + args.settle_s
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # children stop with us
        signal.signal(number, _interrupt)
    out = args.out or Path("runs") / f"chaos-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        say(f"error: --out {out}: a new or empty folder (old checkpoints would be refused)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict[str, object] = {
        "params": params,
        "out": str(out),
        "host": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
    }
    began = time.monotonic()
    try:
        if args.part in ("loss", "both"):
            result["loss"] = run_loss_part(args, out)
        if args.part in ("chaos", "both"):
            result["chaos"] = run_chaos_part(args, out)
    except RuntimeError as err:
        say(f"error: {err}")
        result["error"] = str(err)
    except KeyboardInterrupt as err:
        say(f"interrupted ({err}); every node is stopped, the logs are in {out}")
        return 130
    result["host"]["load_after"] = os.getloadavg()  # type: ignore[index]
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    checks = expectations(result, args)
    if "error" in result:
        checks.append({"expectation": "the run completes", "ok": False, "detail": result["error"]})
    result["expectations"] = checks
    print_tables(result, checks)
    (out / "chaos.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if isinstance(result.get("chaos"), dict):
        plot_chaos(result["chaos"], args, out / "chaos.png")  # type: ignore[arg-type]
    if isinstance(result.get("loss"), dict):
        plot_loss(result["loss"], out / "loss.png")  # type: ignore[arg-type]
    failed = [c["expectation"] for c in checks if not c["ok"]]
    say(f"{result['elapsed_s']} s in all; figures in {out / 'chaos.json'}, plots beside it")
    if failed:
        say("FAILED: " + "; ".join(str(f) for f in failed))
        return 1
    say("every expectation holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
