from __future__ import annotations

import contextlib
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pml.errors import ConfigError, WireFormatError
from p2pml.protocol.messages import (
    DTYPES,
    NO_VERSION,
    Ack,
    BarrierRequest,
    DeltaPush,
    ErrorReply,
    Heartbeat,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    Register,
    ServerStatus,
    TensorBlob,
)
from p2pml.protocol.wire import (
    ALIGN_BYTES,
    MAGIC,
    PROTOCOL_VERSION,
    WireLimits,
    decode_message,
    encode_contiguous,
    encode_frames,
    frames_size,
)

PEER = b"\x07" * 20

peer_ids = st.binary(min_size=20, max_size=20)
steps = st.integers(0, 2**40)
versions = st.integers(NO_VERSION, 2**40)
run_ids = st.text(max_size=20)


@st.composite
def blobs(draw):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = draw(hnp.arrays(dtype, shape))
    return TensorBlob.of(draw(st.text(max_size=12)), array)


tensor_tuples = st.lists(blobs(), max_size=4).map(tuple)
messages = st.one_of(
    st.builds(DeltaPush, run_ids, peer_ids, steps, versions, tensor_tuples),
    st.builds(Ack, run_ids, peer_ids, steps),
    st.builds(ModelRequest, run_ids, peer_ids, versions),
    st.builds(ModelReply, run_ids, peer_ids, versions, steps, tensor_tuples),
    st.builds(ModelUnchanged, run_ids, peer_ids, versions),
    st.builds(ErrorReply, st.text(max_size=30), st.text(max_size=200)),
    st.builds(Register, run_ids, peer_ids, steps),
    st.builds(Heartbeat, run_ids, peer_ids, steps, st.booleans()),
    st.builds(BarrierRequest, run_ids, peer_ids, steps),
    st.builds(ServerStatus, run_ids, peer_ids, versions, steps, steps, st.booleans()),
)


def delta(*arrays: np.ndarray) -> DeltaPush:
    return DeltaPush(
        "run-1", PEER, 5, 4, tuple(TensorBlob.of(f"t{i}", a) for i, a in enumerate(arrays))
    )


def frame(header: object, body: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + struct.pack("<I", len(packed)) + packed + body


@given(messages)
def test_decode_of_encode_is_identity_for_every_message_type(msg):
    assert decode_message(encode_contiguous(msg)) == msg


@given(messages)
def test_scatter_gather_frames_join_to_the_contiguous_encoding(msg):
    joined = b"".join(bytes(f) for f in encode_frames(msg))
    assert joined == encode_contiguous(msg).tobytes()


@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_returns_a_message_or_raises_wire_format_error(data):
    with contextlib.suppress(WireFormatError):
        decode_message(data)


@given(messages, st.data())
def test_decoding_mutated_frames_returns_a_message_or_raises_wire_format_error(msg, data):
    raw = bytearray(encode_contiguous(msg).tobytes())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=16))
    with contextlib.suppress(WireFormatError):
        decode_message(bytes(raw))


