"""p2pml: decentralised data-parallel training with probabilistic synchronous barriers.

Importing this package is cheap: it loads the pure core only (no torch, aiohttp or kademlia).
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "BARRIER_NAMES",
    "Address",
    "BarrierParams",
    "BarrierTimeout",
    "BarrierView",
    "ConfigError",
    "Decision",
    "NodeConfig",
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
