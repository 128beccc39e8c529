"""The DHT's datagrams: framing, schema checks of every RPC argument and reply, and signed replies.

The framing is rpcudp's (a kind byte, a 20-byte message id, a msgpack body), so the kademlia
package's protocol classes stay underneath; everything a peer sends is checked here before any
handler or routing table sees it. Bad input raises `WireFormatError` naming the field.

Signed replies (`ping`, `info`, `step`) carry ``[payload, public key, signature, proof]``; the
signature covers a domain tag, the RPC name, the requester's random message id (so a reply cannot be
replayed to another request) and the payload bytes. A reply proves that whoever answers at that
address holds the key whose hash is the node ID, so only such contacts enter a routing table. The
proof is the run-key HMAC over the same bytes (`Admission.proof`; zeros in runs without a key, so
every run has one format): in a closed run a reply whose key is not admitted is refused
(``not_admitted``), so a node outside the run's keys never enters a table, a sample or N^.

Must not import asyncio, sockets, threads, time, module-level random or torch.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Final

import msgpack

from p2pml.core.config import MAX_DATAGRAM_BYTES as DHT_DATAGRAM_BYTES
from p2pml.core.types import PEER_ID_BYTES, Address, PeerId, Step
from p2pml.errors import Refused, WireFormatError
from p2pml.protocol.auth import MAC_BYTES, Admission
from p2pml.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeKey,
    peer_id_of,
    verify_signature,
)

__all__ = [
    "MAX_CONTACTS",
    "MAX_DATAGRAM_BYTES",
    "MAX_RUN_TAG_CHARS",
    "MAX_VALUE_BYTES",
    "MSG_ID_BYTES",
    "ROLES",
    "Contact",
    "Datagram",
    "Kind",
    "NodeRecord",
    "StepReport",
    "check_record_time",
    "decode_contacts",
    "decode_datagram",
    "decode_record",
    "decode_request",
    "decode_step",
    "encode_contacts",
    "encode_record",
    "encode_reply",
    "encode_request",
    "encode_step",
    "ip_group",
    "limit_per_ip",
    "open_signed",
    "seal_signed",
]

MAX_DATAGRAM_BYTES: Final = DHT_DATAGRAM_BYTES
MSG_ID_BYTES: Final = 20
MAX_VALUE_BYTES: Final = 1024
MAX_CONTACTS: Final = 64
ROLES: Final = ("peer", "seed", "server", "worker")
_DOMAIN: Final = b"p2pml-dht-v1\x00"
_MAX_HOST_CHARS: Final = 64
MAX_RUN_TAG_CHARS: Final = 160
_RECORD_FIELDS: Final = ("key", "role", "http", "step", "ts", "run", "done")
_OPEN: Final = Admission()

# RPC name -> how many arguments after the sender's id, and their types.
_ARGS: Final[dict[str, tuple[type, ...]]] = {
    "ping": (),
    "find_node": (bytes,),
    "find_value": (bytes,),
    "store": (bytes, bytes),
    "info": (),
    "step": (),
}


class Kind(Enum):
    REQUEST = 0
    REPLY = 1


@dataclass(frozen=True, slots=True)
class Datagram:
    kind: Kind
    msg_id: bytes
    body: object


@dataclass(frozen=True, slots=True)
class Contact:
    """A node as the DHT knows it: its ID and the UDP address it answers on."""

    peer_id: PeerId
    addr: Address

    @property
    def long_id(self) -> int:
        return int.from_bytes(self.peer_id, "big")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node's signed self-description: the answer to an ``info`` RPC.

    Attributes:
        public_key: the raw Ed25519 key; the node ID is its hash.
        role: one of `ROLES`.
        http: the data-plane address, or None for a node without one (a seed).
        step: the node's current step.
        timestamp_s: the sender's wall clock (UNIX seconds) when it signed.
        run: the run tag (run ID and manifest hash) the node trains in, or "" for none.
        done: the node reached its last step and leaves; no barrier waits on it.
    """

    public_key: bytes
    role: str
    http: Address | None
    step: Step
    timestamp_s: float
    run: str = ""
    done: bool = False

    @property
    def peer_id(self) -> PeerId:
        return peer_id_of(self.public_key)


