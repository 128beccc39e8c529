"""The wire codec: msgpack headers beside raw tensor bytes. The only module that parses peer bytes.

A frame is::

    b"P2PM" | u32 LE header length | msgpack header | zero padding to 64 | tensor 0 | padding | ...

The header is the array ``[protocol version, message tag, [fields...], [[name, dtype, shape,
nbytes], ...]]``; each tensor starts at the next 64-byte boundary, and the frame ends where the last
tensor ends (or the header, if there is none). Encoding returns the header beside views of the
tensors' own memory (scatter-gather, no payload copy); `encode_contiguous` writes one buffer with a
single copy. Decoding validates the header against the caps and the schema, then returns arrays that
are views (``np.frombuffer``) over the caller's buffer: O(1) in the payload size.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack
import numpy as np
import numpy.typing as npt

from p2pml.core.types import PEER_ID_BYTES
from p2pml.errors import WireFormatError
from p2pml.protocol.messages import (
    DTYPES,
    NO_VERSION,
    Ack,
    BarrierRequest,
    DeltaPush,
    ErrorReply,
    Heartbeat,
    Message,
    MessageType,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    Register,
    ServerStatus,
    TensorBlob,
)

__all__ = [
    "ALIGN_BYTES",
    "MAGIC",
    "PREFIX_BYTES",
    "PROTOCOL_VERSION",
    "WireLimits",
    "decode_message",
    "encode_contiguous",
    "encode_frames",
    "frames_size",
    "read_prefix",
]

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"P2PM"
_PREFIX: Final = struct.Struct("<4sI")
PREFIX_BYTES: Final = _PREFIX.size
ALIGN_BYTES: Final = 64
_ZEROS: Final = memoryview(bytes(ALIGN_BYTES))
_MAX_RUN_ID_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Caps checked before any work is done on peer bytes.

    Attributes:
        max_message_bytes: a whole frame, tensors included.
        max_header_bytes: the msgpack header.
        max_tensors: tensors in one message.
        max_tensor_elements: elements in one tensor.
        max_ndim: dimensions of one tensor.
        max_name_chars: a tensor name.
        max_text_chars: free text, such as an error message.
    """

    max_message_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_tensor_elements: int = 1 << 31
    max_ndim: int = 8
    max_name_chars: int = 256
    max_text_chars: int = 1024


