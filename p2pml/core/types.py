"""Identity and step types: `PeerId`, `Step`, `Address` (with a strict `parse`) and `PeerInfo`.

Must not import asyncio, sockets, time, module-level random, or anything outside the stdlib and
errors.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NewType

from p2pml.errors import ConfigError

__all__ = ["PEER_ID_BYTES", "Address", "PeerId", "PeerInfo", "Step", "make_peer_id", "make_step"]

PEER_ID_BYTES = 20

PeerId = NewType("PeerId", bytes)
"""A 160-bit Kademlia node id, exactly 20 bytes."""

Step = NewType("Step", int)
"""A logical step count: the number of training steps a node has completed (>= 0)."""


def make_peer_id(raw: object) -> PeerId:
    """Validate `raw` as a peer id.

    Raises:
        ConfigError: if `raw` is not exactly 20 bytes.
    """
    if not isinstance(raw, bytes) or len(raw) != PEER_ID_BYTES:
        shown = f"{len(raw)} bytes" if isinstance(raw, bytes) else type(raw).__name__
        raise ConfigError("peer_id", shown, f"exactly {PEER_ID_BYTES} bytes")
    return PeerId(raw)


def make_step(raw: object) -> Step:
    """Validate `raw` as a step: an int (not a bool) that is >= 0.

    Raises:
        ConfigError: otherwise.
    """
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ConfigError("step", raw, "an integer >= 0")
    return Step(raw)


@dataclass(frozen=True, slots=True)
class Address:
    """A host (an IP literal or a DNS name) and a port in 1-65535."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, field: str = "address") -> Address:
        """Parse ``host:port`` or ``[v6]:port``.

        Raises:
            ConfigError: naming `field`, when the text is not a valid address.
        """
        expected = "host:port or [ipv6]:port with a port in 1-65535"
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ConfigError(field, text, expected)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(field, text, expected) from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host or not _is_hostname(host):
                raise ConfigError(field, text, expected)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(field, text, expected)
        return cls(host, int(port_text))


def _is_hostname(host: str) -> bool:
    labels = host.split(".")
    return all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a node knows of a peer: its id, its data-plane address and its last reported step."""

    peer_id: PeerId
    addr: Address
    step: Step
