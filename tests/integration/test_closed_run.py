"""Closed runs on the data plane: sealed frames, admission by run key or allowlist, replays.

Real nodes on 127.0.0.x; raw requests go through aiohttp so that the exact bytes can be replayed
or altered.
"""

from __future__ import annotations

import contextlib
import os

import aiohttp
import numpy as np
import pytest
import torch
from nodes import cluster, node_config
from test_node import delta_like, initial_params, sgd, tiny_model

from p2pml.errors import PeerRejected, WireFormatError
from p2pml.io.http import CONTENT_TYPE, sealed_body
from p2pml.node.node import Node
from p2pml.protocol.auth import NONCE_BYTES, Admission, Authenticator, new_digest
from p2pml.protocol.identity import NodeKey
from p2pml.protocol.messages import DeltaPush, ModelRequest
from p2pml.protocol.wire import encode_contiguous
from p2pml.train.loop import Trainer
from p2pml.train.tensors import run_manifest

SECRET = Admission.derive_key(b"the run's shared secret")


async def post(addr, body: bytes) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{addr}/v1/delta", data=body, headers={"Content-Type": CONTENT_TYPE}
        ) as reply,
    ):
        data = await reply.json(content_type=None) if reply.status != 200 else {}
        return reply.status, data.get("error", "")


def unchanged(model) -> bool:
    return all(
        torch.equal(got, want)
        for got, want in zip(model.parameters(), initial_params(), strict=True)
    )


@pytest.mark.parametrize("closed_by", ["allowlist", "run key"])
async def test_a_node_outside_the_run_is_refused_on_every_route(closed_by):
    model, theirs = tiny_model(), tiny_model()
    manifest = run_manifest("closed", model, {"barrier": "pssp"})
    keys = [NodeKey.generate() for _ in range(2)]
    if closed_by == "allowlist":
        admission = Admission(allowed_keys=frozenset(k.public_key for k in keys))
        outsider_admission = admission  # it knows the list; its key is not on it
    else:
        admission = Admission(run_key=SECRET)
        outsider_admission = Admission(run_key=Admission.derive_key(b"a guessed secret!!"))
    async with (
        cluster(2, manifest, keys=keys, admission=admission) as (member, receiver),
        Trainer(receiver, model, sgd(model)),
        Node(node_config(5), manifest, admission=outsider_admission) as outsider,
        Trainer(outsider, theirs, sgd(theirs)),  # it has a model to serve
    ):
        msg = DeltaPush(manifest.tag, outsider.peer_id, 0, 0, delta_like(model))
        with pytest.raises(PeerRejected) as refused:
            await outsider.client.push_delta(receiver.server.addr, msg)
        assert (refused.value.status, refused.value.code) == (403, "not_admitted")
        with pytest.raises(PeerRejected) as pulled:
            await outsider.client.pull_model(
                receiver.server.addr, ModelRequest(manifest.tag, outsider.peer_id, -1)
            )
        assert pulled.value.code == "not_admitted"
        # ... and a member refuses the model the outsider serves (with another run key, the
        # outsider already refuses the member's request)
        request = ModelRequest(manifest.tag, member.peer_id, -1)
        if closed_by == "allowlist":
            with pytest.raises(WireFormatError, match="not_admitted"):
                await member.client.pull_model(outsider.server.addr, request)
            assert member.client.refused_replies["not_admitted"] == 1
        else:
            with pytest.raises(PeerRejected, match="not_admitted"):
                await member.client.pull_model(outsider.server.addr, request)
        assert receiver.counters["rejected_not_admitted"] == 1
        assert receiver.counters["deltas_rejected"] == 1
        assert receiver.server.rejections["not_admitted"] == 2
        assert receiver.take_deltas() == []
        # the members themselves still exchange deltas
        ok = DeltaPush(manifest.tag, member.peer_id, 0, 0, delta_like(model))
        await member.client.push_delta(receiver.server.addr, ok)
        assert len(receiver.take_deltas()) == 1
    assert unchanged(model)


async def test_replayed_altered_and_stale_frames_are_refused_and_counted():
    model = tiny_model()
    manifest = run_manifest("replay", model, {"barrier": "pssp"})
    async with cluster(2, manifest) as (sender, receiver), Trainer(receiver, model, sgd(model)):
        msg = DeltaPush(manifest.tag, sender.peer_id, 0, 0, delta_like(model))
        body = sealed_body(msg, sender.auth)
        assert await post(receiver.server.addr, body) == (200, "")
        assert len(receiver.take_deltas()) == 1
        assert await post(receiver.server.addr, body) == (403, "replayed")
        altered = bytearray(sealed_body(msg, sender.auth))
        altered[-200] ^= 0x40  # a payload byte, inside the last tensor
        assert await post(receiver.server.addr, bytes(altered)) == (403, "forged")
        frame = encode_contiguous(msg).tobytes()
        digest = new_digest()
        digest.update(frame)
        old = sender.auth.seal(digest.digest(), now_unix_s=1.0e9, nonce=os.urandom(NONCE_BYTES))
        assert await post(receiver.server.addr, frame + old) == (403, "clock_skew")
        assert await post(receiver.server.addr, frame) == (403, "bad_seal")
        # a valid frame sealed by another key than its sender's
        stranger = Authenticator(NodeKey.generate())
        assert await post(receiver.server.addr, sealed_body(msg, stranger)) == (403, "forged")
        for code in ("replayed", "forged", "clock_skew", "bad_seal"):
            assert receiver.counters[f"rejected_{code}"] >= 1, code
        assert receiver.counters["deltas_rejected"] == 5
        assert receiver.take_deltas() == []
    assert not np.isnan(next(model.parameters()).detach().numpy()).any()


async def test_an_open_run_says_so_loudly_and_a_closed_one_does_not(caplog):
    model = tiny_model()
    manifest = run_manifest("loud", model, {})
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(Node(node_config(0), manifest))
        assert "run loud is OPEN" in caplog.text
        caplog.clear()
        closed = Admission(run_key=SECRET)
        await stack.enter_async_context(Node(node_config(1), manifest, admission=closed))
        assert "OPEN" not in caplog.text