def _align(offset: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


# -- schemas: one row per message type ------------------------------------------------------------

Check = Callable[[object, str, WireLimits], object]


def _fail(field: str, expected: str, received: object) -> WireFormatError:
    shown = repr(received)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return WireFormatError(f"{field}: expected {expected}, received {shown}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run_id(value: object, field: str, limits: WireLimits) -> object:
    if not isinstance(value, str) or len(value) > _MAX_RUN_ID_CHARS:
        raise _fail(field, f"a string of at most {_MAX_RUN_ID_CHARS} characters", value)
    return value


def _text(value: object, field: str, limits: WireLimits) -> object:
    if not isinstance(value, str) or len(value) > limits.max_text_chars:
        raise _fail(field, f"a string of at most {limits.max_text_chars} characters", value)
    return value


def _peer(value: object, field: str, limits: WireLimits) -> object:
    if not isinstance(value, bytes) or len(value) != PEER_ID_BYTES:
        raise _fail(field, f"{PEER_ID_BYTES} bytes", value)
    return value


def _step(value: object, field: str, limits: WireLimits) -> object:
    if not _is_int(value) or not 0 <= value < 1 << 62:  # type: ignore[operator]
        raise _fail(field, "an integer >= 0", value)
    return value


def _version(value: object, field: str, limits: WireLimits) -> object:
    if not _is_int(value) or not NO_VERSION <= value < 1 << 62:  # type: ignore[operator]
        raise _fail(field, f"an integer >= {NO_VERSION}", value)
    return value


def _flag(value: object, field: str, limits: WireLimits) -> object:
    if not isinstance(value, bool):
        raise _fail(field, "true or false", value)
    return value


_SCHEMAS: Final[dict[MessageType, tuple[type[Message], tuple[tuple[str, Check], ...], bool]]] = {
    MessageType.DELTA: (
        DeltaPush,
        (("run_id", _run_id), ("sender", _peer), ("step", _step), ("base_version", _version)),
        True,
    ),
    MessageType.ACK: (Ack, (("run_id", _run_id), ("sender", _peer), ("step", _step)), False),
    MessageType.MODEL_REQUEST: (
        ModelRequest,
        (("run_id", _run_id), ("sender", _peer), ("have_version", _version)),
        False,
    ),
    MessageType.MODEL_REPLY: (
        ModelReply,
        (("run_id", _run_id), ("sender", _peer), ("version", _version), ("step", _step)),
        True,
    ),
    MessageType.MODEL_UNCHANGED: (
        ModelUnchanged,
        (("run_id", _run_id), ("sender", _peer), ("version", _version)),
        False,
    ),
    MessageType.ERROR: (ErrorReply, (("code", _text), ("message", _text)), False),
    MessageType.REGISTER: (
        Register,
        (("run_id", _run_id), ("sender", _peer), ("step", _step)),
        False,
    ),
    MessageType.HEARTBEAT: (
        Heartbeat,
        (("run_id", _run_id), ("sender", _peer), ("step", _step), ("done", _flag)),
        False,
    ),
    MessageType.BARRIER_REQUEST: (
        BarrierRequest,
        (("run_id", _run_id), ("sender", _peer), ("step", _step)),
        False,
    ),
    MessageType.SERVER_STATUS: (
        ServerStatus,
        (
            ("run_id", _run_id),
            ("sender", _peer),
            ("version", _version),
            ("step", _step),
            ("n_workers", _step),
            ("proceed", _flag),
        ),
        False,
    ),
}
_TAGS: Final = {cls: tag for tag, (cls, _fields, _tensors) in _SCHEMAS.items()}


# -- encoding --------------------------------------------------------------------------------------


def _header(msg: Message) -> tuple[bytes, Sequence[TensorBlob]]:
    tag = _TAGS[type(msg)]
    _cls, fields, has_tensors = _SCHEMAS[tag]
    tensors: Sequence[TensorBlob] = getattr(msg, "tensors", ()) if has_tensors else ()
    table = [[t.name, t.dtype_name, list(t.array.shape), t.nbytes] for t in tensors]
    values = [getattr(msg, name) for name, _check in fields]
    packed = msgpack.packb([PROTOCOL_VERSION, int(tag), values, table], use_bin_type=True)
    assert isinstance(packed, bytes)
    return _PREFIX.pack(MAGIC, len(packed)) + packed, tensors


def encode_frames(msg: Message) -> list[memoryview]:
    """Encode `msg` as buffers to send in order: the header, then views of each tensor's memory.

    No tensor byte is copied; the returned views keep the tensors alive.
    """
    head, tensors = _header(msg)
    frames = [memoryview(head)]
    end = len(head)
    for blob in tensors:
        start = _align(end)
        if start > end:
            frames.append(_ZEROS[: start - end])
        if blob.nbytes:
            frames.append(blob.array.data.cast("B"))
        end = start + blob.nbytes
    return frames


def frames_size(frames: Sequence[memoryview]) -> int:
    """The number of bytes `frames` hold together."""
    return sum(f.nbytes for f in frames)


def encode_contiguous(msg: Message) -> npt.NDArray[np.uint8]:
    """Encode `msg` into one new contiguous buffer, copying each tensor once."""
    frames = encode_frames(msg)
    out = np.empty(frames_size(frames), dtype=np.uint8)
    offset = 0
    for frame in frames:
        out[offset : offset + frame.nbytes] = np.frombuffer(frame, dtype=np.uint8)
        offset += frame.nbytes
    return out


# -- decoding --------------------------------------------------------------------------------------


def read_prefix(prefix: bytes | memoryview, limits: WireLimits) -> int:
    """Check a frame's first PREFIX_BYTES and return its header length.

    Raises:
        WireFormatError: for a wrong magic or a header over the cap.
    """
    if len(prefix) < PREFIX_BYTES:
        raise _fail("frame", f"at least {PREFIX_BYTES} bytes", f"{len(prefix)} bytes")
    magic, header_len = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise _fail("magic", repr(MAGIC), magic)
    if header_len > limits.max_header_bytes:
        raise _fail("header length", f"at most {limits.max_header_bytes} bytes", header_len)
    return int(header_len)


def _unpack_header(view: memoryview, limits: WireLimits) -> tuple[list[object], int]:
    """The decoded header array and the offset where it ends."""
    header_len = read_prefix(view[:PREFIX_BYTES], limits)
    if PREFIX_BYTES + header_len > len(view):
        raise _fail("header", f"{header_len} bytes", f"{len(view) - PREFIX_BYTES} bytes")
    try:
        header = msgpack.unpackb(
            view[PREFIX_BYTES : PREFIX_BYTES + header_len],
            raw=False,
            strict_map_key=True,
            max_str_len=max(limits.max_text_chars, limits.max_name_chars) * 4,
            max_bin_len=PEER_ID_BYTES,
            max_array_len=max(limits.max_tensors, 16),
            max_map_len=0,
            max_ext_len=0,
        )
    except ValueError as exc:  # every msgpack decode failure is a ValueError subclass
        raise WireFormatError(f"header: not valid msgpack ({exc})") from exc
    if not isinstance(header, list) or len(header) != 4:
        raise _fail("header", "an array of 4 items", header)
    return header, PREFIX_BYTES + header_len


def _tensor_entry(
    entry: object, i: int, limits: WireLimits
) -> tuple[str, np.dtype[np.generic], tuple[int, ...], int]:
    where = f"tensors[{i}]"
    if not isinstance(entry, list) or len(entry) != 4:
        raise _fail(where, "[name, dtype, shape, nbytes]", entry)
    name, dtype_name, shape, nbytes = entry
    if not isinstance(name, str) or len(name) > limits.max_name_chars:
        raise _fail(f"{where}.name", f"a string of at most {limits.max_name_chars} chars", name)
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(f"{where}.dtype", "one of " + ", ".join(DTYPES), dtype_name)
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(_is_int(d) and 0 <= d < 1 << 62 for d in shape)
    ):
        raise _fail(f"{where}.shape", f"at most {limits.max_ndim} integers >= 0", shape)
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise _fail(f"{where}.shape", f"at most {limits.max_tensor_elements} elements", numel)
    dtype = DTYPES[dtype_name]
    if not _is_int(nbytes) or nbytes != numel * dtype.itemsize:
        raise _fail(f"{where}.nbytes", f"{numel * dtype.itemsize} ({shape} x {dtype_name})", nbytes)
    return name, dtype, tuple(shape), numel


def decode_message(
    buf: bytes | bytearray | memoryview | npt.NDArray[np.uint8], limits: WireLimits | None = None
) -> Message:
    """Decode one frame; tensors are read-only or writable views over `buf`, never copies.

    Raises:
        WireFormatError: naming the field, the expected and the received value, for anything that
            is not exactly one valid frame within `limits`.
    """
    limits = limits or WireLimits()
    view = buf.data.cast("B") if isinstance(buf, np.ndarray) else memoryview(buf).cast("B")
    if len(view) > limits.max_message_bytes:
        raise _fail("message", f"at most {limits.max_message_bytes} bytes", f"{len(view)} bytes")
    header, end = _unpack_header(view, limits)
    version, tag_value, values, table = header
    if version != PROTOCOL_VERSION or not _is_int(version):
        raise _fail("protocol version", str(PROTOCOL_VERSION), version)
    if not _is_int(tag_value) or tag_value not in MessageType._value2member_map_:
        raise _fail(
            "message tag", "one of " + ", ".join(str(int(t)) for t in MessageType), tag_value
        )
    cls, fields, has_tensors = _SCHEMAS[MessageType(int(tag_value))]  # type: ignore[call-overload]
    if not isinstance(values, list) or len(values) != len(fields):
        raise _fail(f"{cls.__name__} fields", f"{len(fields)} values", values)
    kwargs = {
        name: check(v, f"{cls.__name__}.{name}", limits)
        for (name, check), v in zip(fields, values, strict=True)
    }
    if not isinstance(table, list) or (table and not has_tensors):
        raise _fail("tensors", "a list (empty for this message type)", table)
    if len(table) > limits.max_tensors:
        raise _fail("tensors", f"at most {limits.max_tensors} tensors", len(table))
    tensors = []
    for i, entry in enumerate(table):
        name, dtype, shape, numel = _tensor_entry(entry, i, limits)
        start = _align(end)
        end = start + numel * dtype.itemsize
        if end > len(view):
            raise _fail("body length", f"at least {end} bytes", f"{len(view)} bytes")
        array = np.frombuffer(view, dtype=dtype, count=numel, offset=start).reshape(shape)
        tensors.append(TensorBlob(name, array))
    if end != len(view):
        raise _fail("body length", f"{end} bytes as the header says", f"{len(view)} bytes")
    if has_tensors:
        kwargs["tensors"] = tuple(tensors)
    return cls(**kwargs)  # type: ignore[arg-type]
