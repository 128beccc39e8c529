"""Helpers for tests that run real peer-mode nodes in one process, each on its own 127.0.0.x."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from p2pml.core.config import DataPlaneConfig, OverlayConfig
from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.types import Address
from p2pml.io.overlaybench import loopback_host
from p2pml.node.node import Node
from p2pml.protocol.auth import Admission
from p2pml.protocol.identity import NodeKey

FAST_OVERLAY = OverlayConfig(
    rpc_timeout_s=0.3, stall_s=0.05, refresh_interval_s=3600.0, refresh_after_join=False
)


def node_config(index: int, **changes: object) -> NodeConfig:
    """A NodeConfig on 127.0.0.(index + 2), both planes on ephemeral ports."""
    host = loopback_host(index)
    base = NodeConfig(
        overlay=dataclasses.replace(FAST_OVERLAY, listen=Address(host, 0)),
        data=DataPlaneConfig(listen=Address(host, 0)),
        discover_interval_s=0.2,
        linger_s=0.2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def cluster(
    n: int,
    manifest: RunManifest,
    *,
    first: int = 0,
    keys: Sequence[NodeKey] | None = None,
    admission: Admission | None = None,
    **changes: object,
) -> AsyncIterator[list[Node]]:
    """n nodes of one run joined through node 0, each knowing all others; closed in reverse.

    `keys` gives the nodes their keys (for an allowlist), `admission` closes the run."""
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(n):
            boot = (nodes[0].overlay.addr,) if nodes else ()
            config = node_config(first + i, bootstrap=boot, **changes)
            key = keys[i] if keys is not None else None
            node = Node(config, manifest, key=key, admission=admission)
            nodes.append(await stack.enter_async_context(node))
        for node in nodes:
            await node.wait_for_peers(n - 1, timeout_s=10)
        yield nodes
