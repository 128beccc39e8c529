"""The Kademlia overlay on real UDP sockets, each node on its own loopback address."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest

from p2pml.core.config import OverlayConfig
from p2pml.core.types import Address, Step
from p2pml.errors import ConfigError, OverlayError, PeerTimeout, WireFormatError
from p2pml.io.overlay import KademliaOverlay, load_contacts
from p2pml.io.overlaybench import loopback_host
from p2pml.protocol import dht
from p2pml.protocol.dht import StepReport
from p2pml.protocol.identity import NodeKey, peer_id_of

pytestmark = pytest.mark.integration

FAST = OverlayConfig(
    rpc_timeout_s=0.2, stall_s=0.05, refresh_interval_s=3600.0, refresh_after_join=False
)


@pytest.fixture
async def loop_errors() -> list[dict[str, object]]:
    """Every error the event loop's exception handler sees; the test asserts it stays empty."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


@contextlib.asynccontextmanager
async def swarm(
    n: int, config: OverlayConfig = FAST, first: int = 0
) -> AsyncIterator[list[KademliaOverlay]]:
    """n nodes on 127.0.0.2, 127.0.0.3, ... joined through node 0; closed in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[KademliaOverlay] = []
        for i in range(n):
            cfg = dataclasses.replace(config, listen=Address(loopback_host(first + i), 0))
            node = await stack.enter_async_context(KademliaOverlay(cfg, NodeKey.generate()))
            if nodes:
                await node.bootstrap([nodes[0].addr])
            nodes.append(node)
        yield nodes


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `condition()` holds, failing after `timeout_s`.

    The conditions are counters and lists that datagram callbacks update; there is no event to
    await, so the condition is re-checked every few milliseconds under the deadline.
    """
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class Raw(asyncio.DatagramProtocol):
    """A bare UDP socket: sends anything, records replies, optionally answers requests."""

    def __init__(self) -> None:
        self.replies: list[object] = []
        self.requests: list[tuple[bytes, object]] = []
        self.answer: Callable[[bytes, object], object | None] | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        dg = dht.decode_datagram(data)
        if dg.kind is dht.Kind.REPLY:
            self.replies.append(dg.body)
            return
        self.requests.append((dg.msg_id, dg.body))
        if self.answer is not None:
            body = self.answer(dg.msg_id, dg.body)
            if body is not None:
                assert self.transport is not None
                self.transport.sendto(dht.encode_reply(dg.msg_id, body), addr)

    def send(self, data: bytes, to: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (to.host, to.port))


@contextlib.asynccontextmanager
async def raw_socket(host: str = "127.0.0.250") -> AsyncIterator[tuple[Raw, Address]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Raw, local_addr=(host, 0))
    try:
        yield proto, Address(*transport.get_extra_info("sockname")[:2])
    finally:
        transport.close()


def request(name: str, args: list[object], sender: bytes | None = None) -> bytes:
    return dht.encode_request(os.urandom(20), name, [sender or os.urandom(20), *args])


async def test_lookup_finds_the_true_k_closest_live_nodes(rng, loop_errors):
    async with swarm(30) as nodes:
        target = rng.randbytes(20)
        result = await nodes[5].lookup(target, k=8)
        everyone = sorted(
            nodes, key=lambda o: int.from_bytes(o.peer_id, "big") ^ int.from_bytes(target, "big")
        )
        expected = [o.peer_id for o in everyone if o is not nodes[5]][:8]
        assert [c.peer_id for c in result.contacts] == expected
    assert loop_errors == []


async def test_joined_nodes_know_both_halves_of_the_id_space():
    async with swarm(24) as nodes:
        for node in nodes:
            mine = node.peer_id[0] >> 7
            assert any(c.peer_id[0] >> 7 != mine for c in node.contacts())


async def test_small_network_is_counted_exactly():
    async with swarm(6) as nodes:
        estimate = await nodes[3].membership.estimate_now()
        assert estimate is not None and estimate.is_exact and estimate.n_hat == 6
        sample = nodes[3].sample_peers(10)
        assert len(sample) == 5 and nodes[3].peer_id not in {c.peer_id for c in sample}


