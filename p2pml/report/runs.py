"""Run folders (what ``p2pml local`` writes): reading the nodes' JSON-lines logs, the per-node
summary, and the PNG plots of one run or of several runs side by side.

A run folder holds ``metadata.json``, one ``<name>.jsonl`` step log per node (``node-0``, ...,
or ``server`` and ``worker-0``, ... in the centralised mode), each node's stderr in
``<name>.stderr.log``, ``summary.json`` and the plots. A peer's or worker's log has one line per
step (`train/loop.py` ``StepLog``); the server's one line per model update (``UpdateLog``).
Reading is tolerant: a line cut short by a killed node, or one that is not a JSON object, is
skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from p2pml.errors import ConfigError

__all__ = [
    "NodeTrace",
    "RunData",
    "load_run",
    "node_summary",
    "plot_compare",
    "plot_run",
    "read_log",
    "steps_reached",
]

SERVER = "server"
METADATA = "metadata.json"
SUMMARY = "summary.json"
LOG_SUFFIX = ".jsonl"


def read_log(path: Path) -> tuple[list[dict[str, object]], int]:
    """The JSON objects of a JSON-lines file, and how many lines were skipped as unreadable."""
    records: list[dict[str, object]] = []
    skipped = 0
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(value, dict):
                records.append(value)
            else:
                skipped += 1
    return records, skipped


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(slots=True)
class NodeTrace:
    """One node's log: its name, role and records."""

    name: str
    records: list[dict[str, object]]
    skipped: int = 0
    t0: float | None = None  # the run's first wall-clock time (unix_s), when logs carry it

    @property
    def role(self) -> str:
        return (
            SERVER
            if self.name == SERVER
            else "worker"
            if self.name.startswith("worker")
            else "peer"
        )

    def series(self, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) pairs of the records where both are numbers. For a peer or worker a
        ``step`` axis (x or y) counts completed steps (step + 1); a ``time_s`` axis is the run's
        shared wall clock when the logs carry it."""
        xs: list[float] = []
        ys: list[float] = []
        wall = x == "time_s" and self.t0 is not None
        for record in self.records:
            a, b = _number(record.get("unix_s" if wall else x)), _number(record.get(y))
            if wall and a is not None and self.t0 is not None:
                a -= self.t0
            if a is not None and b is not None:
                xs.append(self._completed(x, a))
                ys.append(self._completed(y, b))
        return np.asarray(xs), np.asarray(ys)

    def _completed(self, key: str, value: float) -> float:
        return value + 1 if key == "step" and self.role != SERVER else value

    @property
    def steps_done(self) -> int | None:
        """The steps this peer or worker completed (its last logged step + 1)."""
        step = self.last("step")
        return None if step is None else int(step) + 1

    def last(self, key: str) -> float | None:
        """The last numeric value of `key` in the log."""
        for record in reversed(self.records):
            value = _number(record.get(key))
            if value is not None:
                return value
        return None


@dataclass(slots=True)
class RunData:
    """A run folder: its metadata (empty when missing) and one trace per node log."""

    folder: Path
    metadata: dict[str, object] = field(default_factory=dict)
    nodes: list[NodeTrace] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The run's barrier (and beta, s) from its metadata, else the folder's name."""
        params = self.metadata.get("params")
        if isinstance(params, Mapping) and isinstance(params.get("barrier"), str):
            barrier = str(params["barrier"])
            if barrier in ("pbsp", "pssp"):
                barrier += f" β={params.get('sample')}"
            if barrier.startswith(("ssp", "pssp")):
                barrier += f" s={params.get('staleness')}"
            return f"{barrier} ({self.folder.name})"
        return self.folder.name

    def name_of(self, trace: NodeTrace) -> str:
        """The node's name for a legend, with its straggler delay when it had one."""
        nodes = self.metadata.get("nodes")
        for node in nodes if isinstance(nodes, list) else []:
            if isinstance(node, Mapping) and node.get("name") == trace.name:
                slow = _number(node.get("slow_s"))
                if slow:
                    return f"{trace.name} (+{slow:g} s/step)"
        return trace.name

    @property
    def trainers(self) -> list[NodeTrace]:
        return [n for n in self.nodes if n.role != SERVER]

    @property
    def server(self) -> NodeTrace | None:
        return next((n for n in self.nodes if n.role == SERVER), None)


def _node_order(path: Path) -> tuple[int, int, str]:
    stem = path.name[: -len(LOG_SUFFIX)]
    name, _, index = stem.rpartition("-")
    if index.isdigit():
        return (1, int(index), name)
    return (0, 0, stem)


