"""Plain-data (JSON-ready) records of simulator runs and bound curves."""

from __future__ import annotations

from dataclasses import asdict

from p2pml.core.barrier import get_policy
from p2pml.core.bounds import BoundCurve
from p2pml.core.config import SimConfig
from p2pml.sim.scenario import RunResult

__all__ = ["JsonValue", "bound_record", "run_label", "sim_params_record", "sim_run_record"]

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


def run_label(cfg: SimConfig) -> str:
    """A short name for a run, e.g. ``pssp β=10 s=4``."""
    spec = get_policy(cfg.barrier)
    parts = [cfg.barrier]
    if spec.sampled:
        parts.append(f"β={cfg.sample}")
    if spec.uses_staleness:
        parts.append(f"s={cfg.staleness}")
    return " ".join(parts)


def sim_run_record(result: RunResult, wall_s: float) -> dict[str, JsonValue]:
    """One entry of ``runs`` in ``p2pml simulate --json``; unused parameters are null."""
    cfg = result.config
    spec = get_policy(cfg.barrier)
    return {
        "barrier": cfg.barrier,
        "sample": cfg.sample if spec.sampled else None,
        "staleness": cfg.staleness if spec.uses_staleness else None,
        "nodes": cfg.nodes,
        "duration": cfg.duration_s,
        "seed": cfg.seed,
        "min": result.min,
        "median": result.median,
        "mean": round(result.mean, 6),
        "max": result.max,
        "spread": result.spread,
        "mean_wait_fraction": round(result.mean_wait_fraction, 6),
        "n_blocks": result.n_blocks,
        "stragglers": list(result.stragglers),
        "wall_s": round(wall_s, 4),
        "steps": list(result.steps),
    }


def sim_params_record(
    base: SimConfig, *, barriers: list[str], samples: list[str], stalenesses: list[int]
) -> dict[str, JsonValue]:
    """The ``params`` block of ``p2pml simulate --json``: everything needed to rerun it."""
    return {
        "nodes": base.nodes,
        "duration": base.duration_s,
        "barriers": list(barriers),
        "samples": list(samples),
        "stalenesses": list(stalenesses),
        "seed": base.seed,
        "step_time": dict(asdict(base.step_time)),
        "stragglers": base.straggler_fraction,
        "slowdown": base.straggler_slowdown,
        "delay": base.check_delay_s,
        "hold_sample": base.hold_sample,
        "strict": base.strict,
        "poll": base.poll_s,
        "engine": base.engine,
    }


def bound_record(curve: BoundCurve) -> dict[str, JsonValue]:
    """One entry of ``runs`` in ``p2pml bounds --json``."""
    return {
        "sample": curve.beta,
        "min_mean": round(curve.min_mean, 6),
        "argmin_mean_a": round(curve.argmin_mean_a, 6),
        "min_second": round(curve.min_second, 6),
        "argmin_second_a": round(curve.argmin_second_a, 6),
        "curve": [
            {"a": round(a, 6), "mean": round(m, 6), "second": round(s, 6)}
            for a, m, s in zip(curve.a, curve.mean, curve.second, strict=True)
        ],
    }
