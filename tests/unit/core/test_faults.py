"""FaultPlan validation and parsing, and the pure decision `decide`: rates, determinism, windows."""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.faults import FaultPlan, FaultVerdict, Partition, decide
from p2pml.core.run import NodeConfig
from p2pml.core.types import Address
from p2pml.errors import ConfigError

A = Address("127.0.0.2", 4000)
A_HTTP = Address("127.0.0.2", 4001)
B = Address("127.0.0.3", 4000)
C = Address("127.0.0.4", 4000)
N_DRAWS = 10_000


def draws(plan: FaultPlan, rng: random.Random, n: int = N_DRAWS, **kw) -> list[FaultVerdict]:
    args = {"src": A, "dst": B, "now_unix_s": 100.0, **kw}
    return [decide(plan, rng, **args) for _ in range(n)]


def within(share: float, p: float) -> bool:
    """`share` of N_DRAWS Bernoulli(p) draws lies within 5 standard deviations of p."""
    return abs(share - p) <= 5 * math.sqrt(p * (1 - p) / N_DRAWS) + 1e-9


# --- decide: rates ------------------------------------------------------------------------------


def test_decide_without_faults_sends_once_at_once(rng):
    assert set(draws(FaultPlan(), rng, 100)) == {FaultVerdict(False, (0.0,))}


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.3, 1.0])
def test_decide_drops_at_the_loss_rate(loss, rng):
    verdicts = draws(FaultPlan(loss=loss), rng)
    dropped = sum(v.drop for v in verdicts) / N_DRAWS
    assert within(dropped, loss), dropped
    assert all(v.delays_s == () for v in verdicts if v.drop)
    assert not any(v.partitioned for v in verdicts)


@pytest.mark.parametrize("duplicate", [0.1, 0.5])
def test_decide_duplicates_at_the_duplicate_rate(duplicate, rng):
    verdicts = draws(FaultPlan(duplicate=duplicate), rng)
    assert within(sum(v.duplicated for v in verdicts) / N_DRAWS, duplicate)
    assert {len(v.delays_s) for v in verdicts} == {1, 2}


def test_decide_reorders_at_the_reorder_rate_by_holding_copies_back(rng):
    plan = FaultPlan(delay_s=0.01, reorder=0.2, reorder_delay_s=0.5)
    verdicts = draws(plan, rng)
    assert within(sum(v.reordered for v in verdicts) / N_DRAWS, 0.2)
    for v in verdicts:
        assert v.delays_s == ((0.51,) if v.reordered else (0.01,))


def test_decide_delays_by_delay_plus_uniform_jitter(rng):
    verdicts = draws(FaultPlan(delay_s=0.02, jitter_s=0.01), rng)
    delays = [v.delays_s[0] for v in verdicts]
    assert all(0.02 <= d <= 0.03 for d in delays)
    assert abs(sum(delays) / len(delays) - 0.025) < 0.0005
    assert all(v.delayed and not v.drop for v in verdicts)


def test_decide_uses_request_loss_for_requests_only(rng):
    plan = FaultPlan(loss=0.0, request_loss=1.0)
    assert not any(v.drop for v in draws(plan, rng, 100))
    assert all(v.drop for v in draws(plan, rng, 100, request=True))
    unset = FaultPlan(loss=1.0)  # request_loss None: requests share the datagram loss
    assert all(v.drop for v in draws(unset, rng, 100, request=True))


# --- decide: determinism ------------------------------------------------------------------------

NOISY = FaultPlan(loss=0.1, delay_s=0.01, jitter_s=0.02, duplicate=0.1, reorder=0.1)


def test_decide_same_seed_gives_the_same_sequence(rng_seed):
    first = draws(NOISY, random.Random(rng_seed), 1000)
    again = draws(NOISY, random.Random(rng_seed), 1000)
    assert first == again


def test_decide_other_seed_gives_another_sequence(rng_seed):
    first = draws(NOISY, random.Random(rng_seed), 1000)
    other = draws(NOISY, random.Random(rng_seed + 1), 1000)
    assert first != other


@given(
    plan=st.builds(
        FaultPlan,
        seed=st.integers(),
        loss=st.floats(0, 1),
        delay_s=st.floats(0, 10),
        jitter_s=st.floats(0, 10),
        duplicate=st.floats(0, 1),
        reorder=st.floats(0, 1),
        reorder_delay_s=st.floats(0, 10),
    ),
    seed=st.integers(0, 2**32),
)
def test_decide_drops_and_duplicates_as_its_seeded_draws_say(plan, seed):
    verdict = decide(plan.validate(), random.Random(seed), src=A, dst=B, now_unix_s=0.0)
    replay = random.Random(seed)  # the documented draw order: loss, then duplicate
    lost = replay.random() < plan.loss
    assert verdict.drop == lost
    if lost:
        assert verdict.delays_s == ()
    else:
        duplicated = replay.random() < plan.duplicate
        assert len(verdict.delays_s) == (2 if duplicated else 1)
        assert all(d >= plan.delay_s and math.isfinite(d) for d in verdict.delays_s)


# --- decide: partitions -------------------------------------------------------------------------

SPLIT = Partition(100.0, 130.0, (("127.0.0.2", "127.0.0.5:7"), ("127.0.0.3",)))


