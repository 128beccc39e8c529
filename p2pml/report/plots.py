"""PNG plots: the CDF of steps reached (as in the PSP figures) and the convergence-bound curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from p2pml.core.bounds import BoundCurve

__all__ = ["plot_bounds", "plot_step_cdf"]


def plot_step_cdf(curves: Sequence[tuple[str, Sequence[int]]], path: Path, *, title: str) -> None:
    """Write a PNG with one CDF over nodes of the steps reached per labelled run."""
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "viridis")
    for i, (label, steps) in enumerate(curves):
        xs = np.sort(np.asarray(steps))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        color = colors(i) if len(curves) <= 10 else colors(i / max(len(curves) - 1, 1))
        ax.step(
            xs, ys, where="post", label=f"{label} (median {np.median(xs):g})", color=color, lw=1.8
        )
    ax.set_xlabel("steps reached at the end of the run")
    ax.set_ylabel("fraction of nodes (CDF)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bounds(curves: Sequence[BoundCurve], path: Path, *, staleness: int, length: int) -> None:
    """Write a PNG of the mean and second-moment bounds against a, per beta, minima marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    for i, curve in enumerate(curves):
        color = cmap(i / max(len(curves) - 1, 1))
        for ax, ys, best, arg in (
            (axes[0], curve.mean, curve.min_mean, curve.argmin_mean_a),
            (axes[1], curve.second, curve.min_second, curve.argmin_second_a),
        ):
            ax.plot(curve.a, ys, color=color, label=f"β={curve.beta} (min {best:.2f})")
            ax.plot([arg], [best], "o", color=color, ms=4)
    for ax, what in ((axes[0], "mean lag bound"), (axes[1], "second-moment bound")):
        ax.set_yscale("log")
        ax.set_xlabel("a = F(r)^β")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"PSP convergence bounds, r = {staleness}, T = {length}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
