"""ServerMachine: registration, min_workers, BSP rounds, immediate updates, SSP, sampled
barriers, heartbeats and eviction, finished workers, refusals, cancel, and a reference model
driven by hypothesis."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pml.core.barrier import BARRIER_NAMES, Decision, make_params
from p2pml.core.sampling import SampleSize
from p2pml.core.types import PeerId
from p2pml.errors import Refused
from p2pml.protocol.server import Apply, Evicted, Released, ServerMachine

T = TypeVar("T")
PROCEED, WAIT = Decision.PROCEED, Decision.WAIT
# A power of two, so seen_at + timeout and now - seen_at are exact in the tests that use it.
TIMEOUT_S = 4.0


def pid(i: int) -> PeerId:
    return PeerId(i.to_bytes(20, "big"))


A, B, C, D = (pid(i) for i in range(1, 5))


def server(
    rng: random.Random,
    name: str = "bsp",
    *,
    staleness: int = 0,
    sample: SampleSize | None = None,
    min_workers: int = 1,
    timeout_s: float = TIMEOUT_S,
    version: int = 0,
) -> ServerMachine[str]:
    sample = sample if sample is not None else SampleSize(count=0)
    return ServerMachine(
        make_params(name, staleness=staleness, sample=sample.count or 0),
        sample,
        heartbeat_timeout_s=timeout_s,
        rng=rng,
        min_workers=min_workers,
        version=version,
    )


def table(m: ServerMachine[str], steps: dict[PeerId, int], *, now: float = 0.0) -> None:
    """Register every worker at step 0, then move each to its step with a heartbeat."""
    for worker in steps:
        m.register(worker, 0, now=now)
    for worker, step in steps.items():
        m.heartbeat(worker, step, done=False, now=now)
    m.drain_events()


def only_applies(events: Sequence[object]) -> list[Apply[str]]:
    assert all(isinstance(e, Apply) for e in events), events
    return [e for e in events if isinstance(e, Apply)]


def steps_of(m: ServerMachine[T]) -> dict[PeerId, tuple[int, bool]]:
    return {p: (w.step, w.done) for p, w in m.workers.items()}


# --- registration -----------------------------------------------------------------------------


def test_server_register_fresh_worker_starts_at_its_own_step(rng):
    m = server(rng)
    assert m.register(A, 7, now=0.0) == 7
    assert m.workers[A].step == 7
    assert m.workers[A].seen_at == 0.0
    assert m.drain_events() == []


@pytest.mark.parametrize(
    ("others", "done", "step", "expected"),
    [
        ({A: 3, B: 5}, set(), 0, 3),  # behind the slowest: moved up to it
        ({A: 3, B: 5}, set(), 4, 4),  # ahead of the slowest: keeps its own
        ({A: 3, B: 5}, set(), 9, 9),
        ({A: 1, B: 5}, {A}, 0, 5),  # a finished worker is not the slowest training worker
        ({A: 2}, {A}, 0, 0),  # nobody training: its own step
    ],
)
def test_server_register_newcomer_starts_at_the_slowest_training_step(
    rng, others, done, step, expected
):
    m = server(rng, "asp")
    table(m, others)
    for worker in done:
        m.heartbeat(worker, others[worker], done=True, now=0.0)
    assert m.register(C, step, now=1.0) == expected
    assert m.workers[C].step == expected


@pytest.mark.parametrize("step", [0, 2, 3])
def test_server_register_known_worker_never_moves_backwards(rng, step):
    m = server(rng, "asp")
    m.register(A, 0, now=0.0)
    for s in range(3):
        m.push(A, s, 0, f"a{s}", now=0.0)
    assert m.register(A, step, now=1.0) == 3
    assert m.workers[A].step == 3


def test_server_register_known_worker_refreshes_seen_at_and_done(rng):
    m = server(rng, "asp")
    m.register(A, 2, now=0.0)
    m.heartbeat(A, 2, done=True, now=1.0)
    m.register(A, 2, now=3.0)
    assert (m.workers[A].seen_at, m.workers[A].done) == (3.0, False)


def test_server_n_registered_counts_distinct_workers(rng):
    m = server(rng)
    for worker in (A, B, A, C, B, A):
        m.register(worker, 0, now=0.0)
    assert m.n_registered == 3


def test_server_n_registered_counts_a_worker_back_after_eviction_once(rng):
    m = server(rng)
    m.register(A, 0, now=0.0)
    assert m.on_timer(now=TIMEOUT_S) == [A]
    m.register(A, 0, now=TIMEOUT_S)
    assert m.n_registered == 1


def test_server_worker_back_after_eviction_does_not_fill_min_workers(rng):
    m = server(rng, min_workers=2)
    m.register(A, 0, now=0.0)
    m.on_timer(now=TIMEOUT_S)
    m.register(A, 0, now=TIMEOUT_S)
    assert m.ask(A, 0, now=TIMEOUT_S) is WAIT


# --- min_workers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BARRIER_NAMES)
def test_server_no_worker_proceeds_before_min_workers(rng, name):
    m = server(rng, name, staleness=5, min_workers=3)
    m.register(A, 0, now=0.0)
    m.register(B, 0, now=0.0)
    assert m.ask(A, 0, now=0.0) is WAIT
    assert m.ask(B, 0, now=0.0) is WAIT
    assert m.drain_events() == []


@pytest.mark.parametrize("name", BARRIER_NAMES)
def test_server_last_of_min_workers_releases_the_waiters(rng, name):
    m = server(rng, name, staleness=5, min_workers=3)
    for worker in (B, A):
        m.register(worker, 0, now=0.0)
        assert m.ask(worker, 0, now=0.0) is WAIT
    m.register(C, 0, now=1.0)
    assert m.drain_events() == [Released(A, 0), Released(B, 0)]
    assert m.ask(C, 0, now=1.0) is PROCEED


# --- BSP --------------------------------------------------------------------------------------


def test_server_bsp_buffers_a_round_until_every_worker_pushed(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0, C: 0})
    m.push(B, 0, 0, "b0", now=1.0)
    m.push(A, 0, 0, "a0", now=1.0)
    assert m.drain_events() == []
    assert m.version == 0
    m.push(C, 0, 0, "c0", now=1.0)
    assert m.drain_events() == [Apply(("b0", "a0", "c0"), 1 / 3, 1, 0, (0, 0, 0))]
    assert m.version == 1


def test_server_bsp_rounds_apply_once_each_with_zero_staleness(rng):
    m = server(rng, "bsp", version=10)
    table(m, {A: 0, B: 0})
    applies = []
    for step in range(3):
        base = m.version
        m.push(A, step, base, f"a{step}", now=0.0)
        m.push(B, step, base, f"b{step}", now=0.0)
        applies += m.drain_events()
    assert applies == [
        Apply(("a0", "b0"), 0.5, 11, 0, (0, 0)),
        Apply(("a1", "b1"), 0.5, 12, 1, (0, 0)),
        Apply(("a2", "b2"), 0.5, 13, 2, (0, 0)),
    ]


def test_server_bsp_ask_for_the_next_step_waits_until_the_round_closes(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0, C: 0})
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.ask(A, 1, now=0.0) is WAIT
    m.push(B, 0, 0, "b0", now=0.0)
    assert m.ask(B, 1, now=0.0) is WAIT
    assert m.drain_events() == []
    m.push(C, 0, 0, "c0", now=0.0)
    assert m.drain_events() == [
        Apply(("a0", "b0", "c0"), 1 / 3, 1, 0, (0, 0, 0)),
        Released(A, 1),
        Released(B, 1),
    ]
    assert m.ask(C, 1, now=0.0) is PROCEED


def test_server_bsp_round_waits_for_a_newcomer_at_that_step(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0})
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.register(C, 0, now=0.0) == 0  # B is still at 0
    m.push(B, 0, 0, "b0", now=0.0)
    assert m.drain_events() == []
    m.push(C, 0, 0, "c0", now=0.0)
    assert m.drain_events() == [Apply(("a0", "b0", "c0"), 1 / 3, 1, 0, (0, 0, 0))]


# --- immediate updates: ASP, SSP, pBSP, pSSP ----------------------------------------------------

_IMMEDIATE = [
    ("asp", SampleSize(count=0)),
    ("ssp", SampleSize(count=0)),
    ("pbsp", SampleSize(count=1)),
    ("pssp", SampleSize(count=1)),
    ("pbsp", SampleSize(fraction=0.5)),
]


@pytest.mark.parametrize(("name", "sample"), _IMMEDIATE)
def test_server_immediate_push_applies_with_weight_one_over_training(rng, name, sample):
    m = server(rng, name, staleness=3, sample=sample)
    table(m, {A: 0, B: 0, C: 0})
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.drain_events() == [Apply(("a0",), 1 / 3, 1, 0, (0,))]


@pytest.mark.parametrize(("name", "sample"), _IMMEDIATE)
@pytest.mark.parametrize(
    ("version", "bases", "expected"),
    [
        (0, [0, 0, 0], [0, 1, 2]),
        (0, [0, 1, 1], [0, 0, 1]),
        (5, [5, 5, 6], [0, 1, 1]),
        (5, [3, 6, 7], [2, 0, 0]),
    ],
)
def test_server_immediate_push_staleness_is_version_minus_base(
    rng, name, sample, version, bases, expected
):
    m = server(rng, name, staleness=3, sample=sample, version=version)
    table(m, {A: 0, B: 0, C: 0})
    for worker, base in zip((A, B, C), bases, strict=True):
        m.push(worker, 0, base, worker.hex(), now=0.0)
    events = only_applies(m.drain_events())
    assert [e.staleness for e in events] == [(s,) for s in expected]
    assert [e.version for e in events] == [version + 1, version + 2, version + 3]
    assert m.version == version + 3


# --- SSP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("staleness", [0, 1, 2, 5])
@pytest.mark.parametrize(("ahead", "expected"), [(0, PROCEED), (1, WAIT)])
def test_server_ssp_bounds_the_lead_over_the_slowest(rng, staleness, ahead, expected):
    m = server(rng, "ssp", staleness=staleness)
    lead = staleness + ahead
    table(m, {A: 3, B: 3 + lead, C: 3 + min(lead, 1)})
    assert m.ask(B, 3 + lead, now=0.0) is expected


def test_server_ssp_waiter_is_released_when_the_slowest_catches_up(rng):
    m = server(rng, "ssp", staleness=1)
    table(m, {A: 0, B: 2})
    assert m.ask(B, 2, now=0.0) is WAIT
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.drain_events() == [Apply(("a0",), 0.5, 1, 0, (0,)), Released(B, 2)]


# --- sampled barriers -------------------------------------------------------------------------

_TABLES = [
    {A: 0, B: 0, C: 0},
    {A: 0, B: 1, C: 1},
    {A: 2, B: 1, C: 5},
    {A: 4, B: 3, C: 2, D: 3},
    {A: 0, B: 9},
    {A: 6},
]


@pytest.mark.parametrize("name", ["pbsp", "pssp"])
@pytest.mark.parametrize("sample", [SampleSize(count=0), SampleSize(fraction=0.0)])
@pytest.mark.parametrize("steps", _TABLES)
def test_server_sample_zero_decides_as_asp(rng, name, sample, steps):
    m = server(rng, name, staleness=1, sample=sample)
    table(m, steps)
    assert {p: m.ask(p, s, now=0.0) for p, s in steps.items()} == dict.fromkeys(steps, PROCEED)


@pytest.mark.parametrize(("name", "full"), [("pbsp", "bsp"), ("pssp", "ssp")])
@pytest.mark.parametrize(
    "sample", [SampleSize(count=4), SampleSize(count=100), SampleSize(fraction=1.0)]
)
@pytest.mark.parametrize("staleness", [0, 1, 2])
@pytest.mark.parametrize("steps", _TABLES)
def test_server_full_sample_decides_as_the_full_barrier(rng, name, full, sample, staleness, steps):
    sampled = server(rng, name, staleness=staleness, sample=sample)
    reference = server(rng, full, staleness=staleness)
    table(sampled, steps)
    table(reference, steps)
    assert {p: sampled.ask(p, s, now=0.0) for p, s in steps.items()} == {
        p: reference.ask(p, s, now=0.0) for p, s in steps.items()
    }


# --- heartbeats and eviction ------------------------------------------------------------------


def _three_at_different_times(m: ServerMachine[str]) -> None:
    m.register(A, 2, now=0.0)
    m.register(B, 2, now=0.0)
    m.heartbeat(B, 4, done=True, now=1.0)
    m.register(C, 2, now=2.0)
    m.drain_events()


def test_server_next_deadline_is_the_earliest_seen_at_plus_timeout(rng):
    m = server(rng, "asp")
    assert m.next_deadline() is None
    _three_at_different_times(m)
    assert m.next_deadline() == 0.0 + TIMEOUT_S
    m.heartbeat(A, 2, done=False, now=3.0)
    assert m.next_deadline() == 1.0 + TIMEOUT_S


def test_server_on_timer_evicts_exactly_the_workers_silent_for_the_timeout(rng):
    m = server(rng, "asp")
    _three_at_different_times(m)
    assert sorted(m.on_timer(now=5.0)) == [A, B]  # silent 5 s and exactly 4 s; C only 3 s
    assert m.drain_events() == [Evicted(A, 2, 5.0, False), Evicted(B, 4, 4.0, True)]
    assert list(m.workers) == [C]
    assert m.next_deadline() == 2.0 + TIMEOUT_S


def test_server_on_timer_before_the_deadline_evicts_nobody(rng):
    m = server(rng, "asp")
    _three_at_different_times(m)
    assert m.on_timer(now=TIMEOUT_S - 0.25) == []
    assert m.drain_events() == []
    assert sorted(m.workers) == [A, B, C]


@pytest.mark.parametrize(
    ("seen_at", "timeout_s"),
    [(0.0, 4.0), (0.25, 1.0), (0.4, 1.0), (0.5, 0.1), (2232.211, 0.1), (13436.424, 0.3)],
)
def test_server_on_timer_at_next_deadline_evicts_the_silent_worker(rng, seen_at, timeout_s):
    m = server(rng, "asp", timeout_s=timeout_s)
    m.register(A, 0, now=seen_at)
    deadline = m.next_deadline()
    assert deadline is not None
    assert m.on_timer(now=deadline) == [A]


def test_server_bsp_eviction_closes_the_open_round_and_releases_waiters(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0, C: 0})
    m.push(A, 0, 0, "a0", now=2.0)
    assert m.ask(A, 1, now=2.0) is WAIT
    m.push(B, 0, 0, "b0", now=2.0)
    assert m.ask(B, 1, now=2.0) is WAIT
    assert m.on_timer(now=TIMEOUT_S) == [C]
    assert m.drain_events() == [
        Evicted(C, 0, TIMEOUT_S, False),
        Apply(("a0", "b0"), 0.5, 1, 0, (0, 0)),
        Released(A, 1),
        Released(B, 1),
    ]


def test_server_eviction_drops_the_evicted_waiter(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 1})
    assert m.ask(B, 1, now=0.0) is WAIT
    m.heartbeat(A, 0, done=False, now=3.0)
    assert m.on_timer(now=TIMEOUT_S) == [B]
    assert m.drain_events() == [Evicted(B, 1, TIMEOUT_S, False)]


# --- finished workers -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "staleness"), [("bsp", 0), ("ssp", 1), ("pbsp", 0), ("pssp", 1)])
def test_server_done_worker_never_blocks_a_barrier(rng, name, staleness):
    m = server(rng, name, staleness=staleness, sample=SampleSize(count=10))
    table(m, {A: 0, B: 5})
    m.heartbeat(A, 0, done=True, now=0.0)
    assert m.ask(B, 5, now=0.0) is PROCEED


@pytest.mark.parametrize(("name", "staleness"), [("bsp", 0), ("ssp", 1), ("pbsp", 0), ("pssp", 1)])
def test_server_done_heartbeat_releases_waiters(rng, name, staleness):
    m = server(rng, name, staleness=staleness, sample=SampleSize(count=10))
    table(m, {A: 0, B: 5})
    assert m.ask(B, 5, now=0.0) is WAIT
    m.heartbeat(A, 0, done=True, now=0.0)
    assert m.drain_events() == [Released(B, 5)]


def test_server_done_worker_does_not_hold_a_bsp_round(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0})
    m.heartbeat(A, 0, done=True, now=0.0)
    m.push(B, 0, 0, "b0", now=0.0)
    assert m.drain_events() == [Apply(("b0",), 1.0, 1, 0, (0,))]


@pytest.mark.parametrize("name", ["asp", "ssp", "pbsp", "pssp"])
def test_server_done_worker_does_not_count_in_weights(rng, name):
    m = server(rng, name, staleness=2)
    table(m, {A: 0, B: 0, C: 0})
    m.heartbeat(C, 0, done=True, now=0.0)
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.drain_events() == [Apply(("a0",), 0.5, 1, 0, (0,))]


def test_server_finished_once_min_workers_came_and_all_are_done(rng):
    m = server(rng, "asp", min_workers=2)
    assert not m.finished
    m.register(A, 0, now=0.0)
    m.heartbeat(A, 3, done=True, now=0.0)
    assert not m.finished  # only one of two came
    m.register(B, 0, now=0.0)
    assert not m.finished
    m.register(C, 0, now=0.0)
    m.heartbeat(B, 3, done=True, now=0.0)
    assert not m.finished  # C still trains
    m.heartbeat(C, 3, done=True, now=0.0)
    assert m.finished


def test_server_finished_ignores_evicted_workers(rng):
    m = server(rng, "asp", min_workers=2)
    table(m, {A: 0, B: 0})
    m.heartbeat(A, 1, done=True, now=2.0)
    assert m.on_timer(now=TIMEOUT_S) == [B]
    assert m.finished


def test_server_stays_finished_after_the_finished_workers_leave(rng):
    """Workers exit once done; their eviction must not un-finish the run, but a worker that comes
    back to train does."""
    m = server(rng, "asp", min_workers=2)
    table(m, {A: 0, B: 0})
    m.heartbeat(A, 3, done=True, now=0.0)
    m.heartbeat(B, 3, done=True, now=0.0)
    assert m.on_timer(now=TIMEOUT_S) == [A, B]
    assert m.finished
    m.register(A, 3, now=TIMEOUT_S)
    assert not m.finished


def test_server_is_not_finished_when_every_worker_died_unfinished(rng):
    m = server(rng, "asp", min_workers=1)
    table(m, {A: 0})
    assert m.on_timer(now=TIMEOUT_S) == [A]
    assert not m.finished


# --- refusals ---------------------------------------------------------------------------------

_CALLS: dict[str, Callable[[ServerMachine[str], PeerId], object]] = {
    "push": lambda m, w: m.push(w, 0, 0, "x", now=0.0),
    "heartbeat": lambda m, w: m.heartbeat(w, 0, done=False, now=0.0),
    "ask": lambda m, w: m.ask(w, 0, now=0.0),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_server_unregistered_worker_is_refused(rng, call):
    m = server(rng)
    m.register(A, 0, now=0.0)
    with pytest.raises(Refused) as info:
        _CALLS[call](m, B)
    assert info.value.code == "unknown_worker"
    assert list(m.workers) == [A]


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_server_evicted_worker_is_refused(rng, call):
    m = server(rng)
    m.register(A, 0, now=0.0)
    m.on_timer(now=TIMEOUT_S)
    with pytest.raises(Refused) as info:
        _CALLS[call](m, A)
    assert info.value.code == "unknown_worker"


@pytest.mark.parametrize("name", BARRIER_NAMES)
@pytest.mark.parametrize("step", [0, 1, 3, 4])  # A's next step is 2
def test_server_stale_push_is_refused_and_leaves_the_machine_usable(rng, name, step):
    m = server(rng, name, staleness=2)
    table(m, {A: 0, B: 0})
    for s in range(2):
        m.push(A, s, m.version, f"a{s}", now=0.0)
        m.push(B, s, m.version, f"b{s}", now=0.0)
    m.push(B, 2, m.version, "b2", now=0.0)
    m.drain_events()
    version, before = m.version, steps_of(m)
    with pytest.raises(Refused) as info:
        m.push(A, step, version, "late", now=0.0)
    assert info.value.code == "stale"
    assert (m.version, steps_of(m), m.drain_events()) == (version, before, [])
    m.push(A, 2, version, "a2", now=0.0)
    (update,) = only_applies(m.drain_events())
    assert "late" not in update.payloads
    assert "a2" in update.payloads


# --- cancel -----------------------------------------------------------------------------------


def test_server_cancel_removes_the_waiter(rng):
    m = server(rng, "bsp")
    table(m, {A: 0, B: 0})
    m.push(A, 0, 0, "a0", now=0.0)
    assert m.ask(A, 1, now=0.0) is WAIT
    m.cancel(A)
    m.push(B, 0, 0, "b0", now=0.0)
    assert m.drain_events() == [Apply(("a0", "b0"), 0.5, 1, 0, (0, 0))]
    assert m.ask(A, 1, now=0.0) is PROCEED


def test_server_cancel_of_a_worker_not_waiting_does_nothing(rng):
    m = server(rng, "bsp")
    m.cancel(A)
    m.register(A, 0, now=0.0)
    m.cancel(A)
    assert m.ask(A, 0, now=0.0) is PROCEED
    assert m.drain_events() == []


# --- the table moved by ask -------------------------------------------------------------------


@pytest.mark.parametrize("move", ["heartbeat", "ask"])
def test_server_step_moved_forward_releases_waiters(rng, move):
    """A step report ahead of the table moves it, whether it comes by heartbeat or by ask; a
    waiter the new table lets go is released either way."""
    m = server(rng, "ssp", staleness=0)
    table(m, {A: 0, B: 0})
    m.push(A, 0, 0, "a0", now=0.0)
    m.drain_events()
    assert m.ask(A, 1, now=0.0) is WAIT
    if move == "heartbeat":
        m.heartbeat(B, 1, done=False, now=0.0)
    else:
        assert m.ask(B, 1, now=0.0) is PROCEED
    assert m.drain_events() == [Released(A, 1)]


# --- a reference model ------------------------------------------------------------------------

_POOL = [pid(i) for i in range(4)]
_WORKERS = st.sampled_from(_POOL)
# Powers of two, so every time, deadline and silence is exact; calls move time a little, ticks
# up to twice the timeout.
_DT = st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0])
_TICK = st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])
_KINDS = {Evicted: 0, Apply: 1, Released: 2}


class ServerAgainstModel(RuleBasedStateMachine):
    """Random register/heartbeat/ask/push/cancel/timer calls with time moving forward, checked
    against a model of the table, the waiters and the open BSP rounds. Calls the model expects
    to be refused must raise `Refused` with the expected code; any other exception fails."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.steps: dict[PeerId, int] = {}
        self.done: dict[PeerId, bool] = {}
        self.seen: dict[PeerId, float] = {}
        self.waiting: set[PeerId] = set()
        self.rounds: dict[int, list[int]] = {}
        self.bases: dict[int, int] = {}
        self.n_pushed = self.n_applied = self.n_applies = 0

    @initialize(
        name=st.sampled_from(BARRIER_NAMES),
        staleness=st.integers(0, 2),
        full=st.booleans(),
        min_workers=st.integers(1, 3),
        version=st.sampled_from([0, 7]),
        seed=st.integers(0, 2**16),
        n_workers=st.integers(0, len(_POOL)),
    )
    def start(
        self,
        *,
        name: str,
        staleness: int,
        full: bool,
        min_workers: int,
        version: int,
        seed: int,
        n_workers: int,
    ) -> None:
        sample = SampleSize(count=len(_POOL) if full else 0)
        self.m: ServerMachine[int] = ServerMachine(
            make_params(name, staleness=staleness, sample=sample.count or 0),
            sample,
            heartbeat_timeout_s=TIMEOUT_S,
            rng=random.Random(seed),
            min_workers=min_workers,
            version=version,
        )
        self.min_workers, self.initial_version, self.version = min_workers, version, version
        self.lockstep = name == "bsp"
        bounds = {"bsp": 0, "ssp": staleness, "pbsp": 0, "pssp": staleness}
        self.bound = bounds.get(name) if full or name in ("bsp", "ssp") else None
        for worker in _POOL[:n_workers]:
            self.register(worker, 0, 0.0)

    # -- the model's barrier ---------------------------------------------------------------------
    def training(self) -> list[PeerId]:
        return sorted(p for p in self.steps if not self.done[p])

    def may_go(self, worker: PeerId) -> bool:
        if self.m.n_registered < self.min_workers:
            return False
        my_step = self.steps[worker]
        if self.lockstep and any(s < my_step for s in self.rounds):
            return False
        if self.bound is None:
            return True
        return all(self.steps[p] >= my_step - self.bound for p in self.training() if p != worker)

    def refused(self, code: str, call: Callable[[], object]) -> None:
        version, table = self.m.version, steps_of(self.m)
        with pytest.raises(Refused) as info:
            call()
        assert info.value.code == code
        assert (self.m.version, steps_of(self.m)) == (version, table)

    # -- events ------------------------------------------------------------------------------------
    def settle(
        self, *, evicted: Sequence[PeerId] = (), pushed: tuple[int, int] | None = None
    ) -> None:
        """Check the drained events in order against the model, and update the model."""
        events = self.m.drain_events()
        kinds = [_KINDS[type(e)] for e in events]
        assert kinds == sorted(kinds), "Evicted, then Apply, then Released"
        assert [e.worker for e in events if isinstance(e, Evicted)] == sorted(evicted)
        for event in events:
            match event:
                case Evicted():
                    self.evicted(event)
                case Apply():
                    self.applied(event, pushed)
                case Released():
                    assert event.worker in self.waiting
                    assert self.may_go(event.worker)
                    self.waiting.discard(event.worker)
        if pushed is not None and not self.lockstep:
            assert sum(isinstance(e, Apply) for e in events) == 1

    def evicted(self, event: Evicted) -> None:
        worker = event.worker
        assert event.step == self.steps.pop(worker)
        assert event.done == self.done.pop(worker)
        assert event.silent_s == self.now - self.seen.pop(worker)
        self.waiting.discard(worker)

    def applied(self, event: Apply[int], pushed: tuple[int, int] | None) -> None:
        assert event.version == self.version + 1
        self.version, self.n_applies = event.version, self.n_applies + 1
        before = event.version - 1
        assert event.staleness == tuple(before - self.bases[p] for p in event.payloads)
        if self.lockstep:
            training = [self.steps[p] for p in self.training()]
            assert not training or event.step < min(training), "a round closed early"
            assert list(event.payloads) == self.rounds.pop(event.step)
            assert event.weight == 1 / len(event.payloads)
        else:
            assert pushed is not None
            assert (event.payloads, event.step) == ((pushed[0],), pushed[1])
            assert event.weight == 1 / max(1, len(self.training()))
        self.n_applied += len(event.payloads)

    # -- rules -------------------------------------------------------------------------------------
    @rule(worker=_WORKERS, step=st.integers(0, 4), dt=_DT)
    def register(self, worker: PeerId, step: int, dt: float) -> None:
        self.now += dt
        others = [self.steps[p] for p in self.training() if p != worker]
        expected = max([step, *([min(others)] if others else [])])
        if worker in self.steps:
            expected = max(expected, self.steps[worker])
        assert self.m.register(worker, step, now=self.now) == expected
        self.steps[worker], self.done[worker], self.seen[worker] = expected, False, self.now
        self.settle()

    @rule(
        worker=_WORKERS,
        ahead=st.sampled_from([0, 0, 0, 1]),
        done=st.sampled_from([False, False, False, True]),
        dt=_DT,
    )
    def heartbeat(self, worker: PeerId, ahead: int, done: bool, dt: float) -> None:
        self.now += dt
        if worker not in self.steps:
            self.refused("unknown_worker", lambda: self.m.heartbeat(worker, 0, done=done, now=0))
            return
        self.m.heartbeat(worker, self.steps[worker] + ahead, done=done, now=self.now)
        self.steps[worker] += ahead
        self.seen[worker] = self.now
        if done and not self.done[worker]:
            self.done[worker] = True
            self.waiting.discard(worker)
        self.settle()

    @rule(worker=_WORKERS, behind=st.integers(0, 1), dt=_DT)
    def ask(self, worker: PeerId, behind: int, dt: float) -> None:
        self.now += dt
        if worker not in self.steps:
            self.refused("unknown_worker", lambda: self.m.ask(worker, 0, now=self.now))
            return
        step = max(0, self.steps[worker] - behind)  # never ahead of the table
        expected = PROCEED if self.may_go(worker) else WAIT
        assert self.m.ask(worker, step, now=self.now) is expected
        self.seen[worker] = self.now
        if expected is PROCEED:
            self.waiting.discard(worker)
        else:
            self.waiting.add(worker)
        self.settle()

    @rule(worker=_WORKERS, offset=st.sampled_from([-1, 0, 1]), lag=st.integers(0, 2), dt=_DT)
    def push(self, worker: PeerId, offset: int, lag: int, dt: float) -> None:
        self.now += dt
        if worker not in self.steps:
            self.refused("unknown_worker", lambda: self.m.push(worker, 0, 0, -1, now=self.now))
            return
        step = self.steps[worker] + offset
        if offset != 0:
            self.refused("stale", lambda: self.m.push(worker, step, 0, -1, now=self.now))
            self.seen[worker] = self.now  # a refused push still shows the worker is alive
            return
        token, base = self.n_pushed, max(0, self.m.version - lag)
        self.m.push(worker, step, base, token, now=self.now)
        self.n_pushed += 1
        self.bases[token] = base
        self.steps[worker], self.seen[worker] = step + 1, self.now
        if self.lockstep:
            self.rounds.setdefault(step, []).append(token)
        self.settle(pushed=(token, step))

    @precondition(lambda self: bool(self.training()))
    @rule(index=st.integers(0, len(_POOL) - 1), lag=st.integers(0, 2), dt=_DT)
    def push_next_step(self, index: int, lag: int, dt: float) -> None:
        """A training worker pushes its next step, as a well-behaved worker does."""
        training = self.training()
        self.push(training[index % len(training)], 0, lag, dt)

    @precondition(lambda self: bool(self.training()))
    @rule(lag=st.integers(0, 2), dt=_DT)
    def push_slowest(self, lag: int, dt: float) -> None:
        """The slowest training worker pushes, which is what closes BSP rounds."""
        self.push(min(self.training(), key=lambda p: (self.steps[p], p)), 0, lag, dt)

    @precondition(lambda self: bool(self.training()))
    @rule(lag=st.integers(0, 2), dt=_DT)
    def push_everyone(self, lag: int, dt: float) -> None:
        """Every training worker pushes its next step, which fills BSP rounds."""
        for worker in self.training():
            self.push(worker, 0, lag, dt)

    @precondition(lambda self: bool(self.steps))
    @rule(index=st.integers(0, len(_POOL) - 1), dt=_DT)
    def ask_known(self, index: int, dt: float) -> None:
        known = sorted(self.steps)
        self.ask(known[index % len(known)], 0, dt)

    @rule(worker=_WORKERS)
    def cancel(self, worker: PeerId) -> None:
        self.m.cancel(worker)
        self.waiting.discard(worker)
        self.settle()

    def timer(self) -> None:
        silent = [p for p, seen_at in self.seen.items() if self.now - seen_at >= TIMEOUT_S]
        assert sorted(self.m.on_timer(now=self.now)) == sorted(silent)
        self.settle(evicted=silent)

    @rule(dt=_TICK)
    def tick(self, dt: float) -> None:
        self.now += dt
        self.timer()

    @precondition(lambda self: bool(self.seen))
    @rule()
    def tick_at_the_deadline(self) -> None:
        self.now = max(self.now, min(self.seen.values()) + TIMEOUT_S)
        self.timer()

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def agrees_with_the_model(self) -> None:
        assert self.m.version == self.version
        assert self.m.version == self.initial_version + self.n_applies
        assert steps_of(self.m) == {p: (s, self.done[p]) for p, s in self.steps.items()}
        expected = min(self.seen.values()) + TIMEOUT_S if self.seen else None
        assert self.m.next_deadline() == expected
        assert self.n_applied <= self.n_pushed
        if not self.lockstep:
            assert self.n_applied == self.n_pushed

    @invariant()
    def leaves_nobody_behind(self) -> None:
        """No waiter the table lets go is still waiting, and no complete BSP round is open."""
        for worker in self.waiting:
            assert not self.may_go(worker)
        training = [self.steps[p] for p in self.training()]
        if self.lockstep and self.rounds:
            assert training and min(self.rounds) >= min(training)


TestServerAgainstModel = ServerAgainstModel.TestCase
TestServerAgainstModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
