"""Structured fuzzing of the decoders of peer bytes (issue 8): data-plane frames and DHT datagrams.

Any input either decodes or raises the documented error (`WireFormatError`, a `ProtocolError`),
never anything else. The byte-level properties live in test_wire.py and test_dht.py; these put
hostile msgpack values (edge integers, bools, floats, wrong types, deep or long nests, maps with
integer keys, ext types) where the schemas expect something else.
"""

from __future__ import annotations

import contextlib
import struct

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.types import Step
from p2pml.errors import ProtocolError, WireFormatError
from p2pml.protocol import dht
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    NO_VERSION,
    DeltaPush,
    Heartbeat,
    Message,
    ModelRequest,
    Register,
    TensorBlob,
)
from p2pml.protocol.wire import MAGIC, PROTOCOL_VERSION, decode_message, encode_contiguous

PEER = b"\x07" * 20
KEY = NodeKey.generate()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["float32", "float128", "object", "ping", "store", "__init__", ""]),
    st.binary(max_size=40),
    st.binary(min_size=20, max_size=20),
    st.binary(min_size=32, max_size=32),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.dictionaries(st.integers(-3, 3), inner, max_size=2),
    ),
    max_leaves=24,
)


def pack(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def valid_messages() -> list[Message]:
    tensors = (TensorBlob.of("w", np.arange(6, dtype=np.float32).reshape(2, 3)),)
    return [
        DeltaPush("run", PEER, 3, 2, tensors),
        ModelRequest("run", PEER, NO_VERSION),
        Register("run", PEER, 0),
        Heartbeat("run", PEER, 1, False),
    ]


def replace_at(tree: object, path: list[int], value: object) -> object:
    """`tree` with the node `path` leads to (through lists, as far as it goes) set to `value`."""
    if not path or not isinstance(tree, list) or not tree:
        return value
    i = path[0] % len(tree)
    return [replace_at(t, path[1:], value) if j == i else t for j, t in enumerate(tree)]


def decode_or_refuse(data: bytes) -> None:
    with contextlib.suppress(WireFormatError):
        decode_message(data)


@given(values, st.binary(max_size=256))
def test_decode_message_of_any_msgpack_header_returns_or_raises_wire_format_error(header, tail):
    packed = pack(header)
    decode_or_refuse(MAGIC + struct.pack("<I", len(packed)) + packed + tail)


@given(values, values, values, st.binary(max_size=128))
def test_decode_message_of_any_fields_behind_a_valid_version_returns_or_raises(
    tag, fields, table, tail
):
    packed = pack([PROTOCOL_VERSION, tag, fields, table])
    decode_or_refuse(MAGIC + struct.pack("<I", len(packed)) + packed + tail)


@given(st.sampled_from(valid_messages()), st.lists(st.integers(0, 7), max_size=4), values)
def test_decode_message_of_a_valid_frame_with_one_field_replaced_returns_or_raises(
    msg, path, value
):
    frame = encode_contiguous(msg).tobytes()
    (n_header,) = struct.unpack_from("<I", frame, 4)
    header = msgpack.unpackb(frame[8 : 8 + n_header], raw=False)
    packed = pack(replace_at(header, path, value))
    decode_or_refuse(MAGIC + struct.pack("<I", len(packed)) + packed + frame[8 + n_header :])


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.sampled_from(["float32", "int8"]))
def test_decode_message_refuses_huge_declared_tensors_without_allocating_them(rows, cols, dtype):
    itemsize = np.dtype(dtype).itemsize
    header = [PROTOCOL_VERSION, 1, ["run", PEER, 0, 0], [["w", dtype, [rows, cols], 0]]]
    header[3][0][3] = min(rows * cols * itemsize, 2**64 - 1)  # msgpack's largest integer
    packed = pack(header)
    decode_or_refuse(MAGIC + struct.pack("<I", len(packed)) + packed + bytes(64))


# -- DHT datagrams --------------------------------------------------------------------------------


def check_every_decoder(body: object, msg_id: bytes) -> None:
    """Run each DHT schema check a peer's value can reach; only a ProtocolError may come out
    (WireFormatError, or Refused from `open_signed` for a key the run does not admit)."""
    for check in (
        dht.decode_request,
        lambda b: dht.decode_contacts(b, limit=dht.MAX_CONTACTS),
        lambda b: dht.open_signed(b, "ping", msg_id, None),
        lambda b: dht.open_signed(b, "info", msg_id, KEY.peer_id),
        dht.decode_record,
        dht.decode_step,
    ):
        with contextlib.suppress(ProtocolError):
            check(body)


@given(st.binary(max_size=600))
def test_any_datagram_bytes_decode_through_every_check_or_raise_a_protocol_error(data):
    try:
        dg = dht.decode_datagram(data)
    except WireFormatError:
        return
    check_every_decoder(dg.body, dg.msg_id)


@given(st.sampled_from([0, 1]), st.binary(min_size=20, max_size=20), values)
def test_any_msgpack_datagram_body_passes_every_check_or_raises_a_protocol_error(
    kind, msg_id, body
):
    data = bytes([kind]) + msg_id + pack(body)
    with contextlib.suppress(ProtocolError):
        dg = dht.decode_datagram(data)
        check_every_decoder(dg.body, dg.msg_id)


@given(
    st.sampled_from(["ping", "find_node", "find_value", "store", "info", "step"]),
    st.lists(st.integers(0, 3), max_size=3),
    values,
)
def test_a_valid_request_with_one_argument_replaced_is_decoded_or_refused(name, path, value):
    args: list[object] = [PEER]
    if name in ("find_node", "find_value", "store"):
        args.append(b"k" * 20)
    if name == "store":
        args.append(b"value")
    body = replace_at([name, args], path, value)
    with contextlib.suppress(WireFormatError):
        dht.decode_request(msgpack.unpackb(pack(body), raw=False, strict_map_key=False))


@given(st.lists(st.integers(0, 3), max_size=3), values)
def test_a_signed_step_reply_with_one_field_replaced_is_opened_or_refused(path, value):
    msg_id = b"m" * dht.MSG_ID_BYTES
    body = dht.seal_signed(KEY, "step", msg_id, dht.encode_step(dht.StepReport(Step(3))))
    tampered = replace_at(body, path, value)
    with contextlib.suppress(ProtocolError):
        _, payload = dht.open_signed(tampered, "step", msg_id, KEY.peer_id)
        dht.decode_step(payload)