def load_run(folder: Path) -> RunData:
    """Read a run folder.

    Raises:
        ConfigError: when `folder` is not a folder or holds no node logs.
    """
    if not folder.is_dir():
        raise ConfigError("run folder", str(folder), "an existing run folder (from p2pml local)")
    run = RunData(folder)
    meta = folder / METADATA
    if meta.is_file():
        try:
            loaded = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError("run folder", str(meta), f"readable JSON ({err})") from None
        if isinstance(loaded, dict):
            run.metadata = loaded
    for path in sorted(folder.glob(f"*{LOG_SUFFIX}"), key=_node_order):
        try:
            records, skipped = read_log(path)
        except OSError as err:
            raise ConfigError("run folder", str(path), f"a readable log ({err})") from None
        run.nodes.append(NodeTrace(path.name[: -len(LOG_SUFFIX)], records, skipped))
    starts = [v for n in run.nodes if n.records if (v := _number(n.records[0].get("unix_s")))]
    if starts and all(any("unix_s" in r for r in n.records) for n in run.nodes if n.records):
        for trace in run.nodes:  # one time axis for every node: seconds since the first record
            trace.t0 = min(starts)
    if not run.nodes:
        raise ConfigError(
            "run folder", str(folder), f"a folder with node logs (*{LOG_SUFFIX}); found none"
        )
    return run


def node_summary(trace: NodeTrace) -> dict[str, object]:
    """What one node's log says about it at its end (the documented ``summary.json`` fields)."""
    if trace.role == SERVER:
        version = trace.last("version")
        return {
            "role": SERVER,
            "model_version": None if version is None else int(version),
            "final_accuracy": trace.last("accuracy"),
            "updates": len(trace.records),
            "time_s": trace.last("time_s"),
        }
    waits = [w for r in trace.records if (w := _number(r.get("wait_s"))) is not None]

    def count(key: str) -> int:
        value = trace.last(key)
        return 0 if value is None else int(value)

    return {
        "role": trace.role,
        "steps": trace.steps_done or 0,
        "final_loss": trace.last("loss"),
        "final_accuracy": trace.last("accuracy"),
        "wait_s": round(sum(waits), 4),
        "deltas_sent": count("deltas_sent"),
        "deltas_received": count("deltas_received"),
        "deltas_rejected": count("deltas_rejected"),
        "n_hat": trace.last("n_hat"),
        "time_s": trace.last("time_s"),
        "unreadable_lines": trace.skipped,
    }


def steps_reached(trainers: Sequence[NodeTrace]) -> tuple[float, list[int]]:
    """How many steps each node had completed when the first of them finished (the snapshot
    of the PSP figures: under a tight barrier the nodes are close together, under a loose one
    spread out), and that time in seconds of training."""
    curves = [t.series("time_s", "step") for t in trainers]
    finished = [float(xs[-1]) for xs, _ in curves if len(xs)]
    if not finished:
        return 0.0, []
    at = min(finished)
    reached = []
    for xs, ys in curves:
        done = ys[xs <= at + 1e-9]
        reached.append(int(done.max()) if len(done) else 0)
    return at, reached


# -- plots --------------------------------------------------------------------------------------


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i) if n <= 10 else cmap(i / max(n - 1, 1)) for i in range(n)]