@given(st.binary(min_size=8, max_size=2048))
def test_decoding_never_allocates_much_more_than_the_input(data):
    raw = MAGIC + struct.pack("<I", max(len(data) - 8, 0)) + data[8:]
    tracemalloc.start()
    with contextlib.suppress(WireFormatError):
        decode_message(raw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= 8 * len(raw) + 64 * 1024


def test_decoded_tensors_are_views_over_the_received_buffer():
    buf = encode_contiguous(delta(np.arange(1000, dtype=np.float32)))
    array = decode_message(buf).tensors[0].array
    assert not array.flags.owndata
    assert np.shares_memory(array, buf)


def test_encode_frames_share_the_tensor_memory():
    array = np.arange(1000, dtype=np.float64)
    frames = encode_frames(delta(array))
    assert any(np.shares_memory(np.frombuffer(f, dtype=np.uint8), array) for f in frames)
    assert frames_size(frames) == encode_contiguous(delta(array)).nbytes


def test_tensors_start_on_aligned_offsets():
    buf = encode_contiguous(
        delta(np.ones(3, np.float32), np.ones(5, np.int8), np.ones(2, np.float64))
    )
    base = buf.ctypes.data
    for blob in decode_message(buf).tensors:
        assert (blob.array.ctypes.data - base) % ALIGN_BYTES == 0


def test_tensor_blob_of_copies_non_contiguous_and_big_endian_arrays_once():
    blob = TensorBlob.of("w", np.arange(20, dtype=">f4").reshape(4, 5)[:, 1:3])
    assert blob.array.flags.c_contiguous
    assert blob.dtype_name == "float32"
    assert blob.array.tolist() == [[1, 2], [6, 7], [11, 12], [16, 17]]


@pytest.mark.parametrize("dtype", ["complex64", "bool", "object", "uint32"])
def test_tensor_blob_rejects_dtypes_off_the_allowlist(dtype):
    with pytest.raises(ConfigError, match="dtype"):
        TensorBlob.of("w", np.zeros(3, dtype=dtype))


GOOD = [PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32", [2], 8]]]


def good_body() -> bytes:
    head = frame(GOOD)
    pad = -len(head) % ALIGN_BYTES
    return bytes(pad) + b"\x00" * 8


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"", "frame"),
        (b"XXXX" + bytes(20), "magic"),
        (MAGIC + struct.pack("<I", 1 << 30), "header length"),
        (MAGIC + struct.pack("<I", 100) + b"\x93", "header"),
        (frame([PROTOCOL_VERSION, 1]), "header"),
        (frame([2, 1, [], []]), "protocol version"),
        (frame([True, 1, [], []]), "protocol version"),
        (frame([PROTOCOL_VERSION, 99, [], []]), "message tag"),
        (frame([PROTOCOL_VERSION, 2, ["run", PEER], []]), "Ack fields"),
        (frame([PROTOCOL_VERSION, 2, ["run", b"short", 1], []]), "Ack.sender"),
        (frame([PROTOCOL_VERSION, 2, ["run", PEER, -1], []]), "Ack.step"),
        (frame([PROTOCOL_VERSION, 2, ["run", PEER, True], []]), "Ack.step"),
        (frame([PROTOCOL_VERSION, 2, ["x" * 200, PEER, 1], []]), "Ack.run_id"),
        (frame([PROTOCOL_VERSION, 2, ["run", PEER, 1], [["w", "float32", [1], 4]]]), "tensors"),
        (frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "complex64", [1], 8]]]), "dtype"),
        (frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32", [2], 9]]]), "nbytes"),
        (frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32", [-2], -8]]]), "shape"),
        (
            frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32", [1] * 9, 4]]]),
            "shape",
        ),
        (
            frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32", [2**40], 2**42]]]),
            "shape",
        ),
        (frame([PROTOCOL_VERSION, 1, ["run", PEER, 1, 0], [["w", "float32"]]]), "tensors[0]"),
        (frame(GOOD), "body length"),
        (frame(GOOD) + good_body() + b"junk", "body length"),
        (frame([PROTOCOL_VERSION, 2, {"a": 1}, []]), "header"),
        (frame([PROTOCOL_VERSION, 2, ["run", PEER, msgpack.ExtType(1, b"x")], []]), "header"),
    ],
)
def test_malformed_frames_raise_one_wire_format_error_naming_the_field(raw, field):
    with pytest.raises(WireFormatError) as info:
        decode_message(raw)
    assert field in str(info.value)


def test_a_valid_hand_built_frame_decodes():
    msg = decode_message(frame(GOOD) + good_body())
    assert isinstance(msg, DeltaPush)
    assert msg.tensors[0].array.tolist() == [0.0, 0.0]


def test_caps_on_tensor_count_and_message_size_are_enforced():
    msg = delta(*[np.zeros(1, np.float32)] * 5)
    with pytest.raises(WireFormatError, match="at most 4 tensors"):
        decode_message(encode_contiguous(msg), WireLimits(max_tensors=4))
    with pytest.raises(WireFormatError, match="message: expected at most 100 bytes"):
        decode_message(encode_contiguous(msg), WireLimits(max_message_bytes=100))


def test_deeply_nested_headers_are_rejected_not_crashing():
    raw = MAGIC + struct.pack("<I", 10_000) + b"\x91" * 10_000
    with pytest.raises(WireFormatError):
        decode_message(raw)


def test_a_heartbeat_whose_done_flag_is_not_a_boolean_is_refused():
    good = encode_contiguous(Heartbeat("r", bytes(20), 3, True)).tobytes()
    header = msgpack.unpackb(good[8:], raw=False)
    header[2][3] = 1  # an int where a bool belongs
    with pytest.raises(WireFormatError, match=r"Heartbeat.done: expected true or false"):
        decode_message(frame(header))
