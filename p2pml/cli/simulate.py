"""``p2pml simulate``: run the PSP simulator for one or more barriers and parameter values."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import TaskID

from p2pml.cli.args import check_writable, flag_for, parse_barriers, parse_int_list, parse_samples
from p2pml.cli.output import console, write_json
from p2pml.core.config import SimConfig, StepTimeConfig
from p2pml.errors import ConfigError
from p2pml.report.results import JsonValue, run_label, sim_params_record, sim_run_record
from p2pml.report.tables import make_progress, simulate_table
from p2pml.sim.scenario import expand_sweep, run_scenario

__all__ = ["simulate"]

FLAGS = {
    "barrier": "--barrier",
    "sample": "--sample",
    "staleness": "--staleness",
    "nodes": "--nodes",
    "duration_s": "--duration",
    "step_time.dist": "--step-time",
    "step_time.mean_s": "--mean-step",
    "step_time.shape": "--shape",
    "straggler_fraction": "--stragglers",
    "straggler_slowdown": "--slowdown",
    "check_delay_s": "--delay",
    "poll_s": "--poll",
    "seed": "--seed",
    "engine": "--engine",
}


def _configs(
    base: SimConfig, barriers: list[str], sample: str, stalenesses: list[int]
) -> list[SimConfig]:
    samples = [size.resolve(base.nodes) for size in parse_samples(sample)]
    try:
        base.validate()
        configs = expand_sweep(base, barriers, samples, stalenesses)
        for cfg in configs:
            cfg.validate()
    except ConfigError as err:
        raise flag_for(err, FLAGS) from None
    return configs


def simulate(
    nodes: Annotated[int, typer.Option(help="Number of simulated nodes P.")] = 200,
    duration: Annotated[float, typer.Option(help="Simulated seconds.")] = 200.0,
    barrier: Annotated[str, typer.Option(help="Comma list of bsp, ssp, asp, pbsp, pssp.")] = (
        "bsp,ssp,asp,pbsp,pssp"
    ),
    staleness: Annotated[
        str, typer.Option(help="Staleness s in steps; a comma list sweeps.")
    ] = "4",
    sample: Annotated[
        str, typer.Option(help="β: peers per check, or a % of P; a list sweeps.")
    ] = "10",
    seed: Annotated[int, typer.Option(help="Run seed; the same seed gives the same result.")] = 1,
    step_time: Annotated[str, typer.Option(help="exponential, gamma, lognormal or constant.")] = (
        "exponential"
    ),
    mean_step: Annotated[float, typer.Option(help="Mean compute time per step, seconds.")] = 0.5,
    shape: Annotated[float, typer.Option(help="Gamma shape k, or lognormal sigma.")] = 2.0,
    stragglers: Annotated[float, typer.Option(help="Fraction of nodes that are slow.")] = 0.0,
    slowdown: Annotated[float, typer.Option(help="How many times slower a straggler is.")] = 4.0,
    delay: Annotated[
        float, typer.Option(help="Network delay of one barrier check, seconds.")
    ] = 0.0,
    hold_sample: Annotated[
        bool, typer.Option("--hold-sample/--fresh-sample", help="Keep one sample until it passes.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict/--non-strict", help="A lag of exactly s also blocks.")
    ] = False,
    poll: Annotated[
        float | None,
        typer.Option(help="Re-check a blocked node every POLL s (default: on any step change)."),
    ] = None,
    engine: Annotated[str, typer.Option(help="fast (analytic) or exact (draws every sample).")] = (
        "fast"
    ),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the CDF of steps reached as PNG.")
    ] = None,
) -> None:
    """Simulate barrier control (BSP, SSP, ASP, pBSP, pSSP) and report the steps nodes reach."""
    barriers = parse_barriers(barrier)
    base = SimConfig(
        nodes=nodes,
        duration_s=duration,
        seed=seed,
        step_time=StepTimeConfig(step_time, mean_step, shape),
        straggler_fraction=stragglers,
        straggler_slowdown=slowdown,
        check_delay_s=delay,
        hold_sample=hold_sample,
        strict=strict,
        poll_s=poll,
        engine=engine,
    )
    stalenesses = parse_int_list(staleness, "--staleness")
    configs = _configs(base, barriers, sample, stalenesses)
    check_writable(json_path, "--json")
    check_writable(plot, "--plot")
    runs: list[dict[str, JsonValue]] = []
    results = []
    with make_progress(console) as progress:
        overall = progress.add_task("runs", total=len(configs))
        for cfg in configs:
            current = progress.add_task(f"  {run_label(cfg)} (simulated s)", total=cfg.duration_s)
            started = time.perf_counter()

            def advance(at: float, task: TaskID = current) -> None:
                progress.update(task, completed=at)

            result = run_scenario(cfg, progress=advance)
            runs.append(sim_run_record(result, time.perf_counter() - started))
            results.append(result)
            progress.remove_task(current)
            progress.advance(overall)
    title = f"P = {nodes}, T = {duration:g} s, seed {seed}"
    console.print(simulate_table(runs, title=f"steps reached ({title})"))
    if json_path is not None:
        params = sim_params_record(
            base,
            barriers=barriers,
            samples=sample.split(","),
            stalenesses=stalenesses,
        )
        write_json(json_path, {"params": params, "runs": [*runs]})
        console.print(f"JSON: {json_path}")
    if plot is not None:
        from p2pml.report.plots import plot_step_cdf

        curves = [(run_label(r.config), r.steps) for r in results]
        plot_step_cdf(curves, plot, title=f"Steps reached, {title}")
        console.print(f"plot: {plot}")
