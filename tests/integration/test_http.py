"""The HTTP data plane on 127.0.0.1 with ephemeral ports: round trips, refusals, hostile clients."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import numpy as np
import pytest

from p2pml.core.config import DataPlaneConfig
from p2pml.core.types import Address, PeerId
from p2pml.errors import PeerRejected, PeerTimeout, PeerUnreachable, UnexpectedMessage
from p2pml.io.http import DataPlaneClient, DataPlaneServer
from p2pml.protocol.messages import (
    Ack,
    DeltaPush,
    ModelReply,
    ModelRequest,
    ModelUnchanged,
    TensorBlob,
)
from p2pml.protocol.wire import encode_contiguous

pytestmark = pytest.mark.integration

ME = PeerId(b"\x01" * 20)
PEER = PeerId(b"\x02" * 20)
FAST = DataPlaneConfig(idle_timeout_s=1.0, body_timeout_s=0.5, read_timeout_s=5.0)


def delta(step: int = 1, n: int = 1000) -> DeltaPush:
    weights = np.arange(n, dtype=np.float32) * step
    return DeltaPush("run", PEER, step, 0, (TensorBlob.of("w", weights),))


class Handler:
    def __init__(self) -> None:
        self.deltas: list[DeltaPush] = []
        self.arrived = asyncio.Event()
        self.version = 3
        self.model = (TensorBlob.of("w", np.ones((4, 5), np.float32)),)
        self.stall = False

    async def on_delta(self, msg: DeltaPush) -> Ack:
        if self.stall:
            await asyncio.Event().wait()
        if msg.run_id != "run":
            raise UnexpectedMessage(f"run_id: expected 'run', received {msg.run_id!r}")
        self.deltas.append(msg)
        self.arrived.set()
        return Ack("run", ME, msg.step)

    async def on_model_request(self, msg: ModelRequest) -> ModelReply | ModelUnchanged:
        if msg.have_version == self.version:
            return ModelUnchanged("run", ME, self.version)
        return ModelReply("run", ME, self.version, 7, self.model)

    def info(self) -> dict[str, str | int | float | bool | None]:
        return {"peer_id": ME.hex(), "step": 7}


@pytest.fixture
async def served():
    handler = Handler()
    async with DataPlaneServer(FAST, handler) as server, DataPlaneClient(FAST) as client:
        yield handler, server, client


async def raw_exchange(addr: Address, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes; return the reply's status line, headers and body (by its Content-Length),
    or what came before the server closed the connection."""
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as partial:
                return partial.partial
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            return head + await reader.readexactly(length)
    finally:
        writer.close()


async def test_server_binds_an_ephemeral_port_on_loopback(served):
    _, server, _ = served
    assert server.addr.host == "127.0.0.1"
    assert server.addr.port > 0


async def test_push_delta_round_trip_delivers_an_equal_message_and_an_ack(served):
    handler, server, client = served
    msg = delta(step=3)
    ack = await client.push_delta(server.addr, msg)
    assert ack == Ack("run", ME, 3)
    assert handler.deltas == [msg]


async def test_pull_model_sends_the_model_once_then_unchanged(served):
    handler, server, client = served
    reply = await client.pull_model(server.addr, ModelRequest("run", PEER, -1))
    assert isinstance(reply, ModelReply)
    assert reply.tensors == handler.model and reply.version == 3
    again = await client.pull_model(server.addr, ModelRequest("run", PEER, reply.version))
    assert again == ModelUnchanged("run", ME, 3)


async def test_info_returns_the_handler_document(served):
    _, server, client = served
    assert await client.info(server.addr) == {"status": "ok", "peer_id": ME.hex(), "step": 7}


async def test_handler_refusal_is_a_400_with_a_reason_and_is_counted(served):
    _, server, client = served
    with pytest.raises(PeerRejected) as info:
        await client.push_delta(server.addr, dataclasses.replace(delta(), run_id="other"))
    assert info.value.status == 400 and info.value.code == "refused"
    assert "run_id" in str(info.value)
    assert server.rejections["refused"] == 1


