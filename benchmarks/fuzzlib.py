"""The fuzzing engine shared by ``benchmarks/fuzz.py`` and ``tests/integration/test_fuzz.py``.

It makes hostile inputs for a live node and sends them (issue 8):

- `Mutator`: seeded byte-level mutations (bit flips, truncation, extension, splices) and
  msgpack-level ones (a field replaced by a huge or negative int, a bool, a float, a nested array,
  an oversized string, a map with int keys, an ext type; elements deleted, inserted or wrapped);
- `DatagramFuzzer`: random and mutated kademlia RPC datagrams to a node's DHT socket, from several
  source addresses at a paced rate, in bursts of one kind after each of which every receive queue
  must drain (so nothing overflows a socket buffer unseen, and the node's own rate limits are
  what drops the excess, counted); it answers the node's own requests with valid or mutated
  replies;
- `HttpFuzzer`: random and mutated bodies to each data-plane route over raw streams, with lying,
  missing or chunked lengths, wrong content types and bodies over the cap, concurrently on
  keep-alive connections; attacks on the frames' seal; and slow-loris connections. Mutated
  frames are sealed again with the honest sender's key (`Sealer`), so they reach the checks
  behind the seal.

Valid inputs come from the library at run time (frames captured from a node's own
`DataPlaneClient`, datagrams from `p2pml.protocol.dht`), so the engine follows format changes.
Every case i is drawn from its own ``random.Random(f"{seed}/{stream}/{i}")``. Nothing in
``p2pml/`` imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import random
import socket
import struct
import termios
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from p2pml.core.types import Address, Step
from p2pml.errors import P2PMLError, WireFormatError
from p2pml.protocol import dht
from p2pml.protocol.dht import NodeRecord, StepReport
from p2pml.protocol.identity import NodeKey

BURST: Final = 16
"""Datagrams sent before the sender waits for every receive queue (the node's, its own) to drain."""
DRAIN_TIMEOUT_S: Final = 10.0
_PREFIX: Final = struct.Struct("<4sI")
_ALIGN: Final = 64
_EDGE_INTS: Final = (2**64 - 1, 2**63, 2**62, 2**31, -(2**63), -(2**31), -1, 0, 1 << 40)
_RPC_NAMES: Final = ("stun", "ping", "find_neighbors", "_rpc_ping", "transport", "__init__")
_NAMES: Final = (
    *_RPC_NAMES,
    "store",
    "float128",
    "object",
    "complex64",
    "<f4",
    "float32",
    "int64",
    "",
)
_MAX_PENDING_IDS: Final = 4096
MAX_REPRODUCERS: Final = 50


def case_rng(seed: int, stream: str, index: int) -> random.Random:
    """The generator of case `index` of `stream`: the same for a seed whatever the concurrency."""
    return random.Random(f"{seed}/{stream}/{index}")


def pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# -- mutations ------------------------------------------------------------------------------------


class Mutator:
    """Seeded mutations of bytes and of decoded msgpack trees."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def hostile(self) -> object:
        """One value a schema must refuse somewhere: edge ints, wrong types, deep or long nests."""
        r = self.rng
        match r.randrange(14):
            case 0:
                return r.choice(_EDGE_INTS)
            case 1:
                return -r.randrange(1, 1 << 40)
            case 2:
                return r.choice((True, False))
            case 3:
                return None
            case 4:
                return r.choice((float("nan"), float("inf"), -float("inf"), -0.0, 1e308, 0.5))
            case 5:
                return "x" * r.choice((0, 1, 129, 300, 1025, 5000))
            case 6:
                return r.randbytes(r.choice((0, 19, 21, 32, 64, 1025)))
            case 7:
                nest: object = r.choice((0, [], "x"))
                for _ in range(r.randrange(1, 80)):
                    nest = [nest]
                return nest
            case 8:
                return [r.randrange(-5, 1 << 40) for _ in range(r.randrange(0, 40))]
            case 9:
                return r.choice(({"value": r.randbytes(8)}, {1: 2}, {"a": [1]}, {}))
            case 10:
                return msgpack.ExtType(r.randrange(128), r.randbytes(r.randrange(8)))
            case 11:
                return r.choice(_NAMES)
            case 12:
                return [r.choice((1 << 31, 1 << 40, -1, 0, 3, True)) for _ in range(r.randrange(9))]
            case _:
                return r.randrange(-10, 10)

    def mutate_tree(self, tree: object, n_edits: int = 1) -> object:
        """Edit `tree` (a decoded msgpack value, changed in place) `n_edits` times."""
        root: list[object] = [tree]
        r = self.rng
        for _ in range(n_edits):
            container, key = r.choice(list(_slots(root)))
            action = r.random()
            if isinstance(container, list) and container is not root and action < 0.15:
                del container[key]
            elif isinstance(container, list) and container is not root and action < 0.3:
                container.insert(key, self.hostile())
            elif action < 0.4:
                container[key] = [container[key]]
            else:
                container[key] = self.hostile()
        return root[0]

    def mutate_bytes(self, data: bytes, *, focus: int = 0) -> bytes:
        """Flip, truncate, extend, overwrite, delete, duplicate or insert bytes of `data`.

        Args:
            focus: when > 0, most edits land within the first `focus` bytes (a frame's header).
        """
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.choice((1, 1, 1, 2, 3, 8))):
            if not buf:
                buf += r.randbytes(r.randrange(1, 16))
                continue
            span = min(len(buf), focus) if focus and r.random() < 0.8 else len(buf)
            i = r.randrange(span)
            match r.randrange(7):
                case 0:
                    buf[i] ^= 1 << r.randrange(8)
                case 1:
                    del buf[i:]
                case 2:
                    buf += r.randbytes(r.randrange(1, 64))
                case 3:
                    buf[i] = r.choice((0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDF))
                case 4:
                    del buf[i : i + r.randrange(1, 16)]
                case 5:
                    buf[i:i] = buf[i : i + r.randrange(1, 64)]
                case _:
                    buf[i:i] = r.randbytes(r.randrange(1, 8))
        return bytes(buf)


Tree = list[Any] | dict[Any, Any]


def _slots(root: list[object]) -> Iterator[tuple[Tree, Any]]:
    """Every (container, key) in a tree of lists and maps, the root list included."""
    stack: list[Tree] = [root]
    while stack:
        container = stack.pop()
        keys = range(len(container)) if isinstance(container, list) else list(container)
        for key in keys:
            yield container, key
            child = container[key]
            if isinstance(child, list | dict):
                stack.append(child)


def pack(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


# -- frames ---------------------------------------------------------------------------------------


def split_frame(frame: bytes) -> tuple[bytes, object, bytes]:
    """A data-plane frame as (magic, decoded header, what follows the header's padding)."""
    magic, n_header = _PREFIX.unpack_from(frame)
    end = _PREFIX.size + n_header
    header = msgpack.unpackb(frame[_PREFIX.size : end], raw=False, strict_map_key=False)
    rest = frame[end:]
    padding = -end % _ALIGN
    if rest[:padding] == bytes(padding):
        rest = rest[padding:]
    return magic, header, rest


def join_frame(magic: bytes, header: object, rest: bytes) -> bytes:
    """The inverse of `split_frame`: repack the header and realign what follows."""
    packed = pack(header)
    end = _PREFIX.size + len(packed)
    padding = bytes(-end % _ALIGN) if rest else b""
    return _PREFIX.pack(magic, len(packed)) + packed + padding + rest


def mutate_table(header: list[object], rest: bytes, rng: random.Random) -> tuple[object, bytes]:
    """Targeted edits of a frame's tensor table: huge sizes, other dtypes, reshapes, NaN data."""
    table = header[3] if len(header) == 4 else None
    if not isinstance(table, list) or not table:
        return Mutator(rng).mutate_tree(header), rest
    entry = rng.choice(table)
    nbytes = entry[3]
    numel = nbytes // 4 if isinstance(nbytes, int) else 1
    match rng.randrange(6):
        case 0:  # a huge declared tensor, its byte count consistent with the shape
            entry[2] = [rng.choice((1 << 20, 1 << 31, 1 << 40))] * rng.randrange(1, 4)
            entry[3] = 4 * rng.choice((1 << 31, 1 << 40, 1 << 60))
        case 1:  # another dtype of the same item size, or of another size
            entry[1] = rng.choice(("int32", "float64", "float16", "uint8", "bfloat16", "O"))
        case 2:  # the same elements in another shape
            entry[2] = rng.choice(([numel], [1, numel], [numel, 1], [], [0]))
        case 3:  # nbytes lies
            entry[3] = rng.choice((0, nbytes + 4 if isinstance(nbytes, int) else 1, -4, True))
        case 4:  # NaN, infinities or signalling patterns in the payload
            pattern = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x01\x00\x80\xff"))
            rest = pattern * (len(rest) // 4) + rest[len(rest) // 4 * 4 :]
        case _:  # more tensors than the model has, or none
            header[3] = rng.choice((table * rng.randrange(2, 5), []))
    return header, rest


# -- datagrams ------------------------------------------------------------------------------------

DATAGRAM_KINDS: Final = {
    "random": 20,
    "bitflip": 20,
    "msgpack": 30,
    "unsolicited": 10,
    "kind": 5,
    "valid": 10,
    "oversize": 5,
}


def pending_bytes(fd: int) -> int:
    """The size of the next datagram waiting on a UDP socket (Linux SIOCINQ), 0 when none."""
    out = fcntl.ioctl(fd, termios.FIONREAD, b"\x00\x00\x00\x00")
    return int(struct.unpack("i", out)[0])


def udp_drops(addr: Address) -> int:
    """Datagrams the kernel dropped at a bound IPv4 UDP socket (/proc/net/udp), -1 if unknown."""
    ip = int.from_bytes(socket.inet_aton(addr.host), "little")
    local = f"{ip:08X}:{addr.port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[-1])
    return -1


class _Endpoint(asyncio.DatagramProtocol):
    """One source socket of a `DatagramFuzzer`."""

    def __init__(self, owner: DatagramFuzzer) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.received(self, data, addr)

    @property
    def addr(self) -> Address:
        assert self.transport is not None
        return Address(*self.transport.get_extra_info("sockname")[:2])

    @property
    def fd(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("socket").fileno())


class DatagramFuzzer:
    """Sends hostile datagrams to one node from several source addresses, at a paced rate, and
    answers the requests the node sends back (valid or mutated replies).

    `outcomes` counts, per kind, the datagrams the node answered and what its counters recorded
    during that kind's bursts; `sent` counts what went out (``dgram answer``: replies to the
    node's own requests).
    """

    def __init__(
        self, target: Address, target_fd: int, key: NodeKey, seed: int, *, rate_per_s: float
    ) -> None:
        self.target, self.target_fd, self.key, self.seed = target, target_fd, key, seed
        self.rate_per_s = rate_per_s
        self.endpoints: list[_Endpoint] = []
        self.sent: Counter[str] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.node_failures: list[str] = []
        self.reproducers: list[str] = []
        self._pending: OrderedDict[bytes, str] = OrderedDict()
        self._answer_rng = random.Random(f"{seed}/answers")

    async def open(self, hosts: list[str]) -> None:
        """Bind one source socket on each of `hosts` (the node limits rates per source IP)."""
        loop = asyncio.get_running_loop()
        for host in hosts:
            _, endpoint = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), local_addr=(host, 0)
            )
            self.endpoints.append(endpoint)

    def close(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()

    def drops(self) -> int:
        return sum(udp_drops(e.addr) for e in self.endpoints)

    def received(self, endpoint: _Endpoint, data: bytes, addr: tuple[str, int]) -> None:
        try:
            dg = dht.decode_datagram(data)
        except WireFormatError as err:  # the node itself sent something malformed
            self.node_failures.append(f"node sent a malformed datagram {data[:64].hex()}: {err}")
            return
        if dg.kind is dht.Kind.REPLY:
            kind = self._pending.pop(dg.msg_id, None)
            if kind is not None:
                self.outcomes[(f"dgram {kind}", "answered")] += 1
            return
        r = self._answer_rng
        name = dg.body[0] if isinstance(dg.body, list) and dg.body else "ping"
        body = self._reply_body(str(name), dg.msg_id, r)
        if r.random() < 0.4:
            body = Mutator(r).mutate_tree(body)
        reply = b"\x01" + dg.msg_id + pack(body)
        if r.random() < 0.1:
            reply = Mutator(r).mutate_bytes(reply)
        assert endpoint.transport is not None
        endpoint.transport.sendto(reply, addr)
        self.sent["dgram answer"] += 1

    def _reply_body(self, name: str, msg_id: bytes, r: random.Random) -> object:
        key = self.key
        if name in ("find_node", "find_value"):
            n = r.randrange(0, 30)
            return [
                [r.randbytes(20), f"127.0.9.{r.randrange(2, 250)}", r.randrange(1, 65536)]
                for _ in range(n)
            ]
        if name == "step":
            return dht.seal_signed(key, "step", msg_id, dht.encode_step(StepReport(Step(0))))
        if name == "info":
            record = NodeRecord(key.public_key, "peer", None, Step(0), time.time())
            return dht.seal_signed(key, "info", msg_id, dht.encode_record(record))
        return dht.seal_signed(key, "ping", msg_id, b"")

    # -- sending ---------------------------------------------------------------------------------
    async def run(
        self,
        n_datagrams: int,
        counters: Callable[[], Counter[str]],
        progress: Callable[[int], None],
    ) -> None:
        """Send `n_datagrams` in bursts of one kind at `rate_per_s`, each from the next source
        socket; the node's counter changes during a burst are attributed to its kind."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        for start in range(0, n_datagrams, BURST):
            kind = pick(case_rng(self.seed, "dgram-burst", start), DATAGRAM_KINDS)
            before = counters().copy()
            stop = min(n_datagrams, start + BURST)
            burst = [self.make(kind, i) for i in range(start, stop)]
            for i, data in enumerate(burst, start):
                self._send(i, kind, data)
            await self._drained()
            for reason, n in (counters() - before).items():
                self.outcomes[(f"dgram {kind}", reason)] += n
                if reason == "internal_error" and len(self.reproducers) < MAX_REPRODUCERS:
                    shown = " ".join(d.hex() for d in burst)
                    self.reproducers.append(
                        f"a DHT handler raised on one of datagrams {start}..{stop - 1} "
                        f"({kind}; see the ERROR log for the traceback): {shown}"
                    )
            progress(stop - start)
            ahead_s = started + stop / self.rate_per_s - loop.time()
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)  # pacing the send rate, not waiting for a state

    def _send(self, index: int, kind: str, data: bytes) -> None:
        if len(data) >= 21 and data[0] == 0:
            self._pending[data[1:21]] = kind
            while len(self._pending) > _MAX_PENDING_IDS:
                self._pending.popitem(last=False)
        transport = self.endpoints[index % len(self.endpoints)].transport
        assert transport is not None
        transport.sendto(data, (self.target.host, self.target.port))
        self.sent[f"dgram {kind}"] += 1

    async def _drained(self) -> None:
        """Wait until the node and every source socket have read what is queued for them."""
        fds = [self.target_fd, *(e.fd for e in self.endpoints)]
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while any(pending_bytes(fd) for fd in fds):  # noqa: ASYNC110
                await asyncio.sleep(0)
            await asyncio.sleep(0)

    def make(self, kind: str, index: int) -> bytes:
        """Datagram `index`, of `kind` (see `DATAGRAM_KINDS`)."""
        r = case_rng(self.seed, "dgram", index)
        m = Mutator(r)
        match kind:
            case "random":
                size = r.choice((r.randrange(0, 22), r.randrange(22, 300), r.randrange(300, 9000)))
                noise = bytearray(r.randbytes(size))
                if noise and r.random() < 0.5:
                    noise[0] = r.randrange(2)
                return bytes(noise)
            case "bitflip":
                return m.mutate_bytes(self._valid(r), focus=64)
            case "msgpack":
                data = self._valid(r)
                body = msgpack.unpackb(data[21:], raw=False, strict_map_key=False)
                body = m.mutate_tree(body, r.choice((1, 1, 2, 4)))
                with contextlib.suppress(ValueError, OverflowError):
                    return data[:21] + pack(body)
                return m.mutate_bytes(data)
            case "unsolicited":
                return dht.encode_reply(r.randbytes(20), self._reply_body("ping", b"", r))
            case "kind":
                data = self._valid(r)
                return bytes([r.choice((1 - data[0], 2, 0x7F, 0xFF))]) + data[1:]
            case "oversize":
                big = [self._sender(r), r.randbytes(20), r.randbytes(r.randrange(1025, 9000))]
                return b"\x00" + r.randbytes(20) + pack(["store", big])
            case _:
                return self._valid(r)

    def _sender(self, r: random.Random) -> bytes:
        return self.key.peer_id if r.random() < 0.7 else r.randbytes(20)

    def _valid(self, r: random.Random) -> bytes:
        """A valid request built by the library (or, one time in five, a reply)."""
        if r.random() < 0.2:
            body = self._reply_body(r.choice(("ping", "step", "find_node")), r.randbytes(20), r)
            return dht.encode_reply(r.randbytes(20), body)
        name = r.choice(("ping", "find_node", "find_value", "store", "info", "step"))
        args: list[object] = [self._sender(r)]
        if name != "ping" and name not in ("info", "step"):
            args.append(r.randbytes(20))
        if name == "store":
            args.append(r.randbytes(r.randrange(0, 1024)))
        return dht.encode_request(r.randbytes(20), name, args)


# -- capturing valid frames -----------------------------------------------------------------------


class Capture:
    """A one-shot HTTP server that records request bodies and refuses every request (503).

    Point a library call at `addr` to get the exact bytes the library sends:
    ``body = await capture.take(lambda addr: client.push_delta(addr, msg))``.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.bodies: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Capture:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def addr(self) -> Address:
        assert self._server is not None
        return Address(*self._server.sockets[0].getsockname()[:2])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.bodies.append(await reader.readexactly(length))
            body = b'{"error": "captured", "message": "captured by the fuzzer"}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
            await writer.drain()
        finally:
            writer.close()

    async def take(self, send: Callable[[Address], Awaitable[object]]) -> bytes:
        """The body `send(self.addr)` puts on the wire (its refusal is ignored)."""
        before = len(self.bodies)
        with contextlib.suppress(P2PMLError):
            await send(self.addr)
        if len(self.bodies) != before + 1:
            raise RuntimeError("the library call sent no request body to the capture server")
        return self.bodies[-1]


# -- HTTP bodies ----------------------------------------------------------------------------------

CONTENT_TYPE: Final = "application/x-p2pml"
BODY_KINDS: Final = {
    "random": 18,
    "bytes": 18,
    "header": 24,
    "table": 10,
    "semantic": 10,
    "cross": 5,
    "valid": 5,
    "http": 10,
    "seal": 6,
}
HTTP_VARIANTS: Final = (
    "cl_long",
    "cl_short",
    "huge_cl",
    "no_cl",
    "close_extra",
    "chunked",
    "ctype",
    "over_cap",
    "empty",
    "expect",
)
REPLY_TIMEOUT_S: Final = 20.0
N_SOURCE_HOSTS: Final = 32


@dataclass(frozen=True, slots=True)
class Route:
    """One data-plane route of one live node, and the corpus category of its valid bodies."""

    target: str
    method: str
    path: str
    category: str | None
    cap_bytes: int
    weight: int

    @property
    def name(self) -> str:
        return f"{self.target}{self.path}"


@dataclass(frozen=True, slots=True)
class HttpCase:
    """A whole request. `mode`: ``keep`` (well formed, on a keep-alive connection), ``half``
    (the write side is shut after it, so a lying length meets end of stream) or ``close``."""

    index: int
    label: str
    target: str
    request: bytes
    mode: str


@dataclass(frozen=True, slots=True)
class Reply:
    status: int  # 0: the connection ended without a reply
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.status == 0 or self.headers.get("connection", "").lower() == "close"


def build_request(
    route: Route,
    addr: Address,
    body: bytes,
    *,
    length: int | None = -1,
    content_type: str | None = CONTENT_TYPE,
    extra: str = "",
) -> bytes:
    """Request bytes; `length` -1 is the body's true length, None leaves Content-Length out."""
    lines = [f"{route.method} {route.path} HTTP/1.1", f"Host: {addr}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {len(body) if length == -1 else length}")
    head = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return head.encode() + body


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """The next final reply (1xx skipped), its body read by Content-Length."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return Reply(0, {}, b"")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue
        try:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except asyncio.IncompleteReadError as partial:
            body = partial.partial
        return Reply(status, headers, body)


def classify(reply: Reply, *, http_level: bool = False) -> tuple[str, str | None]:
    """(outcome label, why it is a failure or None). A 4xx or 503 must carry a JSON error,
    except aiohttp's own plain-text 400 for a request that is not valid HTTP (`http_level`)."""
    status = reply.status
    if status == 0:
        return "closed without reply", None
    if status < 400:
        return str(status), None
    if status < 500 or status == 503:
        try:
            doc = json.loads(reply.body)
            code = doc["error"]
            if not isinstance(code, str) or not isinstance(doc["message"], str):
                raise TypeError(code)
        except (ValueError, KeyError, TypeError):
            if http_level and status == 400:
                return "400 http parser (plain text)", None
            return f"{status} (no JSON error)", f"{status} without a JSON error body"
        return f"{status} {code}", None
    return str(status), f"server error {status}"


@dataclass(frozen=True, slots=True)
class Sealer:
    """What the engine knows of the frames' seal: a fixed-size trailer starting with `magic`,
    and `reseal`, which seals a frame's bytes as its honest sender would (so a mutated frame
    reaches the checks behind the seal: the fuzzer then plays an admitted but hostile peer)."""

    trailer_bytes: int
    magic: bytes
    reseal: Callable[[bytes], bytes]

    def split(self, frame: bytes) -> tuple[bytes, bytes]:
        """(the frame before its trailer, the trailer), or (frame, b"") when it has none."""
        n = self.trailer_bytes
        if len(frame) >= n and frame[-n:].startswith(self.magic):
            return frame[:-n], frame[-n:]
        return frame, b""


class HttpFuzzer:
    """Sends `n_bodies` hostile requests over raw streams, `concurrency` at a time.

    Args:
        targets: the data-plane address of each target name used by `routes`.
        valid, bad: frames the library produced, by route category: well-formed ones, and
            well-formed ones a node must refuse (NaN, another run, a wrong shape, ...).
    """

    def __init__(
        self,
        targets: dict[str, Address],
        routes: list[Route],
        valid: dict[str, list[bytes]],
        bad: dict[str, list[bytes]],
        seed: int,
        *,
        sealer: Sealer | None = None,
    ) -> None:
        self.targets, self.routes, self.seed, self.sealer = targets, routes, seed, sealer
        self.valid = {c: [self._unsealed(f) for f in fs] for c, fs in valid.items()}
        self.bad = {c: [self._unsealed(f) for f in fs] for c, fs in bad.items()}
        self.captured = [f for fs in valid.values() for f in fs]  # as sealed at capture
        self.sent: Counter[str] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.n_failures = 0
        self.reproducers: list[str] = []

    def _unsealed(self, frame: bytes) -> bytes:
        return frame if self.sealer is None else self.sealer.split(frame)[0]

    def _sealed(self, frame: bytes) -> bytes:
        return frame if self.sealer is None else self.sealer.reseal(frame)

    def make(self, index: int) -> HttpCase:
        """Request `index`: a route, a kind of body (`BODY_KINDS`) and the bytes."""
        r = case_rng(self.seed, "body", index)
        route = r.choices(self.routes, weights=[rt.weight for rt in self.routes])[0]
        addr = self.targets[route.target]
        if route.category is None:  # GET routes: sometimes with a body they must ignore
            body = r.randbytes(r.randrange(1, 64)) if r.random() < 0.3 else b""
            return HttpCase(
                index,
                f"{route.name} get",
                route.target,
                build_request(
                    route, addr, body, length=len(body) if body else None, content_type=None
                ),
                "keep",
            )
        kind = pick(r, BODY_KINDS)
        if kind == "http":
            return self._http_variant(index, route, addr, r)
        body = self._body(kind, route, r)
        if kind not in ("random", "seal"):
            body = self._sealed(body)
        return HttpCase(
            index, f"{route.name} {kind}", route.target, build_request(route, addr, body), "keep"
        )

    def _body(self, kind: str, route: Route, r: random.Random) -> bytes:
        assert route.category is not None
        m = Mutator(r)
        frame = r.choice(self.valid[route.category])
        match kind:
            case "random":
                size = r.choice((r.randrange(0, 64), r.randrange(64, 4096), r.randrange(1, 70_000)))
                body = r.randbytes(size)
                if r.random() < 0.3:
                    body = _PREFIX.pack(b"P2PM", r.choice((size, 1 << 20, 2**32 - 1))) + body
                return body
            case "bytes":
                return m.mutate_bytes(frame, focus=128)
            case "header" | "table":
                magic, header, rest = split_frame(frame)
                if kind == "header" or not isinstance(header, list):
                    header = m.mutate_tree(header, r.choice((1, 1, 2, 3)))
                else:
                    header, rest = mutate_table(header, rest, r)
                with contextlib.suppress(ValueError, OverflowError):
                    return join_frame(magic, header, rest)
                return m.mutate_bytes(frame, focus=128)
            case "semantic":
                return r.choice(self.bad.get(route.category) or [frame])
            case "seal":
                return self._seal_attack(frame, r)
            case "cross":
                others = [f for c, fs in self.valid.items() if c != route.category for f in fs]
                return r.choice(others + [f for fs in self.bad.values() for f in fs] or [frame])
            case _:
                return frame

    def _seal_attack(self, frame: bytes, r: random.Random) -> bytes:
        """A frame whose trailer is replayed, missing, cut, extended or tampered with."""
        if self.sealer is None:
            return Mutator(r).mutate_bytes(frame)
        sealed = self._sealed(frame)
        n = self.sealer.trailer_bytes
        match r.randrange(5):
            case 0:  # a frame captured earlier, sent again as it was
                return r.choice(self.captured)
            case 1:
                return frame
            case 2:
                return sealed[: -r.randrange(1, n)]
            case 3:
                return sealed + r.randbytes(r.randrange(1, 64))
            case _:
                return sealed[:-n] + Mutator(r).mutate_bytes(sealed[-n:])

    def _http_variant(self, index: int, route: Route, addr: Address, r: random.Random) -> HttpCase:
        variant = r.choice(HTTP_VARIANTS)
        assert route.category is not None
        body = self._sealed(r.choice(self.valid[route.category]))
        mode, ctype, extra = "keep", CONTENT_TYPE, ""
        length: int | None = -1
        match variant:
            case "cl_long":  # announces more than it sends, then ends the stream or stalls
                mode, length = r.choice(("half", "close")), len(body) + r.choice((1, 100, 65_536))
            case "cl_short":  # the rest of the body reads as the next request's garbage
                mode, length = "close", max(0, len(body) - r.randrange(1, 64))
            case "huge_cl":
                cap = route.cap_bytes
                mode, length = "close", r.choice((cap + 1, 1 << 40, 10**18))
                body = body[: r.randrange(0, 1000)]
            case "no_cl":  # with a body, that body reads as a next request (a parser error)
                mode, length, body = "close", None, r.choice((b"", body))
            case "chunked":
                chunks = b"%x\r\n%s\r\n" % (len(body), body) + b"0\r\n\r\n"
                mode, length, body = "close", None, chunks
                extra = "Transfer-Encoding: chunked\r\n"
            case "close_extra":  # bytes after a request that said it was the last one
                mode, extra = "close", "Connection: close\r\n"
                body += r.randbytes(r.randrange(1, 64))
                length = len(body) - r.randrange(1, 8) if len(body) > 8 else len(body)
            case "ctype":
                ctype = r.choice(("text/plain", "application/json", "multipart/form-data", ""))
            case "over_cap":
                mode = "close"
                if route.cap_bytes <= (1 << 20) or r.random() < 0.1:
                    body = body + bytes(route.cap_bytes + r.randrange(1, 4096) - len(body))
                else:
                    length = route.cap_bytes + 1
            case "empty":
                body = b""
            case _:  # "expect": the body follows at once, without waiting for 100 Continue
                extra = "Expect: 100-continue\r\n"
        request = build_request(route, addr, body, length=length, content_type=ctype, extra=extra)
        return HttpCase(index, f"{route.name} http:{variant}", route.target, request, mode)

    # -- sending ---------------------------------------------------------------------------------
    async def run(self, n_bodies: int, concurrency: int, progress: Callable[[int], None]) -> None:
        cases = iter(range(n_bodies))
        async with asyncio.TaskGroup() as tg:
            for w in range(concurrency):
                tg.create_task(self._worker(w, cases, progress))

    async def _worker(self, w: int, cases: Iterator[int], progress: Callable[[int], None]) -> None:
        conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            for index in cases:
                case = self.make(index)
                reply = await self._exchange(case, conns, w)
                self._record(case, reply)
                progress(1)
        finally:
            for _, writer in conns.values():
                writer.close()

    async def _open(self, target: str, w: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addr = self.targets[target]
        source = f"127.0.1.{2 + w % N_SOURCE_HOSTS}"  # spread TIME_WAIT over source addresses
        return await asyncio.open_connection(addr.host, addr.port, local_addr=(source, 0))

    async def _exchange(
        self,
        case: HttpCase,
        conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        w: int,
    ) -> Reply:
        conn = conns.pop(case.target, None) if case.mode == "keep" else None
        reused = conn is not None
        for _attempt in range(2):
            if conn is None:
                conn = await self._open(case.target, w)
            try:
                reply = await self._round_trip(conn, case)
            except BaseException:
                conn[1].close()
                raise
            if reply.status or not reused:
                break
            conn[1].close()  # the server had closed the idle keep-alive connection: retry once
            conn, reused = None, False
        assert conn is not None
        if case.mode == "keep" and not reply.closes:
            conns[case.target] = conn
        else:
            conn[1].close()
        return reply

    async def _round_trip(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], case: HttpCase
    ) -> Reply:
        reader, writer = conn
        try:
            writer.write(case.request)
            if case.mode == "half":
                writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass  # refused early and closed: its reply may already be in the read buffer
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            return await read_reply(reader)

    def _record(self, case: HttpCase, reply: Reply) -> None:
        outcome, failure = classify(reply, http_level=" http:" in case.label)
        self.sent[case.label] += 1
        self.outcomes[(case.label, outcome)] += 1
        if failure is None:
            return
        self.n_failures += 1
        if len(self.reproducers) < MAX_REPRODUCERS:
            shown = case.request[:2048].hex()
            self.reproducers.append(
                f"{failure}: case {case.index} {case.label} ({len(case.request)} bytes, "
                f"mode {case.mode}); reply {reply.status} {reply.body[:300]!r}; "
                f"request hex (first 2 KiB): {shown}"
            )

    # -- slow clients ----------------------------------------------------------------------------
    async def slow_client(self, route: Route, stage: str, trickle_s: float, limit_s: float) -> str:
        """One slow-loris connection trickling the headers (or the body) of a valid request a
        byte per `trickle_s`; returns how the server ended it, or raises TimeoutError if it
        still held the connection after `limit_s`."""
        assert route.category is not None
        addr = self.targets[route.target]
        request = build_request(route, addr, self._sealed(self.valid[route.category][0]))
        head_end = request.index(b"\r\n\r\n") + 4
        fast, slow = (
            (b"", request) if stage == "headers" else (request[:head_end], request[head_end:])
        )
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def trickle() -> None:
            writer.write(fast)
            for i in range(len(slow)):
                writer.write(slow[i : i + 1])
                await writer.drain()
                await asyncio.sleep(trickle_s)  # the attack's pace, not a wait for a condition

        try:
            async with asyncio.timeout(limit_s), asyncio.TaskGroup() as tg:
                sender = tg.create_task(trickle())
                reply = await read_reply(reader)
                sender.cancel()
        except* ConnectionError:
            reply = Reply(0, {}, b"")
        finally:
            writer.close()
        outcome = classify(reply)[0]
        return f"slow {stage} to {route.name}: {outcome} after {loop.time() - started:.1f} s"
