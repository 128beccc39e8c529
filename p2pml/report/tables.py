"""Terminal output with rich: summary tables and progress bars."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pml.report.results import JsonValue

__all__ = ["bounds_table", "make_progress", "simulate_table"]


def _cell(value: JsonValue) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def simulate_table(runs: Sequence[dict[str, JsonValue]], *, title: str) -> Table:
    """The summary of ``p2pml simulate``: one row per run."""
    table = Table(title=title)
    columns = ("barrier", "sample", "staleness", "min", "median", "mean", "max", "spread")
    for name in ("barrier", "β", "s", "min", "median", "mean", "max", "spread"):
        table.add_column(name, justify="left" if name == "barrier" else "right")
    table.add_column("waiting", justify="right")
    table.add_column("wall s", justify="right")
    for run in runs:
        wait = run["mean_wait_fraction"]
        assert isinstance(wait, float)
        mean = run["mean"]
        assert isinstance(mean, float)
        cells = [_cell(run[c]) for c in columns]
        cells[5] = f"{mean:.1f}"
        table.add_row(*cells, f"{wait:.0%}", _cell(run["wall_s"]))
    return table


def bounds_table(runs: Sequence[dict[str, JsonValue]], *, title: str) -> Table:
    """The summary of ``p2pml bounds``: minima per beta."""
    table = Table(title=title)
    for name in ("β", "min mean", "at a", "min second moment", "at a"):
        table.add_column(name, justify="right")
    for run in runs:
        table.add_row(
            *(
                _cell(run[k])
                for k in ("sample", "min_mean", "argmin_mean_a", "min_second", "argmin_second_a")
            )
        )
    return table


def make_progress(console: Console) -> Progress:
    """A progress display for long commands; it draws nothing when the console is not a terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
