"""Measure the overlay in one process: join time, lookups, N^ error, draw uniformity and memory.

N nodes start one after another on their own loopback addresses (127.0.0.2, 127.0.0.3, ...), each
joining through node 0 and refreshing its buckets; an optional fraction is then stopped; every live
node runs one refresh (L random lookups, the estimate, the pool); finally `draws` exactly uniform
draws are made from live nodes in turn and tested for uniformity with Pearson's chi-square.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace

from p2pml.core.config import OverlayConfig
from p2pml.core.estimate import relative_error
from p2pml.core.types import Address, PeerId
from p2pml.core.uniformity import chi_square_p
from p2pml.io.overlay import KademliaOverlay
from p2pml.protocol.identity import NodeKey

__all__ = ["Progress", "loopback_host", "quantile", "run_overlay_bench"]

Progress = Callable[[str, int, int], None]
DRAW_CONCURRENCY = 8
BARRIER_CHECK_NODES = 50
POOL_DRAWS = 4  # the pool is checked for dead peers, not measured: keep its refresh short


def loopback_host(i: int) -> str:
    """The i-th distinct loopback address from 127.0.0.2 (the last octet stays in 2..254)."""
    return f"127.{(i // 253) // 256}.{(i // 253) % 256}.{2 + i % 253}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `values` (not interpolated: always one of the values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def _join_all(
    stack: AsyncExitStack, config: OverlayConfig, n: int, progress: Progress
) -> list[KademliaOverlay]:
    nodes: list[KademliaOverlay] = []
    for i in range(n):
        cfg = replace(config, listen=Address(loopback_host(i), 0))
        node = await stack.enter_async_context(KademliaOverlay(cfg, NodeKey.generate()))
        if nodes:
            await node.bootstrap([nodes[0].addr])
        nodes.append(node)
        progress("join", i + 1, n)
    return nodes


async def _draw(
    nodes: list[KademliaOverlay], n_draws: int, progress: Progress
) -> dict[str, object]:
    """Uniform draws from the nodes in turn; the chi-square p of the counts per peer."""
    counts: Counter[PeerId] = Counter()
    per_node: Counter[PeerId] = Counter()
    done = 0
    gate = asyncio.Semaphore(DRAW_CONCURRENCY)

    async def one(node: KademliaOverlay) -> None:
        nonlocal done
        async with gate:
            drawn = await node.draw_uniform()
        counts[drawn.peer_id] += 1
        per_node[node.peer_id] += 1
        done += 1
        if done % 100 == 0:
            progress("draw", done, n_draws)

    await asyncio.gather(*(one(nodes[i % len(nodes)]) for i in range(n_draws)))
    ids = [n.peer_id for n in nodes]
    live = set(ids)
    others = len(ids) - 1
    expected = [(n_draws - per_node[p]) / others for p in ids]
    observed = [float(counts[p]) for p in ids]
    return {
        "draws": n_draws,
        "chi2_p": chi_square_p(observed, expected),
        "counts": [[o, e] for o, e in zip(observed, expected, strict=True)],
        "draws_of_dead_nodes": float(sum(c for p, c in counts.items() if p not in live)),
    }


async def _barrier_checks(nodes: list[KademliaOverlay], rng: random.Random) -> list[float]:
    """Seconds per barrier check: 10 peers from the pool, their signed steps read in parallel."""
    times = []
    for node in nodes:
        peers = node.sample_peers(10, rng)
        started = time.perf_counter()
        await asyncio.gather(*(node.step_of(c) for c in peers), return_exceptions=True)
        times.append(time.perf_counter() - started)
    return times


async def run_overlay_bench(
    *,
    n_nodes: int,
    n_lookups: int,
    dead_fraction: float,
    n_draws: int,
    config: OverlayConfig,
    seed: int,
    progress: Progress,
) -> dict[str, object]:
    """Run the whole measurement; returns the JSON document of ``p2pml bench overlay``."""
    rng = random.Random(seed)
    config = replace(
        config,
        estimate_lookups=n_lookups,
        refresh_interval_s=3600.0,
        refresh_after_join=False,  # each node refreshes once, measured, after all have joined
        pool_draws=POOL_DRAWS,
    )
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        rss_before = _rss_bytes()
        t0 = time.perf_counter()
        nodes = await _join_all(stack, config, n_nodes, progress)
        join_s = (time.perf_counter() - t0) / n_nodes
        memory = (_rss_bytes() - rss_before) / n_nodes / (1 << 20)
        n_dead = round(dead_fraction * n_nodes)
        dead = set(rng.sample(range(1, n_nodes), min(n_dead, n_nodes - 2)))
        for i in sorted(dead):
            await nodes[i].__aexit__(None, None, None)
        live = [node for i, node in enumerate(nodes) if i not in dead]
        durations: list[float] = []
        errors: list[float] = []
        for i, node in enumerate(live):
            node.lookup_durations.clear()
            await node.refresh()
            durations.extend(node.lookup_durations)
            estimate = node.estimate
            assert estimate is not None, "refresh sets an estimate"
            errors.append((estimate.n_hat - len(live)) / len(live))
            progress("refresh", i + 1, len(live))
        checks = await _barrier_checks(live[:BARRIER_CHECK_NODES], rng)
        dead_ids = {nodes[i].peer_id for i in dead}
        dead_in_samples = sum(
            1 for node in live for c in node.sample_peers(10, rng) if c.peer_id in dead_ids
        )
        sampling = await _draw(live, n_draws, progress) if n_draws else {"draws": 0}
        sampling["dead_in_samples"] = dead_in_samples
        # zones with k or more members, accepted with probability 1 (a slight bias; should be rare)
        sampling["overflow_zones"] = sum(node.membership.n_overflow_zones for node in live)
        absolute = [abs(e) for e in errors]
    return {
        "nodes": n_nodes,
        "dead_fraction": dead_fraction,
        "lookups": n_lookups,
        "join_s_per_node": join_s,
        "lookup_p50_s": statistics.median(durations),
        "lookup_p95_s": quantile(durations, 0.95),
        "rpc_timeout_s": config.rpc_timeout_s,
        "barrier_check_p50_s": statistics.median(checks) if checks else None,
        "barrier_check_p95_s": quantile(checks, 0.95) if checks else None,
        "estimate": {
            "true_n": len(live),
            "median_abs_error": statistics.median(absolute),
            "p95_abs_error": quantile(absolute, 0.95),
            "rmse": math.sqrt(statistics.fmean(e * e for e in errors)),
            "mean_error": statistics.fmean(errors),
            "expected_rel_error": relative_error(n_lookups, config.k),
            "errors": errors,
        },
        "sampling": sampling,
        "memory_mib_per_node": memory,
        "wall_s": time.perf_counter() - started,
    }
