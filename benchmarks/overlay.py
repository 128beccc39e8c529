"""The hardened overlay against the stock kademlia package, measured in the same run.

Both start N nodes one after another in this process on their own loopback addresses, joining
through node 0. Then, for each: the join time per node; the population estimate N^ = (k-1)/u_k that
each gets from L = 16 random lookups (the same estimator on each one's lookup results, so a lookup
that misses nodes shows up as error); and, after stopping 10 % of the nodes, the latency of random
lookups. The stock package runs with its defaults (5 s RPC timeout, round-based crawl,
`find_neighbors` as shipped); p2pml with its own (0.5 s). Prints one table with the ratios:

    python benchmarks/overlay.py [--nodes 100] [--lookups 16] [--probe-nodes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from collections.abc import Sequence

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from rich.console import Console
from rich.table import Table

from p2pml.core.config import OverlayConfig
from p2pml.core.estimate import estimate_population
from p2pml.io.overlaybench import loopback_host, quantile, run_overlay_bench

K = 20


def _kth_distance(self_id: int, target: int, found: Sequence[int]) -> int | None:
    distances = sorted({self_id ^ target, *(f ^ target for f in found)})
    return distances[K - 1] if len(distances) >= K else None


async def _stock_lookup(server: Server, target: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    node = Node(target.to_bytes(20, "big"))
    nearest = server.protocol.router.find_neighbors(node, server.alpha)
    found = await NodeSpiderCrawl(server.protocol, node, nearest, server.ksize, server.alpha).find()
    return [n.long_id for n in found], time.perf_counter() - started


async def stock(n: int, lookups: int, probes: int, rng: random.Random) -> dict[str, float]:
    servers: list[Server] = []
    started = time.perf_counter()
    for i in range(n):
        server = Server(ksize=K)
        await server.listen(0, interface=loopback_host(i))
        if servers:
            seed = servers[0].transport.get_extra_info("sockname")
            await server.bootstrap([seed[:2]])
        servers.append(server)
    join = (time.perf_counter() - started) / n
    errors = []
    for server in rng.sample(servers, probes):
        distances, most = [], 0
        for _ in range(lookups):
            target = rng.getrandbits(160)
            found, _ = await _stock_lookup(server, target)
            distances.append(_kth_distance(server.node.long_id, target, found))
            most = max(most, len(found) + 1)
        known = [d for d in distances if d is not None]
        estimate = estimate_population(known, k=K) if known else None
        n_hat = estimate.n_hat if estimate is not None else float(most)
        errors.append(abs(n_hat - n) / n)
    dead = set(rng.sample(range(1, n), n // 10))
    for i in dead:
        servers[i].stop()
    live = [s for i, s in enumerate(servers) if i not in dead]
    probes_live = rng.sample(live, probes)
    timed = await asyncio.gather(*(_stock_lookup(s, rng.getrandbits(160)) for s in probes_live))
    for server in live:
        server.stop()
    latencies = [t for _, t in timed]
    return {
        "join": join,
        "median_err": statistics.median(errors),
        "p95_err": quantile(errors, 0.95),
        "dead_p50": statistics.median(latencies),
        "dead_p95": quantile(latencies, 0.95),
    }


async def ours(n: int, lookups: int) -> dict[str, float]:
    def quiet(stage: str, done: int, total: int) -> None:
        pass

    healthy, dead = [
        await run_overlay_bench(
            n_nodes=n,
            n_lookups=lookups,
            dead_fraction=fraction,
            n_draws=0,
            config=OverlayConfig(),
            seed=seed,
            progress=quiet,
        )
        for fraction, seed in ((0.0, 1), (0.1, 2))
    ]
    estimate = healthy["estimate"]
    assert isinstance(estimate, dict)
    return {
        "join": float(healthy["join_s_per_node"]),  # type: ignore[arg-type]
        "median_err": float(estimate["median_abs_error"]),
        "p95_err": float(estimate["p95_abs_error"]),
        "dead_p50": float(dead["lookup_p50_s"]),  # type: ignore[arg-type]
        "dead_p95": float(dead["lookup_p95_s"]),  # type: ignore[arg-type]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="p2pml overlay against stock kademlia")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=16)
    parser.add_argument("--probe-nodes", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # stock kademlia logs every timeout at ERROR
    console = Console(width=120)
    with console.status("stock kademlia ..."):
        base = asyncio.run(stock(args.nodes, args.lookups, args.probe_nodes, random.Random(7)))
    with console.status("p2pml ..."):
        mine = asyncio.run(ours(args.nodes, args.lookups))
    table = Table(title=f"{args.nodes} nodes in one process on loopback, L = {args.lookups}")
    for name in ("measure", "stock kademlia", "p2pml", "p2pml / stock", "target"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    rows = [
        ("join s per node", "join", "{:.4f}", "<= 0.1"),
        ("N^ median |error|", "median_err", "{:.1%}", "<= 6%"),
        ("N^ p95 |error|", "p95_err", "{:.1%}", "<= 15%"),
        ("lookup p50 s, 10 % dead", "dead_p50", "{:.3f}", ""),
        ("lookup p95 s, 10 % dead", "dead_p95", "{:.3f}", "<= 1.0 (2x RPC timeout)"),
    ]
    for label, key, fmt, target in rows:
        ratio = mine[key] / base[key] if base[key] else float("nan")
        table.add_row(label, fmt.format(base[key]), fmt.format(mine[key]), f"{ratio:.3g}", target)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
