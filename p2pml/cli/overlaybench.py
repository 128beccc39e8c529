"""``p2pml bench overlay``: N nodes in one process on loopback; join, lookups, N^, draws, memory.

``--json`` writes ``{"nodes", "dead_fraction", "lookups", "join_s_per_node", "lookup_p50_s",
"lookup_p95_s", "estimate": {"true_n", "median_abs_error", "p95_abs_error", "rmse", ...},
"sampling": {"draws", "chi2_p", ...}, "memory_mib_per_node", ...}``; errors are fractions of the
true N.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from p2pml.cli.args import bad_flag, check_writable
from p2pml.cli.output import console, write_json
from p2pml.core.config import DEFAULT_RPC_TIMEOUT_S, OverlayConfig
from p2pml.errors import ConfigError
from p2pml.report.tables import make_progress

__all__ = ["overlay"]

MAX_NODES = 2000


def _table(result: dict[str, object]) -> Table:
    est, samp = result["estimate"], result["sampling"]
    assert isinstance(est, dict) and isinstance(samp, dict)
    table = Table(title=f"overlay: {result['nodes']} nodes in one process on loopback")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    timeout = float(str(result["rpc_timeout_s"]))
    rows = [
        ("join s per node", f"{result['join_s_per_node']:.4f}", "<= 0.1"),
        ("lookup p50 s", f"{result['lookup_p50_s']:.4f}", ""),
        ("lookup p95 s", f"{result['lookup_p95_s']:.4f}", f"<= {2 * timeout:g} (2x RPC timeout)"),
        (f"N^ median |error| (true N {est['true_n']})", f"{est['median_abs_error']:.2%}", "<= 6%"),
        ("N^ p95 |error|", f"{est['p95_abs_error']:.2%}", "<= 15%"),
        (
            "N^ rmse",
            f"{est['rmse']:.2%}",
            f"<= {1.3 * est['expected_rel_error']:.2%} (1.3x 1/sqrt(L(k-2)))",
        ),
        (
            "barrier check s (10 signed step RPCs)",
            f"{result['barrier_check_p50_s']:.4f}",
            "<= 0.002 (both ends in this process)",
        ),
        ("draws", str(samp["draws"]), ""),
        ("chi-square p of draws", f"{samp.get('chi2_p', float('nan')):.3g}", ">= 0.001"),
        ("dead peers in samples", str(samp["dead_in_samples"]), "0"),
        ("memory MiB per node", f"{result['memory_mib_per_node']:.3f}", "<= 1"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def overlay(
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes to start (>= 3).")] = 100,
    lookups: Annotated[int, typer.Option("--lookups", help="L: lookups per estimate.")] = 16,
    dead_fraction: Annotated[
        float, typer.Option("--dead-fraction", help="Share of nodes stopped before measuring.")
    ] = 0.0,
    draws: Annotated[
        int, typer.Option("--draws", help="Uniform draws for the chi-square.")
    ] = 10_000,
    rpc_timeout: Annotated[
        float, typer.Option("--rpc-timeout", help="RPC timeout in seconds.")
    ] = DEFAULT_RPC_TIMEOUT_S,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the choice of dead nodes.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write N^ errors and draw counts as a PNG.")
    ] = None,
) -> None:
    """Start N overlay nodes in this process and measure join, lookups, N^, sampling, memory."""
    if not 3 <= nodes <= MAX_NODES:
        raise bad_flag("--nodes", nodes, f"a whole number in 3-{MAX_NODES}")
    if lookups < 1:
        raise bad_flag("--lookups", lookups, "a whole number >= 1")
    if not 0.0 <= dead_fraction < 0.9:
        raise bad_flag("--dead-fraction", dead_fraction, "a fraction in [0, 0.9)")
    if draws < 0:
        raise bad_flag("--draws", draws, "a whole number >= 0")
    try:
        config = OverlayConfig(rpc_timeout_s=rpc_timeout).validate()
    except ConfigError as err:
        raise bad_flag("--rpc-timeout", rpc_timeout, err.allowed) from None
    check_writable(json_path, "--json")
    check_writable(plot_path, "--plot")
    from p2pml.io.overlaybench import run_overlay_bench  # the DHT stack: only when it runs

    logging.getLogger("p2pml").setLevel(logging.ERROR)  # dead nodes are the point: no warnings
    with make_progress(console) as progress:
        tasks: dict[str, object] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)  # type: ignore[arg-type]

        result = asyncio.run(
            run_overlay_bench(
                n_nodes=nodes,
                n_lookups=lookups,
                dead_fraction=dead_fraction,
                n_draws=draws,
                config=config,
                seed=seed,
                progress=report,
            )
        )
    console.print(_table(result))
    if json_path is not None:
        write_json(json_path, result)  # type: ignore[arg-type]
        console.print(f"JSON: {json_path}")
    if plot_path is not None:
        _plot(result, plot_path)
        console.print(f"plot: {plot_path}")


def _plot(result: dict[str, object], path: Path) -> None:
    from p2pml.report.plots import plot_overlay  # matplotlib: only when a plot is asked for

    est, samp = result["estimate"], result["sampling"]
    assert isinstance(est, dict) and isinstance(samp, dict)
    counts = [(int(o), float(e)) for o, e in samp.get("counts", [])]
    title = (
        f"{result['nodes']} nodes ({result['dead_fraction']:.0%} stopped), L = {result['lookups']}"
        f": N^ median |error| {est['median_abs_error']:.1%}; {samp['draws']} draws, "
        f"chi-square p = {samp.get('chi2_p', float('nan')):.3g}"
    )
    plot_overlay(est["errors"], counts, path, expected_error=est["expected_rel_error"], title=title)
