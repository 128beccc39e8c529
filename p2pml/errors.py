"""The complete p2pml exception tree.

Callers only ever see these; third-party exceptions are mapped where their library is imported::

    P2PMLError
    ├── ConfigError (also ValueError)      bad local input: flags, config files, environment
    ├── ProtocolError                      bad peer input; the receiving machine stays usable
    │   ├── WireFormatError                bytes that do not decode to a valid message
    │   ├── UnexpectedMessage              a valid message that is wrong in the current state
    │   └── Refused                        a valid message this node will not take (another run,
    │                                      a wrong shape, NaN values, too stale); has a `code`
    ├── TransportError
    │   ├── PeerUnreachable                connection refused, reset or unroutable
    │   ├── PeerTimeout (also TimeoutError)
    │   └── PeerRejected                   the peer answered with an error status
    ├── OverlayError                       the DHT could not complete an operation
    ├── BarrierTimeout (also TimeoutError) a barrier wait ran out of time
    ├── NodeStopped                        an embedded node stopped before or during a call
    └── TrainingDiverged                   the loss became NaN or infinite
"""

from __future__ import annotations

__all__ = [
    "BarrierTimeout",
    "ConfigError",
    "NodeStopped",
    "OverlayError",
    "P2PMLError",
    "PeerRejected",
    "PeerTimeout",
    "PeerUnreachable",
    "ProtocolError",
    "Refused",
    "TrainingDiverged",
    "TransportError",
    "UnexpectedMessage",
    "WireFormatError",
]


class P2PMLError(Exception):
    """Base class of every error p2pml raises on purpose."""


class ConfigError(P2PMLError, ValueError):
    """Bad local input. The message names the field, the value received and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {value!r}; expected {allowed}")


class ProtocolError(P2PMLError):
    """Bad input from a peer."""


class WireFormatError(ProtocolError):
    """Bytes from a peer that do not decode to a valid message."""


class UnexpectedMessage(ProtocolError):
    """A well-formed message that the receiving machine cannot accept in its current state."""


class Refused(ProtocolError):
    """A well-formed message this node refuses; `code` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TransportError(P2PMLError):
    """A peer could not be reached or did not answer."""


class PeerUnreachable(TransportError):
    """The connection to a peer failed."""


class PeerTimeout(TransportError, TimeoutError):
    """A peer did not answer within the caller's deadline."""


class PeerRejected(TransportError):
    """The peer answered, but refused the request (an HTTP 4xx or 5xx with a reason)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        super().__init__(f"peer refused the request ({status} {code}): {message}")


class OverlayError(P2PMLError):
    """The DHT overlay could not complete an operation."""


class BarrierTimeout(P2PMLError, TimeoutError):
    """A barrier wait did not pass within its deadline."""


class NodeStopped(P2PMLError):
    """The embedded node was stopped, or its loop thread failed, before or during a call."""


class TrainingDiverged(P2PMLError):
    """The loss became NaN or infinite; the delta is not sent."""
