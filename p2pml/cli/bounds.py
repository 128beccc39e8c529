"""``p2pml bounds``: the PSP convergence bounds on the update-order lag, per sample size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from p2pml.cli.args import bad_flag, check_writable, parse_int_list
from p2pml.cli.output import console, write_json
from p2pml.core.bounds import bound_curve
from p2pml.report.results import JsonValue, bound_record
from p2pml.report.tables import bounds_table

__all__ = ["bounds"]


def bounds(
    staleness: Annotated[int, typer.Option(help="Staleness r, in steps.")] = 4,
    length: Annotated[int, typer.Option(help="Length T of the update sequence.")] = 10_000,
    sample: Annotated[str, typer.Option(help="Comma list of sample sizes β (>= 1).")] = (
        "1,2,4,8,16,128"
    ),
    points: Annotated[int, typer.Option(help="Points per curve in the JSON and plot.")] = 199,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the curves as JSON.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the curves as PNG.")] = None,
) -> None:
    """Evaluate the PSP bounds on the mean and second moment of the lag, and their minima."""
    if staleness < 0:
        raise bad_flag("--staleness", staleness, "a whole number >= 0")
    if length <= staleness:
        raise bad_flag("--length", length, f"a whole number > --staleness ({staleness})")
    if points < 3:
        raise bad_flag("--points", points, "a whole number >= 3")
    betas = parse_int_list(sample, "--sample", minimum=1)
    check_writable(json_path, "--json")
    check_writable(plot, "--plot")
    curves = [
        bound_curve(beta=b, staleness=staleness, length=length, n_points=points) for b in betas
    ]
    runs: list[JsonValue] = [bound_record(c) for c in curves]
    table_rows = [bound_record(c) for c in curves]
    console.print(bounds_table(table_rows, title=f"PSP lag bounds, r = {staleness}, T = {length}"))
    if json_path is not None:
        write_json(json_path, {"params": {"staleness": staleness, "length": length}, "runs": runs})
        console.print(f"JSON: {json_path}")
    if plot is not None:
        from p2pml.report.plots import plot_bounds

        plot_bounds(curves, plot, staleness=staleness, length=length)
        console.print(f"plot: {plot}")
