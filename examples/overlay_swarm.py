"""A small DHT in one process: nodes join through a seed, estimate N and draw uniform peers.

    python examples/overlay_swarm.py [--nodes 30]

Each node gets its own loopback address (127.0.0.2, 127.0.0.3, ...). Prints one line per node:
its short ID, contacts, N^ (exact while the network is small) and a sample of three peers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from p2pml.core.config import OverlayConfig
from p2pml.core.types import Address
from p2pml.io.overlay import KademliaOverlay
from p2pml.protocol.identity import NodeKey


async def main(n_nodes: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[KademliaOverlay] = []
        for i in range(n_nodes):
            config = OverlayConfig(listen=Address(f"127.0.0.{2 + i}", 0), estimate_lookups=8)
            node = await stack.enter_async_context(KademliaOverlay(config, NodeKey.generate()))
            if nodes:
                await node.bootstrap([nodes[0].addr])  # node 0 is the seed
            nodes.append(node)
        print("node      contacts  N^      sample")
        for node in nodes:
            await node.refresh()  # what the background loop does every refresh interval
            estimate = node.estimate
            assert estimate is not None
            sample = " ".join(c.peer_id.hex()[:8] for c in node.sample_peers(3))
            shown = f"{estimate.n_hat:.0f}" if estimate.is_exact else f"{estimate.n_hat:.1f}"
            print(f"{node.short_id}  {len(node.contacts()):8d}  {shown:6s}  {sample}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=30, choices=range(2, 250), metavar="2-249")
    asyncio.run(main(parser.parse_args().nodes))