@pytest.mark.parametrize(
    ("src", "dst", "now", "cut"),
    [
        (A, B, 100.0, True),  # the window starts at start_unix_s
        (B, A, 129.9, True),  # both directions
        (A, B, 130.0, False),  # and ends before end_unix_s
        (A, B, 99.9, False),
        (A, A_HTTP, 110.0, False),  # same group (a host entry matches any port)
        (A, C, 110.0, False),  # C is in no group: it talks to everyone
        (C, B, 110.0, False),
        (Address("127.0.0.5", 7), B, 110.0, True),  # a host:port entry matches that port
        (Address("127.0.0.5", 8), B, 110.0, False),  # and no other
        ((C, A_HTTP), B, 110.0, True),  # a node is in the group listing any of its addresses
    ],
)
def test_decide_partition_cuts_groups_apart_during_its_window(src, dst, now, cut, rng):
    plan = FaultPlan(partitions=(SPLIT,)).validate()
    verdict = decide(plan, rng, src=src, dst=dst, now_unix_s=now)
    assert verdict.drop is cut
    assert verdict.partitioned is cut


def test_decide_partition_drop_draws_no_randomness(rng_seed):
    plan = FaultPlan(loss=0.5, partitions=(SPLIT,))
    a, b = random.Random(rng_seed), random.Random(rng_seed)
    decide(plan, a, src=A, dst=B, now_unix_s=110.0)
    assert a.random() == b.random()


# --- validation and parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"loss": 1.5}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"loss": True}, "loss"),
        ({"loss": math.nan}, "loss"),
        ({"duplicate": 2}, "duplicate"),
        ({"reorder": -1}, "reorder"),
        ({"request_loss": 1.1}, "request_loss"),
        ({"delay_s": -0.01}, "delay_s"),
        ({"jitter_s": math.inf}, "jitter_s"),
        ({"reorder_delay_s": -1.0}, "reorder_delay_s"),
        ({"seed": 1.5}, "seed"),
        ({"partitions": (Partition(10.0, 10.0, (("a",), ("b",))),)}, "partitions[0].end_unix_s"),
        (
            {"partitions": (Partition(math.nan, 1.0, (("a",), ("b",))),)},
            "partitions[0].start_unix_s",
        ),
        ({"partitions": (Partition(0.0, 1.0, (("a",),)),)}, "partitions[0].groups"),
        ({"partitions": (Partition(0.0, 1.0, (("a",), ())),)}, "partitions[0].groups"),
        ({"partitions": (Partition(0.0, 1.0, (("a",), ("a",))),)}, "partitions[0].groups"),
        ({"partitions": (Partition(0.0, 1.0, (("a",), ("b c",))),)}, "partitions[0].groups"),
        ({"partitions": (Partition(0.0, 1.0, (("a",), ("h:99999",))),)}, "partitions[0].groups"),
    ],
)
def test_plan_validate_names_the_bad_field(changes, field):
    with pytest.raises(ConfigError) as info:
        replace(FaultPlan(), **changes).validate()
    assert info.value.field == field


def test_plan_partition_may_never_end_and_name_hosts_and_addresses():
    groups = (("10.0.0.1", "[::1]:5", "::2"), ("node-b.example", "10.0.0.2:80"))
    plan = FaultPlan(partitions=(Partition(0.0, math.inf, groups),)).validate()
    assert plan.partitions[0].is_active(1e12)


PLAN_TOML = """
seed = 7
loss = 0.05
delay_s = 0.02
jitter_s = 0
duplicate = 0.01
reorder = 0.02
reorder_delay_s = 0.1
request_loss = 0.01

[[partitions]]
start_unix_s = 1700000000
end_unix_s = 1700000030.5
groups = [["127.0.0.2", "127.0.0.3"], ["127.0.0.4:9000"]]
"""


def test_plan_from_mapping_reads_a_toml_document():
    plan = FaultPlan.from_mapping(tomllib.loads(PLAN_TOML))
    assert plan == FaultPlan(
        seed=7,
        loss=0.05,
        delay_s=0.02,
        jitter_s=0.0,
        duplicate=0.01,
        reorder=0.02,
        reorder_delay_s=0.1,
        request_loss=0.01,
        partitions=(
            Partition(1.7e9, 1700000030.5, (("127.0.0.2", "127.0.0.3"), ("127.0.0.4:9000",))),
        ),
    )
    assert "loss 0.05" in plan.describe()
    assert "127.0.0.2,127.0.0.3 | 127.0.0.4:9000" in plan.describe()


def test_plan_from_mapping_of_nothing_is_the_default_plan():
    assert FaultPlan.from_mapping({}) == FaultPlan()


PARTITION = {"start_unix_s": 0, "end_unix_s": 1, "groups": [["a"], ["b"]]}


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"lost": 0.1}, "fault plan", "lost"),
        ({"loss": "5%"}, "loss", "5%"),
        ({"loss": True}, "loss", True),
        ({"partitions": {"start_unix_s": 0}}, "partitions", {"start_unix_s": 0}),
        ({"partitions": [{**PARTITION, "until": 3}]}, "partitions[0]", "until"),
        (
            {"partitions": [{"start_unix_s": 0, "groups": [["a"], ["b"]]}]},
            "partitions[0].end_unix_s",
            None,
        ),
        ({"partitions": [{**PARTITION, "groups": ["a", "b"]}]}, "partitions[0].groups", ["a", "b"]),
        (
            {"partitions": [PARTITION, {**PARTITION, "end_unix_s": 0}]},
            "partitions[1].end_unix_s",
            0.0,
        ),
        ({"partitions": ["x"]}, "partitions[0]", "x"),
    ],
)
def test_plan_from_mapping_refuses_unknown_keys_and_bad_values(data, field, value):
    with pytest.raises(ConfigError) as info:
        FaultPlan.from_mapping(data)
    assert (info.value.field, info.value.value) == (field, value)


def test_node_config_validates_its_fault_plan():
    with pytest.raises(ConfigError) as info:
        NodeConfig(faults=FaultPlan(loss=2.0)).validate()
    assert info.value.field == "loss"
    assert NodeConfig(faults=FaultPlan(loss=0.5)).validate().faults == FaultPlan(loss=0.5)