async def test_estimate_of_an_80_node_network_is_near_the_truth():
    config = dataclasses.replace(FAST, k=8)  # small buckets: most tables cannot hold everyone
    async with swarm(80, config) as nodes:
        errors = []
        for node in nodes[::4]:
            estimate = await node.membership.estimate_now()
            assert estimate is not None
            if estimate.is_exact:  # only a node that really knows everyone may count
                assert estimate.n_hat == 80
            else:
                assert estimate.n_lookups == 16
                errors.append(abs(estimate.n_hat - 80) / 80)
        errors.sort()  # expected error 1 / sqrt(16 * 6) = 10 % per node
        assert len(errors) >= 10 and errors[len(errors) // 2] <= 0.2 and errors[-1] <= 0.6, errors


async def test_network_the_tables_hold_entirely_is_counted_exactly():
    async with swarm(30) as nodes:
        await nodes[4].refresh()  # its lookups meet the nodes that joined after it
        await wait_for(lambda: len(nodes[4].contacts()) == 29)  # each is checked, async
        estimate = await nodes[4].membership.estimate_now()
        assert nodes[4].table_is_complete()
        assert estimate is not None and estimate.is_exact and estimate.n_hat == 30


async def test_dead_nodes_leave_lookups_and_samples_after_one_refresh(loop_errors):
    config = dataclasses.replace(FAST, k=8, pool_draws=8)
    async with swarm(40, config) as nodes:
        me = nodes[1]
        await me.refresh()
        dead = nodes[10:16]
        for node in dead:
            await node.__aexit__(None, None, None)
        dead_ids = {n.peer_id for n in dead}
        await me.refresh()
        estimate = me.estimate
        assert estimate is not None
        if estimate.is_exact:  # samples then come from the table: it must not count the dead
            assert estimate.n_hat == 34
        for target in dead_ids:
            result = await me.lookup(target)
            assert not {c.peer_id for c in result.contacts} & dead_ids
        for _ in range(20):
            sample = me.sample_peers(8)
            assert sample and not {c.peer_id for c in sample} & dead_ids
    assert loop_errors == []


async def test_step_and_info_are_signed_and_current():
    async with swarm(2) as (a, b):
        b.set_step(Step(7), done=True)
        b.set_http(Address("127.0.0.3", 8080))
        b.set_run("run-1@abcd")
        contact = next(c for c in a.contacts() if c.peer_id == b.peer_id)
        assert await a.step_of(contact) == StepReport(Step(7), done=True)
        record = await a.info(contact)
        assert (record.peer_id, record.role, record.step) == (b.peer_id, "peer", 7)
        assert (record.run, record.done) == ("run-1@abcd", True)
        assert record.http == Address("127.0.0.3", 8080)


BAD_DATAGRAMS = {
    "random bytes": os.urandom(40),
    "too short": b"\x00" + b"m" * 5,
    "truncated request": request("ping", [])[:-3],
    "oversized": b"\x00"
    + b"m" * 20
    + msgpack.packb(["store", [b"s" * 20, b"k" * 20, b"v" * 9000]]),
    "unknown rpc": request("shutdown", []),
    "wrong arity": request("find_node", []),
    "bool as key": dht.encode_request(b"m" * 20, "find_node", [b"s" * 20, True]),
    "not msgpack": b"\x00" + b"m" * 20 + b"\xc1\xc1",
    "unknown kind": b"\x05" + b"m" * 20 + b"\x90",
}


@pytest.mark.parametrize("name", sorted(BAD_DATAGRAMS))
async def test_bad_datagram_is_counted_and_the_node_keeps_answering(name, loop_errors):
    async with swarm(1) as (node,), raw_socket() as (attacker, _):
        attacker.send(BAD_DATAGRAMS[name], node.addr)
        await wait_for(lambda: node.counters["malformed"] == 1)
        attacker.send(request("ping", []), node.addr)
        await wait_for(lambda: len(attacker.replies) == 1)
        assert peer_id_of(attacker.replies[0][1]) == node.peer_id  # a signed ping reply
    assert loop_errors == []


async def test_bad_input_warns_once_per_host_per_interval_and_counts_every_datagram(caplog):
    async with swarm(1) as (node,), raw_socket() as (attacker, _):
        with caplog.at_level(logging.WARNING, logger="p2pml"):
            for _ in range(25):
                attacker.send(os.urandom(30), node.addr)
            await wait_for(lambda: node.counters["malformed"] == 25)
    warnings = [r for r in caplog.records if "dropped input from 127.0.0.250" in r.getMessage()]
    assert len(warnings) == 1


async def test_unsolicited_reply_is_counted_and_ignored(loop_errors):
    async with swarm(1) as (node,), raw_socket() as (attacker, _):
        attacker.send(dht.encode_reply(os.urandom(20), [1, 2, 3]), node.addr)
        await wait_for(lambda: node.counters["unsolicited_reply"] == 1)
    assert loop_errors == []


async def test_forged_ids_from_one_address_never_enter_the_routing_table(loop_errors):
    forged = [os.urandom(20) for _ in range(300)]
    async with swarm(1) as (node,), raw_socket() as (attacker, _):
        for sender in forged:
            attacker.send(request("find_node", [os.urandom(20)], sender), node.addr)
        await wait_for(lambda: len(attacker.replies) == len(forged))
        # the node checks the address once (it does not answer), and never admits an ID from it
        await wait_for(lambda: node.counters["rpc_timeouts"] >= 1)
        assert node.contacts() == []
        assert len(attacker.requests) <= 2  # one identity check in flight per address, not 300
    assert loop_errors == []


async def test_ids_not_backed_by_the_answering_key_are_rejected(loop_errors):
    liar = NodeKey.generate()  # a real key, but the attacker claims other IDs with it
    forged = [os.urandom(20) for _ in range(20)]
    async with swarm(1) as (node,), raw_socket() as (attacker, _):
        attacker.answer = lambda msg_id, body: dht.seal_signed(liar, body[0], msg_id, b"")
        for sender in forged:
            attacker.send(request("ping", [], sender), node.addr)
            await wait_for(
                lambda: node.counters["forged_id"] >= 1 or node.counters["verify_dropped"] >= 1
            )
        await wait_for(lambda: node.counters["forged_id"] >= 1)
        assert not {c.peer_id for c in node.contacts()} & set(forged)
    assert loop_errors == []


async def test_record_with_a_bad_signature_is_rejected_and_counted():
    key = NodeKey.generate()
    async with swarm(1) as (node,), raw_socket() as (fake, fake_addr):

        def answer(msg_id: bytes, body: object) -> object:
            packed, public_key, signature, proof = dht.seal_signed(key, body[0], msg_id, b"")
            if body[0] == "info":
                signature = bytes(64)
            return [packed, public_key, signature, proof]

        fake.answer = answer
        contact = await node.ping(fake_addr)
        assert contact.peer_id == key.peer_id
        with pytest.raises(WireFormatError, match="does not verify"):
            await node.info(contact)
        assert node.counters["bad_signature"] == 1
        assert key.peer_id not in {c.peer_id for c in node.contacts()}


async def test_stores_over_the_cap_are_refused_and_counted():
    config = dataclasses.replace(FAST, max_stored_values=3, max_values_per_host=2)
    async with swarm(1, config) as (node,):
        async with raw_socket("127.0.0.251") as (one, _), raw_socket("127.0.0.252") as (two, _):
            for i in range(3):
                one.send(request("store", [bytes([i]) * 20, b"v"]), node.addr)
            await wait_for(lambda: len(one.replies) == 3)
            for i in range(3, 5):
                two.send(request("store", [bytes([i]) * 20, b"v"]), node.addr)
            await wait_for(lambda: len(two.replies) == 2)
        assert one.replies == [True, True, False]  # two per host
        assert two.replies == [True, False]  # three in all
        assert node.counters["store_over_cap"] == 2


async def test_put_and_get_through_the_dht():
    async with swarm(10) as nodes:
        key = os.urandom(20)
        assert await nodes[2].put(key, b"hello") >= 1
        assert await nodes[7].get(key) == b"hello"
        assert await nodes[7].get(os.urandom(20)) is None


async def test_bootstrap_with_no_reachable_seed_fails_clearly():
    config = dataclasses.replace(
        FAST, rpc_timeout_s=0.05, bootstrap_attempts=2, bootstrap_backoff_s=0.01
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound but never read: datagrams to it go unanswered
        seed = Address(*silent.getsockname())
        async with KademliaOverlay(config, NodeKey.generate()) as node:
            with pytest.raises(OverlayError, match=rf"{seed}.*after 2 attempts"):
                await node.bootstrap([seed])
            with pytest.raises(OverlayError, match="no bootstrap nodes"):
                await node.bootstrap([])


async def test_ping_of_a_silent_address_times_out():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        async with KademliaOverlay(FAST, NodeKey.generate()) as node:
            with pytest.raises(PeerTimeout):
                await node.ping(Address(*silent.getsockname()))


async def test_ipv6_nodes_join_over_the_v6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")
    config = dataclasses.replace(FAST, listen=Address("::1", 0))
    async with (
        KademliaOverlay(config, NodeKey.generate()) as a,
        KademliaOverlay(config, NodeKey.generate()) as b,
    ):
        await b.bootstrap([a.addr])
        assert [c.peer_id for c in b.contacts()] == [a.peer_id]
        assert str(a.addr).startswith("[::1]:")


async def test_contacts_persist_as_json_and_reload(tmp_path):
    path = tmp_path / "contacts.json"
    async with swarm(4) as nodes:
        await wait_for(lambda: len(nodes[1].contacts()) == 3)  # later joiners are checked async
        nodes[1].save_contacts(path)
        addrs = {n.addr for n in nodes} - {nodes[1].addr}
    assert set(load_contacts(path)) == addrs
    assert path.read_text().lstrip().startswith("{")


@pytest.mark.parametrize("text", ["", "not json", '{"contacts": [{"addr": "nohost"}]}', "[1]"])
def test_load_contacts_refuses_a_bad_file(tmp_path, text):
    path = tmp_path / "contacts.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--contacts"):
        load_contacts(path)


async def test_closing_releases_the_port_and_leaves_no_task():
    config = dataclasses.replace(FAST, refresh_interval_s=0.01)
    before = asyncio.all_tasks()
    async with KademliaOverlay(config, NodeKey.generate()) as node:
        addr = node.addr
        await node.__aexit__(None, None, None)  # closing twice is harmless
    assert asyncio.all_tasks() == before
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind((addr.host, addr.port))


async def test_routing_table_neighbours_are_exactly_the_closest_it_holds(rng):
    async with swarm(40) as nodes:
        table = nodes[3].endpoint.table
        held = table.nodes()
        assert len(held) > 20
        for _ in range(50):
            target = rng.randbytes(20)
            found = nodes[3].endpoint.closest(target, 20)
            expected = sorted(held, key=lambda n: n.long_id ^ int.from_bytes(target, "big"))[:20]
            assert [c.peer_id for c in found] == [n.id for n in expected]


async def test_protocol_does_not_turn_unknown_attributes_into_remote_calls():
    async with KademliaOverlay(FAST, NodeKey.generate()) as node:
        with pytest.raises(AttributeError):
            node.endpoint.protocol.shutdown  # noqa: B018


def _liar(key: NodeKey, contacts: Callable[[bytes], list[list[object]]]):
    """An answerer that proves its own key and returns made-up contacts to find_node."""

    def answer(msg_id: bytes, body: object) -> object | None:
        name, args = body
        if name == "find_node":
            return contacts(args[1])
        if name in ("ping", "info", "step"):
            return dht.seal_signed(key, name, msg_id, b"" if name == "ping" else 0)
        return None

    return answer


async def test_lookup_results_hold_only_ids_proven_at_their_address(loop_errors):
    key = NodeKey.generate()
    async with swarm(3) as nodes, raw_socket() as (fake, fake_addr):
        # 20 IDs right next to any target, all "at" the liar's own address
        fake.answer = _liar(
            key,
            lambda t: [
                [(int.from_bytes(t, "big") ^ i).to_bytes(20, "big"), fake_addr.host, fake_addr.port]
                for i in range(1, 21)
            ],
        )
        await nodes[1].ping(fake_addr)  # the liar is a proven contact itself
        result = await nodes[1].lookup(os.urandom(20))
        ids = {c.peer_id for c in result.contacts}
        assert ids <= {n.peer_id for n in nodes} | {key.peer_id}
        assert nodes[1].counters["forged_id"] >= 1
    assert loop_errors == []


async def test_contact_with_a_zoned_ipv6_host_does_not_break_the_socket(loop_errors):
    key = NodeKey.generate()
    async with swarm(2) as nodes, raw_socket() as (fake, fake_addr):
        fake.answer = _liar(key, lambda t: [[os.urandom(20), "::1%\x00", 4000]])
        await nodes[1].ping(fake_addr)
        await nodes[1].lookup(os.urandom(20))
        assert nodes[1].counters["malformed"] + nodes[1].counters["bad_reply"] >= 1
        assert not nodes[1].endpoint.protocol.transport.is_closing()
        contact = next(c for c in nodes[1].contacts() if c.peer_id == nodes[0].peer_id)
        assert (await nodes[1].step_of(contact)).step == 0  # still talking
    assert loop_errors == []


async def test_a_request_claiming_another_nodes_id_cannot_evict_it(loop_errors):
    async with swarm(2) as (a, b), raw_socket() as (attacker, _):
        assert b.peer_id in {c.peer_id for c in a.contacts()}
        for _ in range(5):  # the check of (b's ID, attacker's address) fails every time
            attacker.send(request("ping", [], b.peer_id), a.addr)
        await wait_for(lambda: a.counters["rpc_timeouts"] >= 1)
        await a.endpoint.verifications_done()
        assert b.peer_id in {c.peer_id for c in a.contacts()}
        held = next(c for c in a.contacts() if c.peer_id == b.peer_id)
        assert held.addr == b.addr
    assert loop_errors == []


async def test_a_joined_node_refreshes_at_once_in_the_background():
    config = dataclasses.replace(FAST, refresh_after_join=True)
    async with swarm(5) as nodes:
        cfg = dataclasses.replace(config, listen=Address(loopback_host(10), 0))
        async with KademliaOverlay(cfg, NodeKey.generate()) as late:
            assert late.estimate is None
            await late.bootstrap([nodes[0].addr])
            await wait_for(lambda: late.estimate is not None)
            assert late.estimate is not None and late.estimate.n_hat == 6


async def test_pool_draws_wait_for_an_estimate_so_zones_are_never_the_whole_space():
    config = dataclasses.replace(FAST, k=8, pool_draws=8)
    async with swarm(80, config) as nodes:
        estimating = []
        for node in nodes[40:50]:
            await node.refresh()  # the first round has no estimate to size zones with
            await node.refresh()
            if node.estimate is not None and not node.estimate.is_exact:
                estimating.append(node)
        assert estimating
        draws = sum(n.membership.n_zone_draws for n in estimating)
        overflows = sum(n.membership.n_overflow_zones for n in estimating)
        # sized zones overflow a k = 8 lookup rarely; zones of the whole space always would
        assert draws > 0 and overflows <= 0.05 * draws, (overflows, draws)
        for node in estimating:
            assert len(node.sample_peers(4)) == 4
