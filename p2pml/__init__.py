"""p2pml: decentralised data-parallel training with probabilistic synchronous barriers.

Importing this package is cheap: it loads the pure core only (no torch, aiohttp or kademlia).
`EmbeddedNode`, `numpy_manifest` and `Admission` are imported on first use (the first brings in
the node, aiohttp and kademlia); they are not in `__all__`, so ``from p2pml import *`` stays cheap
and the names bound here stay exactly `__all__`.
"""

from __future__ import annotations

import importlib
import typing

from p2pml.core.barrier import (
    BARRIER_NAMES,
    BarrierParams,
    BarrierView,
    Decision,
    decide,
    get_policy,
    make_params,
)
from p2pml.core.config import SimConfig, StepTimeConfig
from p2pml.core.run import NodeConfig, RunManifest
from p2pml.core.sampling import SampleSize, pass_probability, sample_peers
from p2pml.core.types import Address, PeerId, PeerInfo, Step
from p2pml.errors import (
    BarrierTimeout,
    ConfigError,
    NodeStopped,
    OverlayError,
    P2PMLError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    Refused,
    TransportError,
    UnexpectedMessage,
    WireFormatError,
)

if typing.TYPE_CHECKING:
    from p2pml.node.arrays import numpy_manifest as numpy_manifest
    from p2pml.node.embed import EmbeddedNode as EmbeddedNode
    from p2pml.protocol.auth import Admission as Admission

__version__ = "0.1.0"

_LAZY: typing.Final = {
    "Admission": "p2pml.protocol.auth",
    "EmbeddedNode": "p2pml.node.embed",
    "numpy_manifest": "p2pml.node.arrays",
}

__all__ = [
    "BARRIER_NAMES",
    "Address",
    "BarrierParams",
    "BarrierTimeout",
    "BarrierView",
    "ConfigError",
    "Decision",
    "NodeConfig",
    "NodeStopped",
    "OverlayError",
    "P2PMLError",
    "PeerId",
    "PeerInfo",
    "PeerTimeout",
    "PeerUnreachable",
    "ProtocolError",
    "Refused",
    "RunManifest",
    "SampleSize",
    "SimConfig",
    "Step",
    "StepTimeConfig",
    "TransportError",
    "UnexpectedMessage",
    "WireFormatError",
    "__version__",
    "decide",
    "get_policy",
    "make_params",
    "pass_probability",
    "sample_peers",
]


def __getattr__(name: str) -> object:
    """The lazy names (PEP 562); not cached here, so the module's namespace stays `__all__`."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pml' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
