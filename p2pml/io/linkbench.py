"""Measure a delta push between two processes on loopback against the machine's plain-socket limit.

The receiver process serves the p2pml data plane twice, with sealed frames (every node's: signed,
hashed while streaming, see `p2pml.protocol.auth`) and unsealed, and a baseline: an asyncio
`BufferedProtocol` that takes a length-prefixed payload straight into one preallocated buffer and
answers one byte. The sending process pushes the same bytes the three ways in interleaved rounds,
so machine noise hits all three. A command pipe lets the sender reset and read the receiver's peak
memory around the first push, which has to allocate its receive buffer (later pushes reuse it).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Final

import numpy as np

from p2pml.core.config import DataPlaneConfig
from p2pml.core.types import Address, PeerId
from p2pml.io.http import DataPlaneClient, DataPlaneServer, InfoValue
from p2pml.protocol.auth import Authenticator
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import (
    Ack,
    DeltaPush,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    TensorBlob,
)

__all__ = ["PushPair", "measure_pushes"]

_LENGTH: Final = struct.Struct("<Q")
_SENDER: Final = PeerId(b"\xbe" * 20)
_RECEIVER: Final = PeerId(b"\xef" * 20)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Sink:
    """The receiver's data-plane handler: acknowledge and drop."""

    def __init__(self, peer_id: PeerId) -> None:
        self.peer_id = peer_id

    async def on_delta(self, msg: DeltaPush) -> Ack:
        return Ack(msg.run_id, self.peer_id, msg.step)

    async def on_model_request(self, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        return ModelUnchanged(msg.run_id, self.peer_id, 0)

    def info(self) -> dict[str, InfoValue]:
        return {"role": "bench-receiver"}


class _BufferedSink(asyncio.BufferedProtocol):
    """The baseline receiver: length prefix and payload into one preallocated buffer, then b"1"."""

    def __init__(self, capacity_bytes: int) -> None:
        self._buffer = memoryview(bytearray(capacity_bytes + _LENGTH.size))
        self._filled = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack_from(self._buffer)
        if self._filled >= _LENGTH.size + length:
            self._filled = 0
            assert self._transport is not None
            self._transport.write(b"1")


def _serve_commands(conn: Connection) -> None:
    """Run in a thread of the receiver: reset and report its peak resident memory on request."""
    base_kib = 0
    while True:
        command = conn.recv()
        if command == "reset":
            base_kib = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")  # resets VmHWM, the peak resident size
            conn.send("ok")
        elif command == "peak":
            conn.send((_status_kib("VmHWM") - base_kib) * 1024)
        else:
            return


async def _receive(conn: Connection, capacity_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    config = DataPlaneConfig(max_message_bytes=capacity_bytes + (1 << 20))
    baseline = await loop.create_server(lambda: _BufferedSink(capacity_bytes), "127.0.0.1", 0)
    key = NodeKey.generate()
    async with (
        DataPlaneServer(config, _Sink(_RECEIVER)) as server,
        DataPlaneServer(config, _Sink(key.peer_id), auth=Authenticator(key)) as sealed,
        baseline,
    ):
        ports = (server.addr.port, sealed.addr.port, baseline.sockets[0].getsockname()[1])
        conn.send(ports)
        await asyncio.to_thread(_serve_commands, conn)


def _receiver_main(conn: Connection, capacity_bytes: int) -> None:
    asyncio.run(_receive(conn, capacity_bytes))


def _ask(conn: Connection, command: str | None, timeout_s: float) -> object:
    """Send `command` (if any) to the receiver and wait, bounded, for its answer (in a thread)."""
    if command is not None:
        conn.send(command)
    if not conn.poll(timeout_s):
        raise TimeoutError(f"the receiver process did not answer {command!r} in {timeout_s} s")
    return conn.recv()


@dataclass(frozen=True, slots=True)
class PushPair:
    """One interleaved round: seconds for the unsealed p2pml push, the baseline and the sealed
    push, same bytes."""

    push_s: float
    baseline_s: float
    sealed_s: float


async def _baseline_push(sock: socket.socket, payload: memoryview) -> float:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    await loop.sock_sendall(sock, _LENGTH.pack(payload.nbytes))
    await loop.sock_sendall(sock, payload)
    if await loop.sock_recv(sock, 1) != b"1":
        raise ConnectionError("baseline receiver did not acknowledge")
    return time.perf_counter() - started


async def _push(client: DataPlaneClient, addr: Address, msg: DeltaPush) -> float:
    started = time.perf_counter()
    ack = await client.push_delta(addr, msg)
    if ack.step != msg.step:
        raise ConnectionError(f"ack for step {ack.step}, expected {msg.step}")
    return time.perf_counter() - started


async def measure_pushes(size_bytes: int, n_pairs: int) -> tuple[list[PushPair], int]:
    """Push a float32 delta of `size_bytes` `n_pairs` times each way, interleaved.

    Returns the pairs and the receiver's peak resident-memory growth (bytes) during one push.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_main, args=(child, size_bytes), daemon=True)
    receiver.start()
    try:
        ports = await asyncio.to_thread(_ask, parent, None, 60.0)
        assert isinstance(ports, tuple)
        push_port, sealed_port, base_port = ports
        array = np.ones(size_bytes // 4, dtype=np.float32)
        addr = Address("127.0.0.1", push_port)
        config = DataPlaneConfig(max_message_bytes=size_bytes + (1 << 20))
        key = NodeKey.generate()
        with socket.create_connection(("127.0.0.1", base_port)) as sock:
            sock.setblocking(False)
            async with (
                DataPlaneClient(config) as client,
                DataPlaneClient(config, auth=Authenticator(key)) as sealing,
            ):
                peak = await _peak_growth(parent, client, addr, array)
                sealed = _Link(sealing, Address("127.0.0.1", sealed_port), key.peer_id)
                await _push(sealing, sealed.addr, _delta(array, 0, sealed.sender))  # warm up
                pairs = await _pairs(_Link(client, addr, _SENDER), sealed, sock, array, n_pairs)
        return pairs, peak
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            parent.send("stop")
        receiver.join(timeout=10)
        if receiver.is_alive():
            receiver.kill()


def _delta(array: np.ndarray, step: int, sender: PeerId = _SENDER) -> DeltaPush:
    return DeltaPush("bench", sender, step, 0, (TensorBlob.of("delta", array),))


@dataclass(frozen=True, slots=True)
class _Link:
    client: DataPlaneClient
    addr: Address
    sender: PeerId


async def _pairs(
    plain: _Link, sealed: _Link, sock: socket.socket, array: np.ndarray, n_pairs: int
) -> list[PushPair]:
    payload = array.data.cast("B")  # the same bytes the push carries, without the p2pml header
    await _baseline_push(sock, payload)  # warm up (the p2pml side was warmed by _peak_growth)
    pairs = []
    for i in range(n_pairs):
        times: dict[str, float] = {}
        order = ("push", "baseline", "sealed")
        for name in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
            if name == "baseline":
                times[name] = await _baseline_push(sock, payload)
            else:
                link = plain if name == "push" else sealed
                times[name] = await _push(link.client, link.addr, _delta(array, i + 1, link.sender))
        pairs.append(PushPair(times["push"], times["baseline"], times["sealed"]))
    return pairs


async def _peak_growth(
    parent: Connection, client: DataPlaneClient, addr: Address, array: np.ndarray
) -> int:
    await asyncio.to_thread(_ask, parent, "reset", 10.0)
    await _push(client, addr, _delta(array, 1))
    peak = await asyncio.to_thread(_ask, parent, "peak", 10.0)
    assert isinstance(peak, int)
    return max(peak, 0)
