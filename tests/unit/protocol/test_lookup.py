"""LookupMachine against an ideal in-memory network: exact results, dead contacts, stalls, zones."""

from __future__ import annotations

import random

import pytest

from p2pml.core.types import Address, PeerId
from p2pml.errors import UnexpectedMessage
from p2pml.protocol.dht import Contact
from p2pml.protocol.lookup import LookupMachine

K = 8
MAX_ROUNDS = 10_000


def _net(rng: random.Random, n: int) -> list[Contact]:
    return [Contact(PeerId(rng.randbytes(20)), Address("127.0.0.1", 1000 + i)) for i in range(n)]


def _closest(contacts: list[Contact], target: int, k: int) -> list[Contact]:
    return sorted(contacts, key=lambda c: c.long_id ^ target)[:k]


def _run(
    machine: LookupMachine, net: list[Contact], dead: set[PeerId], *, now: float = 0.0
) -> None:
    """Answer every query like a node whose table holds the whole network (bounded rounds)."""
    for _ in range(MAX_ROUNDS):
        if machine.is_done:
            return
        asked = machine.next_queries(now=now)
        if not asked:
            raise AssertionError("lookup neither done nor asking")
        for c in asked:
            if c.peer_id in dead:
                machine.on_failure(c.peer_id, now=now)
            else:
                machine.on_reply(c.peer_id, _closest(net, machine.target, 20), now=now)
    raise AssertionError("lookup did not finish")


def test_lookup_finds_the_true_k_closest(rng):
    net = _net(rng, 200)
    me, target = net[0], rng.getrandbits(160)
    machine = LookupMachine(target, me.peer_id, net[1:4], k=K, alpha=3, stall_s=0.1)
    _run(machine, net, set())
    expected = [c for c in _closest(net, target, K + 1) if c != me][:K]
    assert machine.result() == expected


def test_lookup_never_returns_or_retries_a_dead_contact(rng):
    net = _net(rng, 200)
    target = rng.getrandbits(160)
    dead = {c.peer_id for c in _closest(net, target, 4)}
    machine = LookupMachine(target, net[-1].peer_id, net[:5], k=K, alpha=3, stall_s=0.1)
    _run(machine, net, dead)
    result = {c.peer_id for c in machine.result()}
    assert len(result) == K and not result & dead
    assert {c.peer_id for c in machine.failed()} <= dead


def test_lookup_never_asks_itself(rng):
    net = _net(rng, 50)
    me = net[0]
    machine = LookupMachine(me.long_id, me.peer_id, net, k=K, alpha=3, stall_s=0.1)
    while not machine.is_done:
        for c in machine.next_queries(now=0.0):
            assert c.peer_id != me.peer_id
            machine.on_reply(c.peer_id, net, now=0.0)


def test_stalled_query_frees_its_slot_after_stall_s(rng):
    net = _net(rng, 30)
    machine = LookupMachine(
        rng.getrandbits(160), PeerId(b"\x00" * 20), net, k=K, alpha=1, stall_s=0.2
    )
    first = machine.next_queries(now=0.0)
    assert len(first) == 1
    assert machine.next_queries(now=0.1) == []
    assert machine.next_deadline(now=0.1) == pytest.approx(0.2)
    assert len(machine.next_queries(now=0.2)) == 1  # the first one is still unanswered
    assert machine.next_deadline(now=0.2) == pytest.approx(0.4)  # only the new query's stall


def test_reply_without_a_query_is_unexpected(rng):
    net = _net(rng, 10)
    machine = LookupMachine(0, PeerId(b"\x00" * 20), net, k=K, alpha=3, stall_s=0.1)
    with pytest.raises(UnexpectedMessage):
        machine.on_reply(net[0].peer_id, [], now=0.0)
    asked = machine.next_queries(now=0.0)[0]
    machine.on_reply(asked.peer_id, [], now=0.0)
    with pytest.raises(UnexpectedMessage):  # a duplicated reply
        machine.on_reply(asked.peer_id, [], now=0.0)


def test_lookup_with_no_contacts_is_done_and_empty():
    machine = LookupMachine(0, PeerId(b"\x00" * 20), [], k=K, alpha=3, stall_s=0.1)
    assert machine.is_done and machine.result() == [] and machine.next_queries(now=0.0) == []


def test_candidate_set_is_bounded(rng):
    net = _net(rng, 400)
    machine = LookupMachine(
        0, PeerId(b"\x00" * 20), net, k=K, alpha=3, stall_s=0.1, max_candidates=50
    )
    assert len(machine._state) == 50  # the 50 closest kept
    assert set(machine._contacts.values()) == set(_closest(net, 0, 50))


def test_zone_lookup_enumerates_the_zone_with_fewer_queries(rng):
    net = _net(rng, 400)
    target, radius = rng.getrandbits(160), (1 << 160) >> 6  # zones of about 400 / 64 nodes
    zone = {c for c in net if c.long_id ^ target < radius}
    full = LookupMachine(target, PeerId(b"\x00" * 20), net[:3], k=20, alpha=3, stall_s=0.1)
    _run(full, net, set())
    zoned = LookupMachine(
        target, PeerId(b"\x00" * 20), net[:3], k=20, alpha=3, stall_s=0.1, radius=radius
    )
    _run(zoned, net, set())
    assert {c for c in zoned.result() if c.long_id ^ target < radius} == zone
    assert zoned.n_queries < full.n_queries


def test_stalled_query_makes_the_lookup_ask_one_more_contact(rng):
    net = _net(rng, 100)
    target = rng.getrandbits(160)
    closest = _closest(net, target, 3)
    machine = LookupMachine(target, PeerId(b"\x00" * 20), closest, k=2, alpha=3, stall_s=0.1)
    asked = machine.next_queries(now=0.0)
    assert asked == closest[:2]  # only the k = 2 closest are needed
    machine.on_reply(asked[1].peer_id, [], now=0.01)
    assert machine.next_queries(now=0.05) == []
    # the closest has not answered for stall_s: its successor is asked before it fails
    assert machine.next_queries(now=0.1) == [closest[2]]
    machine.on_reply(closest[2].peer_id, [], now=0.11)
    assert not machine.is_done  # the stalled one may still answer
    machine.on_failure(asked[0].peer_id, now=0.5)
    assert machine.is_done and machine.result() == closest[1:]


def test_next_deadline_is_none_once_every_query_has_stalled(rng):
    net = _net(rng, 5)
    machine = LookupMachine(0, PeerId(b"\x00" * 20), net[:1], k=1, alpha=1, stall_s=0.1)
    machine.next_queries(now=0.0)
    assert machine.next_deadline(now=0.05) == pytest.approx(0.1)
    assert machine.next_deadline(now=0.1) is None  # a deadline in the past would spin the driver
