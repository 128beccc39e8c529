"""The hardened routing table's per-address caps, without sockets."""

from __future__ import annotations

import random

import pytest

from p2pml.io.overlay.kad import HardenedTable, KNode
from p2pml.protocol.dht import Contact

OWN_HOST = "127.0.0.1"


class Pings:
    """Stands in for the protocol: records the liveness checks the table asks for."""

    def __init__(self) -> None:
        self.checked: list[Contact] = []

    def check_alive(self, contact: Contact) -> None:
        self.checked.append(contact)


def table(rng: random.Random, *, k: int = 4, cap: int = 3) -> HardenedTable:
    me = KNode(rng.randbytes(20))
    return HardenedTable(Pings(), k, me, 2, max_per_ip=cap, exempt_host=OWN_HOST)  # type: ignore[arg-type]


def node(rng: random.Random, host: str, port: int) -> KNode:
    return KNode(rng.randbytes(20), host, port)


def held(t: HardenedTable) -> list[KNode]:
    return [n for b in t.buckets for n in [*b.nodes.values(), *b.replacement_nodes.values()]]


def test_table_holds_at_most_the_cap_per_ip_and_counts_the_rest(rng):
    t = table(rng)
    answers = [t.add_contact(node(rng, "127.0.0.9", 1000 + i)) for i in range(50)]
    assert answers[:3] == [None] * 3 and set(answers[3:]) == {"ip_cap"}
    assert len(held(t)) == 3


def test_table_holds_one_id_per_address(rng):
    t = table(rng)
    first = node(rng, "127.0.0.9", 1000)
    assert t.add_contact(first) is None
    assert t.add_contact(node(rng, "127.0.0.9", 1000)) == "endpoint_taken"
    assert t.holder("127.0.0.9", 1000) == first.id
    assert t.add_contact(first) is None  # the holder itself is refreshed as before


def test_replacements_count_towards_the_cap(rng):
    t = table(rng, k=3, cap=3)
    for i in range(200):  # fill buckets so that later contacts wait as replacements
        t.add_contact(node(rng, f"127.0.{i // 250}.{2 + i % 250}", 1))
    refused = [t.add_contact(node(rng, "127.0.9.9", 1000 + i)) for i in range(20)]
    assert refused.count(None) == 3
    assert sum(1 for n in held(t) if n.ip == "127.0.9.9") == 3


def test_leaving_contact_frees_its_place(rng):
    t = table(rng, cap=1)
    first, second = node(rng, "127.0.0.9", 1), node(rng, "127.0.0.9", 2)
    assert t.add_contact(first) is None
    assert t.add_contact(second) == "ip_cap"
    t.remove_contact(first)
    assert t.add_contact(second) is None
    assert t.holder("127.0.0.9", 1) is None


def test_the_nodes_own_ip_is_not_capped(rng):
    t = table(rng, cap=1)
    assert all(t.add_contact(node(rng, OWN_HOST, 1000 + i)) is None for i in range(30))


def test_ipv6_addresses_of_one_64_count_together(rng):
    t = table(rng, cap=2)
    answers = [t.add_contact(node(rng, f"2001:db8::{i + 1:x}", 4000)) for i in range(4)]
    assert answers == [None, None, "ip_cap", "ip_cap"]
    assert t.add_contact(node(rng, "2001:db8:0:1::1", 4000)) is None  # another /64


def test_contact_moving_within_its_host_keeps_its_place(rng):
    t = table(rng, cap=2)
    a, b = node(rng, "127.0.0.9", 1), node(rng, "127.0.0.9", 2)
    assert t.add_contact(a) is None and t.add_contact(b) is None
    assert t.add_contact(KNode(a.id, "127.0.0.9", 3)) is None  # a restarted on another port
    assert t.holder("127.0.0.9", 1) is None and t.holder("127.0.0.9", 3) == a.id


@pytest.mark.parametrize("seed", range(5))
def test_index_matches_the_buckets_after_any_sequence_of_adds_and_removes(seed):
    rng = random.Random(seed)
    t = table(rng, k=3, cap=2)
    pool = [node(rng, f"127.0.0.{2 + rng.randrange(6)}", rng.randrange(1, 5)) for _ in range(80)]
    for _ in range(400):
        n = rng.choice(pool)
        if rng.random() < 0.7:
            t.add_contact(n)
        else:
            t.remove_contact(n)
        everything = held(t)
        per_host: dict[str, int] = {}
        for m in everything:
            per_host[m.ip] = per_host.get(m.ip, 0) + 1
            assert t.holder(m.ip, m.port) == m.id
        assert all(v <= 2 for v in per_host.values()), per_host
        assert len({(m.ip, m.port) for m in everything}) == len(everything)