async def test_oversized_body_gets_413_and_the_server_keeps_serving():
    handler = Handler()
    small = dataclasses.replace(FAST, max_message_bytes=100_000)
    async with DataPlaneServer(small, handler) as server, DataPlaneClient(FAST) as client:
        with pytest.raises(PeerRejected) as info:
            await client.push_delta(server.addr, delta(n=1_000_000))
        assert info.value.status == 413
        assert server.rejections["too_large"] == 1
        assert await client.push_delta(server.addr, delta(n=100)) == Ack("run", ME, 1)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (encode_contiguous(Ack("run", PEER, 1)).tobytes(), b"expected DeltaPush"),
        (b"\x00garbage" * 10, b'"bad_frame"'),
        (encode_contiguous(delta())[:-100].tobytes(), b"body length"),
    ],
    ids=["wrong message type", "garbage frame", "frame shorter than its header says"],
)
async def test_bad_delta_bodies_get_400_with_a_reason(served, body, expected):
    _, server, _ = served
    head = (
        f"POST /v1/delta HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reply = await raw_exchange(server.addr, head + body)
    assert reply.startswith(b"HTTP/1.1 400")
    assert expected in reply


async def test_body_shorter_than_content_length_is_refused_and_the_server_keeps_serving(served):
    _, server, client = served
    head = b"POST /v1/delta HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    reader, writer = await asyncio.open_connection(server.addr.host, server.addr.port)
    writer.write(head + b"\x00" * 1000)
    writer.write_eof()  # the client stops sending: the body ends early
    async with asyncio.timeout(5):
        await server.wait_for_rejections("truncated")
        reply = await reader.read()
    writer.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    assert await client.push_delta(server.addr, delta()) == Ack("run", ME, 1)


async def test_missing_content_length_gets_411(served):
    _, server, _ = served
    head = (
        b"POST /v1/delta HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    reply = await raw_exchange(server.addr, head)
    assert reply.startswith(b"HTTP/1.1 411")


async def test_slow_body_gets_408_within_the_body_deadline(served):
    _, server, client = served
    head = b"POST /v1/delta HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    reply = await raw_exchange(server.addr, head + b"\x00" * 10, timeout_s=5.0)
    assert reply.startswith(b"HTTP/1.1 408")
    assert server.rejections["body_timeout"] == 1
    assert await client.push_delta(server.addr, delta()) == Ack("run", ME, 1)


async def test_slow_loris_headers_are_cut_off_after_the_idle_timeout(served):
    _, server, client = served
    reader, writer = await asyncio.open_connection(server.addr.host, server.addr.port)
    writer.write(b"POST /v1/delta HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(FAST.idle_timeout_s * 4):
        while True:  # trickle a header byte now and then, as a slow-loris client does
            writer.write(b"X")
            await writer.drain()
            try:
                async with asyncio.timeout(0.2):
                    if await reader.read(1) == b"":
                        break
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
    assert loop.time() - started >= FAST.idle_timeout_s * 0.9
    writer.close()
    assert await client.push_delta(server.addr, delta()) == Ack("run", ME, 1)


async def test_http_garbage_is_refused_and_the_server_keeps_serving(served):
    _, server, client = served
    reply = await raw_exchange(server.addr, bytes(range(256)) * 8)
    assert reply == b"" or reply.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert await client.push_delta(server.addr, delta()) == Ack("run", ME, 1)


async def test_concurrent_pushes_from_eight_clients_all_land(served):
    handler, server, _ = served
    clients = [DataPlaneClient(FAST) for _ in range(8)]
    for c in clients:
        await c.__aenter__()
    try:
        acks = await asyncio.gather(
            *(
                clients[i].push_delta(server.addr, delta(step=i * 10 + j, n=50_000))
                for i in range(8)
                for j in range(4)
            )
        )
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    assert sorted(a.step for a in acks) == sorted(i * 10 + j for i in range(8) for j in range(4))
    assert len(handler.deltas) == 32
    for msg in handler.deltas:
        assert np.array_equal(msg.tensors[0].array, np.arange(50_000, dtype=np.float32) * msg.step)


async def test_unreachable_peer_raises_peer_unreachable():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with DataPlaneClient(FAST) as client:
        with pytest.raises(PeerUnreachable):
            await client.push_delta(Address("127.0.0.1", port), delta())


async def test_silent_peer_raises_peer_timeout():
    handler = Handler()
    handler.stall = True
    async with (
        DataPlaneServer(FAST, handler) as server,
        DataPlaneClient(dataclasses.replace(FAST, read_timeout_s=0.3)) as client,
    ):
        with pytest.raises(PeerTimeout):
            await client.push_delta(server.addr, delta())


async def test_client_outside_its_context_says_how_to_use_it():
    client = DataPlaneClient(FAST)
    with pytest.raises(RuntimeError, match="async with"):
        await client.push_delta(Address("127.0.0.1", 1), delta())
