"""The DHT datagram codec: framing, schema checks, contacts and signed replies."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.types import Address, PeerId, Step
from p2pml.errors import Refused, WireFormatError
from p2pml.protocol import dht
from p2pml.protocol.auth import Admission
from p2pml.protocol.dht import Contact, NodeRecord
from p2pml.protocol.identity import NodeKey

MSG_ID = b"m" * dht.MSG_ID_BYTES
SENDER = b"s" * 20


def _request(name: object, args: object) -> bytes:
    return b"\x00" + MSG_ID + msgpack.packb([name, args], use_bin_type=True)


def test_decode_datagram_round_trips_a_request():
    dg = dht.decode_datagram(dht.encode_request(MSG_ID, "find_node", [SENDER, b"k" * 20]))
    assert dg.kind is dht.Kind.REQUEST and dg.msg_id == MSG_ID
    assert dht.decode_request(dg.body) == ("find_node", PeerId(SENDER), (b"k" * 20,))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "shorter than a header"),
        (b"\x00" + MSG_ID, "shorter than a header"),
        (b"\x07" + MSG_ID + b"\x90", "kind"),
        (b"\x00" + MSG_ID + b"\xc1", "not msgpack"),
        (b"\x00" + MSG_ID + b"\x92\x01", "not msgpack"),  # truncated array
        (b"\x00" + MSG_ID + b"\xc4" + b"x" * 9000, "over 8192"),
    ],
)
def test_decode_datagram_rejects_bad_framing(data, field):
    with pytest.raises(WireFormatError, match=field):
        dht.decode_datagram(data)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("ping", "expected \\[name, args\\]"),
        (["evil", [SENDER]], "request name"),
        ([7, [SENDER]], "request name"),
        (["ping", [SENDER, 1]], "expected 1 arguments"),
        (["ping", [b"short"]], "sender id"),
        (["find_node", [SENDER, "key"]], "argument 1: expected bytes"),
        (["find_node", [SENDER, b"k" * 19]], "find_node key"),
        (["store", [SENDER, b"k" * 20, "text"]], "argument 2"),
        (["store", [SENDER, b"k" * 20, b"v" * 1025]], "over 1024"),
    ],
)
def test_decode_request_names_the_bad_field(body, field):
    with pytest.raises(WireFormatError, match=field):
        dht.decode_request(body)


def test_encode_request_refuses_more_than_a_datagram():
    with pytest.raises(WireFormatError, match="over 8192"):
        dht.encode_request(MSG_ID, "store", [SENDER, b"k" * 20, b"v" * 9000])


def test_decode_contacts_round_trips():
    contacts = [
        Contact(PeerId(bytes([i]) * 20), Address(f"127.0.0.{i + 2}", 4000 + i)) for i in range(5)
    ]
    assert dht.decode_contacts(dht.encode_contacts(contacts), limit=20) == contacts


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"a": 1}, "expected a list"),
        ([[SENDER, "127.0.0.1", 1]] * 21, "over the limit"),
        ([[SENDER, "127.0.0.1"]], "expected \\[id, ip, port\\]"),
        ([[SENDER, "localhost", 4000]], "not a canonical IP address"),
        ([[SENDER, "::1%\x00", 4000]], "not a canonical IP address"),  # a zone sendto rejects
        ([[SENDER, "fe80::1%eth0", 4000]], "not a canonical IP address"),
        (
            [[SENDER, "0:0:0:0:0:0:0:1", 4000]],
            "not a canonical IP address",
        ),  # replies come from ::1
        ([[SENDER, "127.000.0.1", 4000]], "not a canonical IP address"),
        ([[SENDER, "127.0.0.1", 0]], "port"),
        ([[SENDER, "127.0.0.1", 70000]], "port"),
        ([[SENDER, "127.0.0.1", True]], "int port"),
        ([[SENDER, "127.0.0.1", 1.0]], "int port"),
        ([[b"x", "127.0.0.1", 1]], "id"),
        ([[SENDER, ["127.0.0.1"], 1]], "str ip"),
    ],
)
def test_decode_contacts_rejects_bad_entries(body, field):
    with pytest.raises(WireFormatError, match=field):
        dht.decode_contacts(body, limit=20)


def test_signed_reply_opens_for_the_right_id_and_request():
    key = NodeKey.generate()
    body = dht.seal_signed(key, "step", MSG_ID, 42)
    assert dht.open_signed(body, "step", MSG_ID, key.peer_id) == (key.peer_id, 42)
    assert dht.open_signed(body, "step", MSG_ID, None)[0] == key.peer_id


def test_signed_reply_from_another_key_is_a_forged_id():
    body = dht.seal_signed(NodeKey.generate(), "ping", MSG_ID, b"")
    with pytest.raises(WireFormatError, match="forged or stale ID"):
        dht.open_signed(body, "ping", MSG_ID, NodeKey.generate().peer_id)


@pytest.mark.parametrize("change", ["payload", "msg_id", "name", "signature"])
def test_signed_reply_that_was_tampered_or_replayed_does_not_verify(change):
    key = NodeKey.generate()
    packed, public_key, signature, proof = dht.seal_signed(key, "step", MSG_ID, 1)
    name, msg_id = "step", MSG_ID
    if change == "payload":
        packed = msgpack.packb(2)
    elif change == "msg_id":
        msg_id = b"o" * 20  # the same reply offered to another request: a replay
    elif change == "name":
        name = "info"
    else:
        signature = bytes(64)
    with pytest.raises(WireFormatError, match="does not verify"):
        dht.open_signed([packed, public_key, signature, proof], name, msg_id, key.peer_id)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [b"", b"k" * 32],
        [b"", b"k" * 31, b"s" * 64, bytes(32)],
        [b"", b"k" * 32, b"s" * 63, bytes(32)],
        [b"", b"k" * 32, b"s" * 64, bytes(31)],
        [b"", b"k" * 32, b"s" * 64, None],
        [b"", b"k" * 32, b"s" * 64],  # the three-field form of before run-key proofs
        [1, 2, 3, 4],
    ],
)
def test_signed_reply_with_a_bad_shape_is_rejected(body):
    with pytest.raises(WireFormatError):
        dht.open_signed(body, "ping", MSG_ID, None)


RUN_KEY = Admission(run_key=Admission.derive_key(b"the run's secret, 16+ bytes"))
OTHER_RUN_KEY = Admission(run_key=Admission.derive_key(b"another run's secret, 16+"))


def test_signed_reply_carries_zeros_as_its_proof_in_an_open_run():
    body = dht.seal_signed(NodeKey.generate(), "ping", MSG_ID, b"")
    assert body[3] == bytes(32)


@pytest.mark.parametrize(
    ("sealed_with", "opened_with", "admitted"),
    [
        ("open", "open", True),
        ("run key", "open", True),  # an open run admits any key, whatever it proves
        ("run key", "run key", True),
        ("open", "run key", False),  # no proof
        ("other run key", "run key", False),  # a proof under another run's key
        ("open", "allowlist", True),
        ("open", "other allowlist", False),
        ("run key", "run key and allowlist", True),
        ("other run key", "run key and allowlist", False),
    ],
)
def test_signed_reply_is_admitted_only_by_the_runs_key_or_allowlist(
    sealed_with, opened_with, admitted
):
    key = NodeKey.generate()
    admissions = {
        "open": Admission(),
        "run key": RUN_KEY,
        "other run key": OTHER_RUN_KEY,
        "allowlist": Admission(allowed_keys=frozenset({key.public_key})),
        "other allowlist": Admission(allowed_keys=frozenset({NodeKey.generate().public_key})),
        "run key and allowlist": Admission(RUN_KEY.run_key, frozenset({key.public_key})),
    }
    body = dht.seal_signed(key, "info", MSG_ID, 5, admissions[sealed_with])
    if admitted:
        assert dht.open_signed(body, "info", MSG_ID, key.peer_id, admissions[opened_with])[1] == 5
    else:
        with pytest.raises(Refused, match="not admitted") as caught:
            dht.open_signed(body, "info", MSG_ID, key.peer_id, admissions[opened_with])
        assert caught.value.code == "not_admitted"


def test_run_key_proof_replayed_for_another_request_does_not_verify():
    key = NodeKey.generate()
    body = dht.seal_signed(key, "step", MSG_ID, 1, RUN_KEY)
    with pytest.raises(WireFormatError, match="does not verify"):
        dht.open_signed(body, "step", b"o" * 20, key.peer_id, RUN_KEY)


@pytest.mark.parametrize(("offset_s", "ok"), [(0.0, True), (119.0, True), (-119.0, True),
                                              (121.0, False), (-121.0, False)])  # fmt: skip
def test_record_stamped_too_far_from_this_clock_is_refused(offset_s, ok):
    record = NodeRecord(NodeKey.generate().public_key, "peer", None, Step(0), 1000.0 + offset_s)
    if ok:
        dht.check_record_time(record, now_unix_s=1000.0, max_skew_s=120.0)
    else:
        with pytest.raises(Refused, match="stamped") as caught:
            dht.check_record_time(record, now_unix_s=1000.0, max_skew_s=120.0)
        assert caught.value.code == "clock_skew"


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
    ],
)
def test_ip_group_is_the_address_or_the_ipv6_64(host, group):
    assert dht.ip_group(host) == group


def _c(i: int, host: str, port: int) -> Contact:
    return Contact(PeerId(bytes([i]) * 20), Address(host, port))


def test_limit_per_ip_keeps_the_first_few_per_host_and_one_id_per_address():
    contacts = [
        _c(1, "127.0.0.9", 1),
        _c(2, "127.0.0.9", 1),  # a second ID at the same address
        _c(3, "127.0.0.9", 2),
        _c(4, "127.0.0.5", 1),
        _c(5, "127.0.0.9", 3),  # over the cap of 2 for 127.0.0.9
        _c(6, "127.0.0.1", 1),  # the node's own host: exempt
        _c(7, "127.0.0.1", 2),
        _c(8, "127.0.0.1", 3),
    ]
    kept = dht.limit_per_ip(contacts, 2, exempt_host="127.0.0.1")
    assert [c.peer_id[0] for c in kept] == [1, 3, 4, 6, 7, 8]


def test_record_round_trips():
    key = NodeKey.generate()
    record = NodeRecord(key.public_key, "peer", Address("::1", 8080), Step(3), 1.7e9, "r@1", True)
    decoded = dht.decode_record(msgpack.unpackb(msgpack.packb(dht.encode_record(record))))
    assert decoded == record and decoded.peer_id == key.peer_id


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"role": "king"}, "role"),
        ({"step": -1}, "step"),
        ({"step": True}, "step"),
        ({"ts": 5}, "ts"),
        ({"http": "nohost"}, "http"),
        ({"http": "127.0.0.1:\u00b2"}, "http port"),  # isdigit() but not int()
        ({"http": "127.0.0.1:123456"}, "http port"),
        ({"key": b"short"}, "key"),
        ({"extra": 1}, "fields"),
        ({"run": 5}, "run"),
        ({"run": "r" * 161}, "run"),
        ({"done": 1}, "done"),
    ],
)
def test_record_with_a_bad_field_is_rejected(change, field):
    record = dht.encode_record(NodeRecord(b"k" * 32, "peer", None, Step(0), 1.0))
    with pytest.raises(WireFormatError, match=field):
        dht.decode_record({**record, **change})


def test_step_report_round_trips():
    report = dht.StepReport(Step(9), done=True)
    assert dht.decode_step(msgpack.unpackb(msgpack.packb(dht.encode_step(report)))) == report


@pytest.mark.parametrize(
    ("payload", "field"),
    [(7, r"\[step, done\]"), ([-1, False], "step"), ([True, False], "step"), ([3, 0], "done")],
)
def test_step_report_with_a_bad_field_is_rejected(payload, field):
    with pytest.raises(WireFormatError, match=field):
        dht.decode_step(payload)


@given(st.binary(max_size=300))
def test_decode_datagram_of_any_bytes_returns_or_raises_wire_format_error(data):
    try:
        dg = dht.decode_datagram(data)
    except WireFormatError:
        return
    with contextlib.suppress(WireFormatError):
        dht.decode_request(dg.body)
