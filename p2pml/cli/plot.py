"""``p2pml plot DIR [DIR...]``: redraw the plots of runs written by ``p2pml local``, or overlay
several runs (to compare barriers side by side), and print one verdict line per run: steps per
node and final accuracy."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from p2pml.cli.args import bad_flag
from p2pml.errors import ConfigError

if TYPE_CHECKING:  # matplotlib loads only when the command runs
    from p2pml.report.runs import RunData

__all__ = ["plot", "verdict"]


def verdict(run: RunData) -> str:
    """One line on a run: steps each node completed and their final test accuracy."""
    steps = [s for t in run.trainers if (s := t.steps_done) is not None]
    accs = [a for t in run.trainers if (a := t.last("accuracy")) is not None]
    times = [t_s for t in run.trainers if (t_s := t.last("time_s")) is not None]
    parts = [f"{run.label}:"]
    if steps:
        parts.append(
            f"median {statistics.median(steps):g} steps per node (min {min(steps)}, "
            f"max {max(steps)}) in {max(times, default=0.0):.1f} s;"
        )
    else:
        parts.append("no steps logged;")
    if accs:
        parts.append(
            f"final accuracy {100 * statistics.mean(accs):.1f} % (mean over nodes, "
            f"min {100 * min(accs):.1f} %)"
        )
    server = run.server
    if server is not None and (acc := server.last("accuracy")) is not None:
        parts.append(f"server {100 * acc:.1f} %")
    return " ".join(parts)


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by p2pml local.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write compare.png for several runs (default: the first's)."),
    ] = None,
) -> None:
    """Redraw a run's plots, or overlay several runs in compare.png; prints a verdict per run."""
    from p2pml.report.runs import load_run, plot_compare, plot_run

    loaded = []
    for folder in runs:
        try:
            loaded.append(load_run(folder))
        except ConfigError as err:
            raise bad_flag("RUN", str(folder), err.allowed) from None
    for run in loaded:
        try:
            written = plot_run(run, run.folder)
        except OSError as err:
            raise bad_flag("RUN", str(run.folder), f"a writable run folder ({err})") from None
        for path in written:
            print(f"p2pml plot: {path}", file=sys.stderr)
    if len(loaded) > 1:
        target = out if out is not None else loaded[0].folder.parent
        try:
            path = plot_compare(loaded, target)
        except OSError as err:
            raise bad_flag("--out", str(target), f"a writable folder ({err.strerror})") from None
        print(f"p2pml plot: {path}", file=sys.stderr)
    for run in loaded:
        print(verdict(run))
