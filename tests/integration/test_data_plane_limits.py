"""Data-plane limits on 127.0.0.1: per-peer request and byte rates, requests in progress, and the
seal on a real server and client; excess is refused with a reason and counted, never queued."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np
import pytest
from test_http import FAST, PEER, Handler, delta

from p2pml.core.limits import RateLimit
from p2pml.core.types import Address
from p2pml.errors import PeerRejected, WireFormatError
from p2pml.io.http import DataPlaneClient, DataPlaneServer
from p2pml.protocol.auth import Authenticator
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import Ack, DeltaPush, TensorBlob

pytestmark = pytest.mark.integration

SERVED = dataclasses.replace(FAST, listen=Address("127.0.0.2", 0))
"""The server on 127.0.0.2 and clients from 127.0.0.3: requests from a node's own address are
exempt from per-peer limits."""


def client(config=FAST) -> DataPlaneClient:
    return DataPlaneClient(config, bind_host="127.0.0.3")


async def test_requests_over_a_peers_rate_are_refused_429_and_counted():
    config = dataclasses.replace(SERVED, peer_limit=RateLimit(requests_per_s=0.01, request_burst=3))
    handler = Handler()
    async with DataPlaneServer(config, handler) as server, client() as peer:
        for step in range(3):
            await peer.push_delta(server.addr, delta(step))
        with pytest.raises(PeerRejected) as refused:
            await peer.push_delta(server.addr, delta(9))
        assert (refused.value.status, refused.value.code) == (429, "rate_limited")
        assert server.rejections["rate_limited"] == 1
        assert [m.step for m in handler.deltas] == [0, 1, 2]


async def test_bytes_over_a_peers_rate_are_refused_before_the_body_is_read():
    limit = RateLimit(requests_per_s=100, request_burst=100, bytes_per_s=1.0, byte_burst=12_000)
    config = dataclasses.replace(
        SERVED, peer_limit=limit, max_message_bytes=12_000, max_control_bytes=4096
    )
    handler = Handler()
    async with DataPlaneServer(config, handler) as server, client() as peer:
        await peer.push_delta(server.addr, delta(1, n=2000))  # about 8 KB of the 12 KB burst
        with pytest.raises(PeerRejected) as refused:
            await peer.push_delta(server.addr, delta(2, n=2000))
        assert refused.value.code == "rate_limited"
        assert "bytes/s" in str(refused.value)
        assert len(handler.deltas) == 1


class StallingHandler(Handler):
    """Every delta hangs in the handler; `entered` is set once `n` are inside."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inside, self.n, self.entered = 0, n, asyncio.Event()

    async def on_delta(self, msg: DeltaPush) -> Ack:
        self.inside += 1
        if self.inside >= self.n:
            self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_requests_in_progress_are_capped_per_peer_with_503_busy():
    config = dataclasses.replace(SERVED, max_requests_per_peer=2, read_timeout_s=5.0)
    handler = StallingHandler(2)
    async with (
        DataPlaneServer(config, handler) as server,
        client() as peer,
        DataPlaneClient(FAST, bind_host="127.0.0.2") as own,
    ):
        hanging = [asyncio.create_task(peer.push_delta(server.addr, delta(i))) for i in (1, 2)]
        hanging.append(asyncio.create_task(own.push_delta(server.addr, delta(4))))
        handler.n = 3  # the server's own address is not held to the per-peer cap
        try:
            async with asyncio.timeout(5):
                await handler.entered.wait()
            with pytest.raises(PeerRejected) as refused:
                await peer.push_delta(server.addr, delta(3))
            assert (refused.value.status, refused.value.code) == (503, "busy")
            assert server.rejections["busy"] == 1
            assert handler.inside == 3  # the third from 127.0.0.3 never reached the handler
        finally:
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)


class SealedHandler(Handler):
    """Acknowledges as the receiver's own key, which seals its replies."""

    def __init__(self, peer_id) -> None:
        super().__init__()
        self.peer_id = peer_id

    async def on_delta(self, msg: DeltaPush) -> Ack:
        await super().on_delta(msg)
        return Ack(msg.run_id, self.peer_id, msg.step)


async def test_a_large_sealed_delta_round_trips_hashed_in_many_slices():
    key, receiver = NodeKey.generate(), NodeKey.generate()
    config = dataclasses.replace(FAST, chunk_bytes=1 << 16)  # many slices, many hash batches
    handler = SealedHandler(receiver.peer_id)
    weights = np.random.default_rng(1).standard_normal(3_000_000).astype(np.float32)
    msg = DeltaPush("run", key.peer_id, 1, 0, (TensorBlob.of("w", weights),))
    async with (
        DataPlaneServer(config, handler, auth=Authenticator(receiver)) as server,
        DataPlaneClient(config, auth=Authenticator(key)) as client,
    ):
        ack = await client.push_delta(server.addr, msg)
        assert ack.sender == receiver.peer_id
        assert np.array_equal(handler.deltas[0].tensors[0].array, weights)
        async with DataPlaneClient(config) as plain:  # no seal at all
            with pytest.raises(PeerRejected) as refused:
                await plain.push_delta(server.addr, DeltaPush("run", PEER, 2, 0, msg.tensors))
        assert refused.value.code == "bad_seal"
        handler.peer_id = PEER  # now the receiver answers under an ID that is not its key's
        with pytest.raises(WireFormatError, match="forged"):
            await client.push_delta(server.addr, DeltaPush("run", key.peer_id, 3, 0, msg.tensors))
        assert client.refused_replies["forged"] == 1
        assert [m.step for m in handler.deltas] == [1, 3]


async def test_unparsable_http_is_one_warning_not_an_error_per_request(caplog):
    async with DataPlaneServer(FAST, Handler()) as server:
        for _ in range(5):
            reader, writer = await asyncio.open_connection(server.addr.host, server.addr.port)
            writer.write(b"POST /v1/delta HTTP/1.1\r\nContent-Length: zz\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                reply = await reader.read()
            writer.close()
            assert b" 400 " in reply.split(b"\r\n", 1)[0]
    parser = [r for r in caplog.records if r.name == "p2pml.io.http.server"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(parser) == 1 and parser[0].levelno == logging.WARNING
    assert "not valid HTTP" in parser[0].getMessage()
