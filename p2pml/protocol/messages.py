"""One frozen dataclass per wire message, and `TensorBlob`: a named tensor that never copies.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError

__all__ = [
    "DTYPES",
    "NO_VERSION",
    "Ack",
    "BarrierRequest",
    "DeltaPush",
    "ErrorReply",
    "Heartbeat",
    "Message",
    "MessageType",
    "ModelReply",
    "ModelRequest",
    "ModelUnchanged",
    "Register",
    "ServerStatus",
    "TensorBlob",
]

# Wire dtype names and their numpy dtypes; the wire is little-endian. numpy has no native bfloat16,
# so bfloat16 deltas are not carried (cast to float16 or float32 first).
DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_NAMES_BY_DTYPE: Final = {dtype: name for name, dtype in DTYPES.items()}

NO_VERSION: Final = -1
"""`ModelRequest.have_version` of a node that holds no model yet."""


class MessageType(enum.IntEnum):
    """The message tag, the second field of every header."""

    DELTA = 1
    ACK = 2
    MODEL_REQUEST = 3
    MODEL_REPLY = 4
    MODEL_UNCHANGED = 5
    ERROR = 6
    REGISTER = 7
    HEARTBEAT = 8
    BARRIER_REQUEST = 9
    SERVER_STATUS = 10


@dataclass(frozen=True, slots=True, eq=False)
class TensorBlob:
    """A named tensor: a C-contiguous numpy array whose memory is shared, never copied.

    Equality compares name, dtype, shape and bytes (NaNs with the same bits are equal).
    """

    name: str
    array: npt.NDArray[np.generic]

    @classmethod
    def of(cls, name: str, array: npt.ArrayLike) -> TensorBlob:
        """Wrap `array`; a non-contiguous or non-native array is copied once, here.

        Raises:
            ConfigError: if the dtype is not on the wire allowlist.
        """
        arr = np.asarray(array)
        wire = arr.dtype.newbyteorder("<")
        if wire not in _NAMES_BY_DTYPE:
            raise ConfigError(f"tensor {name!r} dtype", str(arr.dtype), ", ".join(DTYPES))
        if arr.dtype != wire or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=wire)
        return cls(name, arr)

    @property
    def dtype_name(self) -> str:
        return _NAMES_BY_DTYPE[self.array.dtype]

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorBlob):
            return NotImplemented
        a, b = self.array, other.array
        return (
            self.name == other.name
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class DeltaPush:
    """The change `sender` made to its parameters in step `step`, starting from `base_version`."""

    run_id: str
    sender: PeerId
    step: int
    base_version: int
    tensors: tuple[TensorBlob, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver validated and queued `sender`'s delta of step `step`."""

    run_id: str
    sender: PeerId
    step: int


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """Ask for the model; `have_version` (or NO_VERSION) avoids resending an unchanged one."""

    run_id: str
    sender: PeerId
    have_version: int


@dataclass(frozen=True, slots=True)
class ModelReply:
    """The model at `version`, after `step` steps."""

    run_id: str
    sender: PeerId
    version: int
    step: int
    tensors: tuple[TensorBlob, ...]


@dataclass(frozen=True, slots=True)
class ModelUnchanged:
    """The model is still at the `version` the requester already has."""

    run_id: str
    sender: PeerId
    version: int


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request was refused: a short machine-readable `code` and a human-readable `message`."""

    code: str
    message: str


# -- the centralised mode: a worker and its parameter server -------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """A worker joins the server's run, having completed `step` steps (0 for a fresh worker)."""

    run_id: str
    sender: PeerId
    step: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A worker is alive, has completed `step` steps, and has finished when `done`."""

    run_id: str
    sender: PeerId
    step: int
    done: bool


@dataclass(frozen=True, slots=True)
class BarrierRequest:
    """May the worker, having completed `step` steps, start the next? Answered when the server's
    barrier lets it, or when the server's long-poll window ends (then `proceed` is false)."""

    run_id: str
    sender: PeerId
    step: int


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """The server's answer to a worker: its model `version`, the `step` the worker should hold
    (its start step after a `Register`), the live workers, and whether the barrier let it go."""

    run_id: str
    sender: PeerId
    version: int
    step: int
    n_workers: int
    proceed: bool


Message = (
    DeltaPush
    | Ack
    | ModelRequest
    | ModelReply
    | ModelUnchanged
    | ErrorReply
    | Register
    | Heartbeat
    | BarrierRequest
    | ServerStatus
)
