"""Zone + rejection draws are exactly uniform; the closest-to-a-random-point draw is not."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.estimate import ID_SPACE
from p2pml.core.types import PeerId
from p2pml.core.uniformity import chi_square_p
from p2pml.core.zones import PeerPool, choose_zone, draw_from_zone, zone_bits, zone_members

CAP = 20


def _ids(rng: random.Random, n: int) -> list[PeerId]:
    return [PeerId(rng.randbytes(20)) for _ in range(n)]


def _closest(ids: list[PeerId], target: int, k: int) -> list[PeerId]:
    return sorted(ids, key=lambda p: int.from_bytes(p, "big") ^ target)[:k]


@pytest.mark.parametrize(
    ("n_hat", "bits"), [(0, 0), (5, 0), (10, 1), (100, 4), (300, 5), (1e6, 17)]
)
def test_zone_bits_puts_about_five_nodes_in_a_zone(n_hat, bits):
    assert zone_bits(n_hat) == bits


def test_zone_members_share_the_prefix(rng):
    ids = _ids(rng, 300)
    target = choose_zone(rng)
    members = zone_members(target, 5, ids)
    assert all(int.from_bytes(p, "big") >> 155 == target >> 155 for p in members)
    assert len(members) == sum(1 for p in ids if int.from_bytes(p, "big") >> 155 == target >> 155)


def _draw_counts(
    rng: random.Random, ids: list[PeerId], me: PeerId, n_draws: int
) -> Counter[PeerId]:
    bits = zone_bits(len(ids))
    counts: Counter[PeerId] = Counter()
    while sum(counts.values()) < n_draws:
        target = choose_zone(rng)
        found = _closest([p for p in ids if p != me], target, CAP)  # what a lookup returns
        draw = draw_from_zone(target, bits, found, self_id=me, cap=CAP, rng=rng)
        if draw.chosen is not None:
            counts[draw.chosen] += 1
    return counts


def test_zone_draws_pass_a_chi_square_test_over_10000_draws(rng):
    ids = _ids(rng, 150)
    me = ids[0]
    counts = _draw_counts(rng, ids, me, 10_000)
    assert me not in counts
    others = ids[1:]
    p = chi_square_p([counts[x] for x in others], [10_000 / len(others)] * len(others))
    assert p >= 0.001


def test_closest_to_a_random_point_fails_the_same_test(rng):
    ids = _ids(rng, 150)
    counts = Counter(_closest(ids, choose_zone(rng), 1)[0] for _ in range(10_000))
    p = chi_square_p([counts[x] for x in ids], [10_000 / len(ids)] * len(ids))
    assert p < 1e-6  # the check above can fail: a biased sampler does


def test_draw_that_picks_self_is_rejected():
    me = PeerId(b"\x00" * 20)
    rng = random.Random(3)
    for _ in range(200):
        draw = draw_from_zone(0, 0, [], self_id=me, cap=1, rng=rng)  # the zone holds only me
        assert draw.chosen is None and draw.zone_size == 1


def test_overflowing_zone_is_flagged(rng):
    ids = _ids(rng, 30)
    draw = draw_from_zone(0, 0, ids, self_id=PeerId(b"\xff" * 20), cap=CAP, rng=rng)
    assert draw.overflow and draw.chosen is not None


def test_pool_take_returns_distinct_peers_and_never_more_than_asked(rng):
    pool = PeerPool(capacity=50)
    ids = _ids(rng, 10)
    for i in range(50):
        pool.add(ids[i % 10], now=float(i))
    taken = pool.take(4, rng)
    assert len(taken) == len(set(taken)) == 4
    assert sorted(pool.take(100, rng)) == sorted(ids)


def test_pool_discard_removes_every_entry_of_a_peer(rng):
    pool = PeerPool(capacity=10)
    a, b = _ids(rng, 2)
    pool.add(a, now=0.0)
    pool.add(b, now=5.0)
    pool.add(a, now=6.0)
    pool.discard(a)
    assert pool.distinct() == [b] and len(pool) == 1


def test_pool_keeps_its_capacity(rng):
    pool = PeerPool(capacity=3)
    ids = _ids(rng, 5)
    for i, p in enumerate(ids):
        pool.add(p, now=float(i))
    assert pool.distinct() == sorted(ids[2:])


def test_pool_take_is_uniform_over_iid_entries(rng):
    ids = _ids(rng, 20)
    counts: Counter[PeerId] = Counter()
    for _ in range(500):  # fresh i.i.d. pools, one take each
        pool = PeerPool(capacity=30)
        for _ in range(30):
            pool.add(rng.choice(ids), now=0.0)
        counts.update(pool.take(3, rng))
    assert chi_square_p([counts[x] for x in ids], [1500 / 20] * 20) >= 0.001


@given(
    st.integers(0, ID_SPACE - 1),
    st.integers(0, 40),
    st.lists(st.binary(min_size=20, max_size=20), max_size=30),
)
def test_draw_returns_a_zone_member_or_none(target, bits, raw):
    ids = [PeerId(r) for r in raw]
    me = PeerId(b"\x01" * 20)
    draw = draw_from_zone(target, bits, ids, self_id=me, cap=CAP, rng=random.Random(0))
    assert draw.chosen is None or draw.chosen in zone_members(target, bits, ids)
    assert draw.chosen != me
