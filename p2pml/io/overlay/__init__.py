"""The overlay: the Kademlia DHT control plane (`KademliaOverlay`), built on the kademlia package.

`kad` holds the package's classes, subclassed and hardened (the only module that imports kademlia);
`endpoint` a node's socket, table and contact checks; `facade` the `KademliaOverlay` users hold.
"""

from __future__ import annotations

from p2pml.io.overlay.endpoint import DhtEndpoint
from p2pml.io.overlay.facade import KademliaOverlay, LookupResult, load_contacts, write_contacts
from p2pml.io.overlay.kad import TIMEOUT

__all__ = [
    "TIMEOUT",
    "DhtEndpoint",
    "KademliaOverlay",
    "LookupResult",
    "load_contacts",
    "write_contacts",
]