def _unpack(data: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except ValueError as exc:  # msgpack's decode errors are all ValueError subclasses
        raise WireFormatError(f"{what}: not msgpack ({exc})") from exc


def _pack(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def encode_request(msg_id: bytes, name: str, args: list[object]) -> bytes:
    """A request datagram; raises `WireFormatError` if it would exceed `MAX_DATAGRAM_BYTES`."""
    data = b"\x00" + msg_id + _pack([name, args])
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireFormatError(f"request {name}: {len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    return data


def encode_reply(msg_id: bytes, body: object) -> bytes:
    """A reply datagram; raises `WireFormatError` if it would exceed `MAX_DATAGRAM_BYTES`."""
    data = b"\x01" + msg_id + _pack(body)
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireFormatError(f"reply: {len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    return data


def decode_datagram(data: bytes) -> Datagram:
    """Split a datagram into kind, message id and decoded body (not yet schema-checked)."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise WireFormatError(f"datagram: {len(data)} bytes, over {MAX_DATAGRAM_BYTES}")
    if len(data) < 1 + MSG_ID_BYTES + 1:
        raise WireFormatError(f"datagram: {len(data)} bytes, shorter than a header")
    if data[0] not in (0, 1):
        raise WireFormatError(f"datagram kind: expected 0 or 1, received {data[0]}")
    return Datagram(Kind(data[0]), bytes(data[1 : 1 + MSG_ID_BYTES]), _unpack(data[21:], "body"))


def _peer_id(raw: object, field: str) -> PeerId:
    if not isinstance(raw, bytes) or len(raw) != PEER_ID_BYTES:
        raise WireFormatError(f"{field}: expected {PEER_ID_BYTES} bytes")
    return PeerId(raw)


def decode_request(body: object) -> tuple[str, PeerId, tuple[bytes, ...]]:
    """Check a request body ``[name, [sender_id, *args]]``; returns (name, sender id, args)."""
    if not isinstance(body, list) or len(body) != 2:
        raise WireFormatError("request: expected [name, args]")
    name, args = body
    if not isinstance(name, str) or name not in _ARGS:
        shown = name if isinstance(name, str) else type(name).__name__
        raise WireFormatError(f"request name: expected one of {sorted(_ARGS)}, received {shown!r}")
    types = _ARGS[name]
    if not isinstance(args, list) or len(args) != 1 + len(types):
        raise WireFormatError(f"{name}: expected {1 + len(types)} arguments")
    sender = _peer_id(args[0], f"{name} sender id")
    for i, (arg, kind) in enumerate(zip(args[1:], types, strict=True)):
        if type(arg) is not kind:
            raise WireFormatError(f"{name} argument {i + 1}: expected {kind.__name__}")
    if name in ("find_node", "find_value", "store"):
        _peer_id(args[1], f"{name} key")
    if name == "store" and len(args[2]) > MAX_VALUE_BYTES:
        raise WireFormatError(f"store value: {len(args[2])} bytes, over {MAX_VALUE_BYTES}")
    return name, sender, tuple(args[1:])


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    """A canonical IP literal with no IPv6 zone (``%eth0``): what a socket can send to as is."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return str(ip) == host and getattr(ip, "scope_id", None) is None


def _address(host: object, port: object, field: str) -> Address:
    if not isinstance(host, str) or len(host) > _MAX_HOST_CHARS:
        raise WireFormatError(f"{field} host: expected an IP address string")
    if not _is_ip(host):
        raise WireFormatError(f"{field} host: {host[:40]!r} is not a canonical IP address")
    if type(port) is not int or not 1 <= port <= 65535:
        raise WireFormatError(f"{field} port: expected an integer in 1-65535")
    return Address(host, port)


@functools.lru_cache(maxsize=8192)
def ip_group(host: str) -> str:
    """What the per-IP contact cap counts as one host: an IPv4 address, or an IPv6 /64.

    One IPv6 host easily holds a whole /64, so its addresses count together; an IPv4-mapped
    IPv6 address counts as its IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


def limit_per_ip(contacts: list[Contact], cap: int, *, exempt_host: str) -> list[Contact]:
    """`contacts` in order, keeping one ID per address and at most `cap` per `ip_group`.

    Contacts at `exempt_host` (the node's own IP: processes of its own machine) are not capped.
    """
    seen: dict[str, int] = {}
    addrs: set[Address] = set()
    out = []
    for c in contacts:
        if c.addr in addrs:
            continue
        if c.addr.host != exempt_host:
            group = ip_group(c.addr.host)
            if seen.get(group, 0) >= cap:
                continue
            seen[group] = seen.get(group, 0) + 1
        addrs.add(c.addr)
        out.append(c)
    return out


def encode_contacts(contacts: list[Contact]) -> list[list[object]]:
    return [[c.peer_id, c.addr.host, c.addr.port] for c in contacts]


def decode_contacts(body: object, *, limit: int) -> list[Contact]:
    """Check a ``find_node`` reply: at most `limit` ``[id, ip, port]`` triples."""
    if not isinstance(body, list):
        raise WireFormatError("contacts: expected a list")
    if len(body) > limit:
        raise WireFormatError(f"contacts: {len(body)} entries, over the limit of {limit}")
    out = []
    for i, item in enumerate(body):
        if not isinstance(item, list) or len(item) != 3:
            raise WireFormatError(f"contact {i}: expected [id, ip, port]")
        peer_id, host, port = item
        if type(peer_id) is not bytes or type(host) is not str or type(port) is not int:
            raise WireFormatError(f"contact {i}: expected [bytes id, str ip, int port]")
        try:
            out.append(_contact(peer_id, host, port))
        except WireFormatError as err:
            raise WireFormatError(f"contact {i}: {err}") from None
    return out


@functools.lru_cache(maxsize=8192)
def _contact(peer_id: bytes, host: str, port: int) -> Contact:
    # Peers repeat the same contacts in every reply: validating each distinct triple once keeps
    # lookups cheap. Callers check the exact types first (True == 1 would hit a cached 1). Failures
    # raise and are not cached.
    return Contact(_peer_id(peer_id, "id"), _address(host, port, "address"))


def _to_sign(name: str, msg_id: bytes, payload: bytes) -> bytes:
    return _DOMAIN + name.encode() + b"\x00" + msg_id + payload


def seal_signed(
    key: NodeKey, name: str, msg_id: bytes, payload: object, admission: Admission = _OPEN
) -> list[object]:
    """The body of a signed reply to request `msg_id`: ``[payload, public key, signature, proof]``.

    The proof is `admission`'s run-key HMAC over the signed bytes (zeros without a run key).
    """
    packed = _pack(payload)
    signed = _to_sign(name, msg_id, packed)
    proof = admission.proof(key.public_key, signed)
    return [packed, key.public_key, key.sign(signed), proof]


def open_signed(
    body: object,
    name: str,
    msg_id: bytes,
    expected: PeerId | None,
    admission: Admission = _OPEN,
) -> tuple[PeerId, object]:
    """Verify a signed reply; returns (the signer's node ID, the decoded payload).

    Args:
        expected: the node ID the requester believes it asked, or None when it asked an address
            whose ID it does not know yet (a bootstrap ping).
        admission: who may take part in the run; an open one admits every key.

    Raises:
        WireFormatError: naming what failed: the shape, the key, the ID binding or the signature.
        Refused: code ``not_admitted``, for a valid reply whose key the run does not admit.
    """
    if not isinstance(body, list) or len(body) != 4:
        raise WireFormatError(f"{name} reply: expected [payload, public key, signature, proof]")
    packed, public_key, signature, proof = body
    if not isinstance(packed, bytes) or not isinstance(public_key, bytes):
        raise WireFormatError(f"{name} reply: payload and key must be bytes")
    if len(public_key) != PUBLIC_KEY_BYTES or not isinstance(signature, bytes):
        raise WireFormatError(f"{name} reply: bad public key or signature type")
    if len(signature) != SIGNATURE_BYTES:
        raise WireFormatError(f"{name} reply: signature must be {SIGNATURE_BYTES} bytes")
    if not isinstance(proof, bytes) or len(proof) != MAC_BYTES:
        raise WireFormatError(f"{name} reply: the run-key proof must be {MAC_BYTES} bytes")
    signer = peer_id_of(public_key)
    if expected is not None and signer != expected:
        raise WireFormatError(
            f"{name} reply: key hashes to {signer.hex()[:16]}, not the ID asked "
            f"{expected.hex()[:16]} (forged or stale ID)"
        )
    signed = _to_sign(name, msg_id, packed)
    verify_signature(signer, public_key, signed, signature)
    if not admission.is_admitted(public_key, signed, proof):
        raise Refused(
            "not_admitted",
            f"{name} reply: key {public_key.hex()[:16]} is not admitted to this run "
            f"({admission.describe()})",
        )
    return signer, _unpack(packed, f"{name} payload")


def check_record_time(record: NodeRecord, *, now_unix_s: float, max_skew_s: float) -> None:
    """Refuse (``clock_skew``) a record signed more than `max_skew_s` from `now_unix_s`.

    Replies are fresh by their challenge already; this bounds how wrong a peer's clock (and so
    the timestamps on its deltas) may be before it is told so.
    """
    offset_s = record.timestamp_s - now_unix_s
    if abs(offset_s) > max_skew_s:
        raise Refused(
            "clock_skew",
            f"info record of {record.peer_id.hex()[:8]} stamped {offset_s:+.1f} s from this "
            f"node's clock; at most {max_skew_s:.0f} s is allowed",
        )


def encode_record(record: NodeRecord) -> dict[str, object]:
    return {
        "key": record.public_key,
        "role": record.role,
        "http": str(record.http) if record.http is not None else None,
        "step": int(record.step),
        "ts": float(record.timestamp_s),
        "run": record.run,
        "done": record.done,
    }


def decode_record(payload: object) -> NodeRecord:
    """Check an ``info`` payload (already signature-checked by `open_signed`)."""
    if not isinstance(payload, dict) or set(payload) != set(_RECORD_FIELDS):
        raise WireFormatError(f"info record: expected the fields {', '.join(_RECORD_FIELDS)}")
    key, role, http, step, ts, run, done = (payload[f] for f in _RECORD_FIELDS)
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
        raise WireFormatError("info record key: expected 32 bytes")
    if role not in ROLES:
        raise WireFormatError(f"info record role: expected one of {ROLES}, received {role!r}")
    addr = None
    if http is not None:
        if not isinstance(http, str) or len(http) > _MAX_HOST_CHARS + 8:
            raise WireFormatError("info record http: expected host:port")
        host, _, port = http.rpartition(":")
        number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else port
        addr = _address(host.strip("[]"), number, "info http")
    if type(step) is not int or step < 0:
        raise WireFormatError("info record step: expected an integer >= 0")
    if type(ts) is not float or not 0 <= ts < 1e11:
        raise WireFormatError("info record ts: expected UNIX seconds")
    if not isinstance(run, str) or len(run) > MAX_RUN_TAG_CHARS:
        raise WireFormatError(f"info record run: expected a string of <= {MAX_RUN_TAG_CHARS} chars")
    if type(done) is not bool:
        raise WireFormatError("info record done: expected true or false")
    return NodeRecord(key, role, addr, Step(step), ts, run, done)


@dataclass(frozen=True, slots=True)
class StepReport:
    """The answer to a ``step`` RPC: the node's current step, and whether it has finished."""

    step: Step
    done: bool = False


def encode_step(report: StepReport) -> list[object]:
    return [int(report.step), report.done]


def decode_step(payload: object) -> StepReport:
    """Check a ``step`` payload (already signature-checked by `open_signed`)."""
    if not isinstance(payload, list) or len(payload) != 2:
        raise WireFormatError("step reply: expected [step, done]")
    step, done = payload
    if type(step) is not int or step < 0:
        raise WireFormatError("step reply: expected a step that is an integer >= 0")
    if type(done) is not bool:
        raise WireFormatError("step reply: expected done to be true or false")
    return StepReport(Step(step), done)