def _finish(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_run(run: RunData, folder: Path) -> list[Path]:
    """Write the run's plots into `folder`: ``training.png`` (loss and accuracy against steps and
    against time, every node and the server) and ``steps.png`` (steps against time, and the
    distribution of steps reached over the nodes). Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    trainers, server = run.trainers, run.server
    colors = _colors(len(trainers))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    panels = [
        (axes[0][0], "step", "loss", "steps completed", "training loss"),
        (axes[0][1], "time_s", "loss", "seconds since the first step", "training loss"),
        (axes[1][0], "step", "accuracy", "steps completed", "test accuracy"),
        (axes[1][1], "time_s", "accuracy", "seconds since the first step", "test accuracy"),
    ]
    for ax, x, y, xlabel, ylabel in panels:
        for trace, color in zip(trainers, colors, strict=True):
            xs, ys = trace.series(x, y)
            marker = "o" if y == "accuracy" else None
            ax.plot(xs, ys, color=color, lw=1.2, marker=marker, ms=3, label=run.name_of(trace))
        if server is not None and y == "accuracy":
            sx, sy = server.series("version" if x == "step" else x, "accuracy")
            label = "server (x: model version)" if x == "step" else "server"
            ax.plot(sx, sy, color="black", lw=1.8, ls="--", marker="s", ms=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[1][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(f"{run.label}: loss and accuracy of every node")
    training = folder / "training.png"
    _finish(fig, training)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for trace, color in zip(trainers, colors, strict=True):
        xs, ys = trace.series("time_s", "step")
        left.plot(xs, ys, color=color, lw=1.2, label=run.name_of(trace))
    left.set_xlabel("seconds since the first step")
    left.set_ylabel("steps completed")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, frameon=False)
    at, reached = steps_reached(trainers)
    if reached:
        xs = np.sort(np.asarray(reached))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        right.step(xs, ys, where="post", lw=1.8, label=f"median {np.median(xs):g}")
        right.plot(xs, ys, "o", ms=4, color="C0")
        right.set_xlim(max(0.0, xs[0] - 0.05 * xs[-1] - 1), xs[-1] * 1.05 + 1)
        right.legend(fontsize=8, frameon=False, loc="upper left")
    right.set_xlabel(f"steps completed when the first node finished ({at:.1f} s)")
    right.set_ylabel("fraction of nodes (CDF)")
    right.set_ylim(0, 1.05)
    right.grid(alpha=0.3)
    fig.suptitle(f"{run.label}: progress of every node")
    steps_png = folder / "steps.png"
    _finish(fig, steps_png)
    return [training, steps_png]


def _mean_curve(traces: Sequence[NodeTrace], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean of `y` over the nodes against `x`, on a common grid (each node's curve carried
    forward from its last point, so a node that stopped keeps its final value)."""
    curves = [t.series(x, y) for t in traces]
    curves = [(xs, ys) for xs, ys in curves if len(xs)]
    if not curves:
        return np.asarray([]), np.asarray([])
    end = max(float(xs[-1]) for xs, _ in curves)
    start = min(float(xs[0]) for xs, _ in curves)
    grid = np.linspace(start, end, 200)
    values = []
    for xs, ys in curves:
        order = np.argsort(xs, kind="stable")
        idx = np.searchsorted(xs[order], grid, side="right") - 1
        column = np.where(idx >= 0, ys[order][np.clip(idx, 0, None)], np.nan)
        values.append(column)
    with np.errstate(invalid="ignore"):
        stacked = np.vstack(values)
        counts = np.sum(~np.isnan(stacked), axis=0)
        sums = np.nansum(stacked, axis=0)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return grid, mean


def plot_compare(runs: Sequence[RunData], folder: Path) -> Path:
    """Overlay several runs in ``compare.png``: mean loss and accuracy against time, mean steps
    against time, and the distribution of steps reached per run."""
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    colors = _colors(len(runs))
    for run, color in zip(runs, colors, strict=True):
        trainers = run.trainers
        for ax, y in ((axes[0][0], "loss"), (axes[0][1], "accuracy"), (axes[1][0], "step")):
            xs, ys = _mean_curve(trainers, "time_s", y)
            ax.plot(xs, ys, color=color, lw=1.6, label=run.label)
            if y == "accuracy" and run.server is not None:
                sx, sy = run.server.series("time_s", "accuracy")
                ax.plot(sx, sy, color=color, lw=1.2, ls="--", label=f"{run.label} server")
        _, reached = steps_reached(trainers)
        reached.sort()
        if reached:
            ys = np.arange(1, len(reached) + 1) / len(reached)
            axes[1][1].step(
                reached,
                ys,
                where="post",
                color=color,
                lw=1.8,
                label=f"{run.label} (median {np.median(reached):g})",
            )
    axes[0][0].set_ylabel("training loss (mean over nodes)")
    axes[0][0].set_yscale("log")
    axes[0][1].set_ylabel("test accuracy (mean over nodes)")
    axes[1][0].set_ylabel("steps completed (mean over nodes)")
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        ax.set_xlabel("seconds since the first step")
        ax.grid(alpha=0.3)
    axes[1][1].set_xlabel("steps completed when each run's first node finished")
    axes[1][1].set_ylabel("fraction of nodes (CDF)")
    axes[1][1].set_ylim(0, 1.05)
    axes[1][1].grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, frameon=False, loc="lower right")
    axes[1][1].legend(fontsize=8, frameon=False, loc="upper left")
    fig.suptitle("runs compared")
    path = folder / "compare.png"
    _finish(fig, path)
    return path
