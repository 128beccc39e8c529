"""PNG plots: the CDF of steps reached (as in the PSP figures) and the convergence-bound curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from p2pml.core.bounds import BoundCurve

__all__ = ["plot_bounds", "plot_overlay", "plot_step_cdf"]


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


def plot_overlay(
    errors: Sequence[float],
    counts: Sequence[tuple[int, float]],
    path: Path,
    *,
    expected_error: float,
    title: str,
) -> None:
    """Write a PNG of an overlay run: N^ errors per node, and uniform-draw counts per peer.

    Args:
        errors: per node, (N^ - N) / N.
        counts: per peer, (times drawn, times expected).
        expected_error: the estimator's expected relative error, drawn as a band.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    ax = axes[0]
    ax.hist(np.asarray(errors) * 100, bins=30, color="tab:blue", alpha=0.8)
    for sign in (-1, 1):
        ax.axvline(sign * expected_error * 100, color="tab:red", ls="--", lw=1)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("N^ error per node, % of true N (dashed: ±1/√(L(k−2)))")
    ax.set_ylabel("nodes")
    ax.grid(alpha=0.3)
    ax = axes[1]
    if counts:
        observed = np.asarray([c for c, _ in counts], dtype=float)
        expected = np.asarray([e for _, e in counts], dtype=float)
        order = np.argsort(observed / expected)
        ratio = (observed / expected)[order]
        band = 2 / np.sqrt(expected[order])
        xs = np.arange(len(ratio))
        ax.fill_between(xs, 1 - band, 1 + band, color="tab:green", alpha=0.2, label="±2σ (Poisson)")
        ax.plot(xs, ratio, ".", color="tab:blue", ms=3, label="drawn / expected")
        ax.axhline(1, color="black", lw=0.8)
        ax.legend(fontsize=8)
    ax.set_xlabel("peers, sorted by how often they were drawn")
    ax.set_ylabel("times drawn / times expected")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
