"""SyncMachine: its transition table, invalid inputs, policies, unanswered and finished peers,
the backoff, sample sizes, wait records, and a reference model driven by hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pml.core.barrier import BARRIER_NAMES, Decision, make_params
from p2pml.core.sampling import SampleSize
from p2pml.core.types import PeerId, Step
from p2pml.errors import UnexpectedMessage
from p2pml.protocol.dht import StepReport
from p2pml.protocol.sync import MAX_BLOCKERS, Phase, SyncMachine, WaitRecord

PROCEED, WAIT = Decision.PROCEED, Decision.WAIT
# Powers of two, so deadlines compare exactly.
RECHECK_S = 0.125
RECHECK_MAX_S = 1.0
ESTIMATE = 100.0


def pid(i: int) -> PeerId:
    return PeerId(i.to_bytes(20, "big"))


def at(step: int, *, done: bool = False) -> StepReport:
    return StepReport(Step(step), done)


def machine(
    name: str = "bsp",
    *,
    staleness: int = 0,
    strict: bool = False,
    sample: SampleSize | None = None,
    recheck_s: float = RECHECK_S,
    recheck_max_s: float = RECHECK_MAX_S,
) -> SyncMachine:
    return SyncMachine(
        make_params(name, staleness=staleness, strict=strict),
        sample if sample is not None else SampleSize(count=3),
        recheck_s=recheck_s,
        recheck_max_s=recheck_max_s,
    )


def receive(m: SyncMachine, answers: dict[PeerId, StepReport | None], now: float) -> Decision:
    return m.receive(answers, now=now, population_estimate=ESTIMATE)


def drive_to(m: SyncMachine, phase: Phase) -> None:
    """From IDLE to `phase` at now=0 with my_step=5 (a bsp machine; pid(1) blocks)."""
    if phase is Phase.IDLE:
        return
    m.begin(Step(5), now=0.0)
    if phase is Phase.BACKOFF:
        assert receive(m, {pid(1): at(0)}, 0.0) is WAIT
    assert m.phase is phase


# --- the transition table ---------------------------------------------------------------------


def test_sync_starts_idle_without_deadline_or_events():
    m = machine()
    assert m.phase is Phase.IDLE
    assert m.next_deadline() is None
    assert m.drain_events() == []


def test_sync_begin_moves_idle_to_asking():
    m = machine()
    m.begin(Step(5), now=1.0)
    assert m.phase is Phase.ASKING
    assert m.next_deadline() is None
    assert m.drain_events() == []


def test_sync_receive_proceed_moves_asking_to_idle_with_a_record():
    m = machine()
    m.begin(Step(5), now=1.0)
    assert receive(m, {pid(1): at(5)}, 1.5) is PROCEED
    assert m.phase is Phase.IDLE
    assert m.next_deadline() is None
    assert m.drain_events() == [
        WaitRecord(step=5, wait_s=0.5, n_checks=1, n_asked=1, n_unanswered=0, blocked_on=())
    ]


def test_sync_receive_wait_moves_asking_to_backoff_with_a_deadline():
    m = machine()
    m.begin(Step(5), now=1.0)
    assert receive(m, {pid(1): at(4)}, 2.0) is WAIT
    assert m.phase is Phase.BACKOFF
    assert m.next_deadline() == 2.0 + RECHECK_S
    assert m.drain_events() == []


def test_sync_on_timer_at_the_deadline_moves_backoff_to_asking():
    m = machine()
    drive_to(m, Phase.BACKOFF)
    assert m.on_timer(now=RECHECK_S) is True
    assert m.phase is Phase.ASKING
    assert m.next_deadline() is None


def test_sync_on_timer_after_the_deadline_moves_backoff_to_asking():
    m = machine()
    drive_to(m, Phase.BACKOFF)
    assert m.on_timer(now=10.0) is True
    assert m.phase is Phase.ASKING


def test_sync_on_timer_before_the_deadline_stays_in_backoff():
    m = machine()
    drive_to(m, Phase.BACKOFF)
    assert m.on_timer(now=RECHECK_S / 2) is False
    assert m.phase is Phase.BACKOFF
    assert m.next_deadline() == RECHECK_S


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.ASKING])
def test_sync_on_timer_outside_backoff_does_nothing(phase):
    m = machine()
    drive_to(m, phase)
    assert m.on_timer(now=100.0) is False
    assert m.phase is phase
    assert m.next_deadline() is None


def test_sync_recheck_after_backoff_can_proceed():
    m = machine()
    drive_to(m, Phase.BACKOFF)
    m.on_timer(now=RECHECK_S)
    assert receive(m, {pid(2): at(5)}, RECHECK_S) is PROCEED
    assert m.phase is Phase.IDLE
    (record,) = m.drain_events()
    assert record.n_checks == 2


# --- invalid (phase, input) pairs -------------------------------------------------------------


def _finish(m: SyncMachine, now: float) -> WaitRecord:
    """Drive `m` from any phase to PROCEED with one answer per check; return the record."""
    if m.phase is Phase.IDLE:
        m.begin(Step(3), now=now)
    if m.phase is Phase.BACKOFF:
        deadline = m.next_deadline()
        assert deadline is not None
        assert m.on_timer(now=deadline) is True
        now = deadline
    assert receive(m, {pid(9): at(100)}, now) is PROCEED
    (record,) = m.drain_events()
    return record


@pytest.mark.parametrize(
    ("phase", "call", "step", "n_checks", "n_asked", "blocked_on"),
    [
        (Phase.ASKING, "begin", 5, 1, 1, ()),
        (Phase.BACKOFF, "begin", 5, 2, 2, (pid(1),)),
        (Phase.IDLE, "receive", 3, 1, 1, ()),
        (Phase.BACKOFF, "receive", 5, 2, 2, (pid(1),)),
    ],
)
def test_sync_invalid_input_raises_and_leaves_the_machine_usable(
    phase, call, step, n_checks, n_asked, blocked_on
):
    m = machine()
    drive_to(m, phase)
    deadline = m.next_deadline()
    with pytest.raises(UnexpectedMessage, match=phase.value):
        if call == "begin":
            m.begin(Step(7), now=0.01)
        else:
            receive(m, {pid(2): at(0), pid(3): None}, 0.01)
    assert m.phase is phase
    assert m.next_deadline() == deadline
    assert m.drain_events() == []
    record = _finish(m, 0.02)
    # the refused call changed neither the step waited for nor the counters
    assert (record.step, record.n_checks, record.n_asked) == (step, n_checks, n_asked)
    assert record.n_unanswered == 0
    assert record.blocked_on == blocked_on


# --- policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "staleness", "strict", "peer_steps", "expected"),
    [
        ("bsp", 0, False, [5, 9], PROCEED),
        ("bsp", 0, False, [4, 9], WAIT),
        ("ssp", 2, False, [3, 5], PROCEED),
        ("ssp", 2, False, [2, 5], WAIT),
        ("ssp", 2, True, [4], PROCEED),
        ("ssp", 2, True, [3], WAIT),
        ("ssp", 0, False, [4], WAIT),
        ("asp", 0, False, [0, 1], PROCEED),
        ("pbsp", 0, False, [5, 6], PROCEED),
        ("pbsp", 0, False, [5, 4], WAIT),
        ("pssp", 1, False, [4], PROCEED),
        ("pssp", 1, False, [3], WAIT),
        ("pssp", 3, True, [3], PROCEED),
        ("pssp", 3, True, [2], WAIT),
    ],
)
def test_sync_decides_per_policy(name, staleness, strict, peer_steps, expected):
    m = machine(name, staleness=staleness, strict=strict)
    m.begin(Step(5), now=0.0)
    answers = {pid(i): at(s) for i, s in enumerate(peer_steps)}
    assert receive(m, answers, 0.0) is expected


@pytest.mark.parametrize("name", BARRIER_NAMES)
def test_sync_no_answers_proceeds(name):
    m = machine(name, staleness=1)
    m.begin(Step(5), now=0.0)
    assert receive(m, {}, 0.0) is PROCEED


def test_sync_blocked_peers_are_recorded_only_behind_the_bound():
    m = machine("ssp", staleness=2)
    m.begin(Step(10), now=0.0)
    assert receive(m, {pid(1): at(7), pid(2): at(8), pid(3): at(3)}, 0.0) is WAIT
    assert _finish(m, 0.0).blocked_on == (pid(1), pid(3))


# --- unanswered and finished peers ------------------------------------------------------------


@pytest.mark.parametrize("name", BARRIER_NAMES)
def test_sync_unanswered_peers_never_block(name):
    m = machine(name, staleness=1)
    m.begin(Step(5), now=0.0)
    assert receive(m, {pid(1): None, pid(2): None}, 0.0) is PROCEED


def test_sync_unanswered_peers_are_left_out_of_the_decision():
    m = machine("pbsp")
    m.begin(Step(5), now=0.0)
    assert receive(m, {pid(1): None, pid(2): at(5), pid(3): None}, 0.0) is PROCEED
    (record,) = m.drain_events()
    assert (record.n_asked, record.n_unanswered, record.blocked_on) == (3, 2, ())


def test_sync_unanswered_peers_are_counted_over_every_check():
    m = machine("pbsp")
    m.begin(Step(5), now=0.0)
    assert receive(m, {pid(1): None, pid(2): at(0)}, 0.0) is WAIT
    m.on_timer(now=RECHECK_S)
    assert receive(m, {pid(3): None, pid(4): None, pid(5): at(6)}, RECHECK_S) is PROCEED
    (record,) = m.drain_events()
    assert (record.n_checks, record.n_asked, record.n_unanswered) == (2, 5, 3)
    assert record.blocked_on == (pid(2),)


@pytest.mark.parametrize("name", ["bsp", "ssp", "pbsp", "pssp"])
def test_sync_finished_peers_never_block(name):
    m = machine(name, staleness=1)
    m.begin(Step(50), now=0.0)
    assert receive(m, {pid(1): at(0, done=True), pid(2): at(50)}, 0.0) is PROCEED


def test_sync_finished_peers_are_not_named_as_blockers():
    m = machine("bsp")
    m.begin(Step(5), now=0.0)
    assert receive(m, {pid(1): at(0, done=True), pid(2): at(1)}, 0.0) is WAIT
    record = _finish(m, 0.0)
    assert record.blocked_on == (pid(2),)
    assert record.n_unanswered == 0


# --- backoff ----------------------------------------------------------------------------------


def _wait_once(m: SyncMachine, now: float) -> float:
    """One blocked check at `now`; return the backoff it armed."""
    assert receive(m, {pid(1): at(0)}, now) is WAIT
    deadline = m.next_deadline()
    assert deadline is not None
    assert m.on_timer(now=deadline) is True
    return deadline - now


def test_sync_backoff_doubles_up_to_the_maximum():
    m = machine()
    m.begin(Step(5), now=0.0)
    now, backoffs = 0.0, []
    for _ in range(6):
        backoffs.append(_wait_once(m, now))
        now += backoffs[-1]
    assert backoffs == [0.125, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_sync_backoff_resets_on_the_next_begin():
    m = machine()
    m.begin(Step(5), now=0.0)
    now = 0.0
    for _ in range(4):
        now += _wait_once(m, now)
    assert receive(m, {pid(1): at(5)}, now) is PROCEED
    m.begin(Step(6), now=now)
    assert _wait_once(m, now) == RECHECK_S


def test_sync_backoff_maximum_below_recheck_keeps_recheck():
    m = machine(recheck_s=0.5, recheck_max_s=0.125)
    m.begin(Step(5), now=0.0)
    assert [_wait_once(m, float(i)) for i in range(3)] == [0.5, 0.5, 0.5]


# --- sample sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sample", "estimate", "expected"),
    [
        ("bsp", SampleSize(count=10), 100.0, None),
        ("ssp", SampleSize(fraction=0.5), 100.0, None),
        ("asp", SampleSize(count=10), 100.0, 0),
        ("asp", SampleSize(fraction=0.5), 100.0, 0),
        ("pbsp", SampleSize(count=7), 100.0, 7),
        ("pssp", SampleSize(count=7), 3.0, 7),
        ("pbsp", SampleSize(count=0), 100.0, 0),
        ("pbsp", SampleSize(fraction=0.05), 200.0, 10),
        ("pssp", SampleSize(fraction=0.05), 400.0, 20),
        ("pssp", SampleSize(fraction=0.05), 3.0, 1),
        ("pbsp", SampleSize(fraction=0.0), 1000.0, 0),
    ],
)
def test_sync_sample_size_per_policy(name, sample, estimate, expected):
    m = machine(name, staleness=2, sample=sample)
    assert m.sample_size(estimate) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bsp", True), ("ssp", True), ("asp", False), ("pbsp", False), ("pssp", False)],
)
def test_sync_asks_everyone_only_for_bsp_and_ssp(name, expected):
    assert machine(name, staleness=1).asks_everyone is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bsp", True), ("ssp", False), ("asp", False), ("pbsp", False), ("pssp", False)],
)
def test_sync_lockstep_only_for_bsp(name, expected):
    assert machine(name, staleness=1).lockstep is expected


# --- wait records -----------------------------------------------------------------------------


def test_sync_wait_record_fields():
    m = machine("pbsp")
    m.begin(Step(9), now=2.0)
    assert receive(m, {pid(3): at(1), pid(1): at(2), pid(4): None}, 2.0) is WAIT
    assert m.on_timer(now=2.125) is True
    assert receive(m, {pid(2): at(0), pid(3): at(8), pid(1): at(9)}, 2.125) is WAIT
    assert m.on_timer(now=2.375) is True
    assert receive(m, {pid(5): at(9), pid(6): None}, 2.5) is PROCEED
    assert m.drain_events() == [
        WaitRecord(
            step=9,
            wait_s=0.5,
            n_checks=3,
            n_asked=8,
            n_unanswered=2,
            blocked_on=(pid(1), pid(3), pid(2)),  # sorted within a check, first seen first
        )
    ]
    assert m.drain_events() == []


def test_sync_wait_record_names_each_blocker_once():
    m = machine()
    m.begin(Step(5), now=0.0)
    for _ in range(3):
        _wait_once(m, 0.0)
    assert _finish(m, 0.0).blocked_on == (pid(1),)


def test_sync_wait_record_names_at_most_max_blockers_lowest_ids_first():
    m = machine()
    m.begin(Step(5), now=0.0)
    answers = {pid(i): at(0) for i in reversed(range(MAX_BLOCKERS + 10))}
    assert receive(m, answers, 0.0) is WAIT
    m.on_timer(now=RECHECK_S)
    assert receive(m, {pid(1000): at(0)}, RECHECK_S) is WAIT
    record = _finish(m, RECHECK_S)
    assert record.blocked_on == tuple(pid(i) for i in range(MAX_BLOCKERS))


def test_sync_wait_record_of_an_immediate_pass_is_zero_wait():
    m = machine("asp")
    m.begin(Step(0), now=7.0)
    assert receive(m, {pid(1): at(0)}, 7.0) is PROCEED
    assert m.drain_events() == [
        WaitRecord(step=0, wait_s=0.0, n_checks=1, n_asked=1, n_unanswered=0, blocked_on=())
    ]


def test_sync_wait_s_is_never_negative():
    m = machine()
    m.begin(Step(1), now=5.0)
    receive(m, {}, 4.0)
    (record,) = m.drain_events()
    assert record.wait_s == 0.0


def test_sync_records_accumulate_until_drained():
    m = machine("asp")
    for step in range(3):
        m.begin(Step(step), now=float(step))
        receive(m, {}, float(step))
    assert [r.step for r in m.drain_events()] == [0, 1, 2]
    assert m.drain_events() == []


# --- a reference model ------------------------------------------------------------------------

_MODEL_RECHECK_S = 0.01
_MODEL_RECHECK_MAX_S = 0.08
# Time steps that hit backoff deadlines exactly as well as before and after them.
_TIMES = st.sampled_from([0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.08])
# One code per answer: -2 and -1 no answer, 0-8 a step, 9 and 10 finished at step 0 or 1.
_CODES = st.lists(st.integers(-2, 10), max_size=8)


def _answers(offset: int, codes: list[int]) -> dict[PeerId, StepReport | None]:
    """Answers from distinct peers out of 20, in no particular id order."""
    peers = [pid((offset + 7 * i) % 20) for i in range(len(codes))]
    return {
        p: None if c < 0 else at(c) if c <= 8 else at(c - 9, done=True)
        for p, c in zip(peers, codes, strict=True)
    }


class SyncAgainstModel(RuleBasedStateMachine):
    """Random begin/receive/on_timer calls with time moving forward, checked against a model:
    proceed iff every answered peer that has not finished is at my_step - bound or beyond."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.phase = "idle"
        self.deadline: float | None = None
        self.backoff = _MODEL_RECHECK_S
        self.my_step = 0
        self.began = 0.0
        self.checks = self.asked = self.unanswered = 0
        self.blockers: list[PeerId] = []

    @initialize(
        name=st.sampled_from(BARRIER_NAMES), staleness=st.integers(0, 2), strict=st.booleans()
    )
    def start(self, name: str, staleness: int, strict: bool) -> None:
        if strict:
            staleness = max(1, staleness)
        self.sync = SyncMachine(
            make_params(name, staleness=staleness, strict=strict),
            SampleSize(count=3),
            recheck_s=_MODEL_RECHECK_S,
            recheck_max_s=_MODEL_RECHECK_MAX_S,
        )
        bounds = {
            "bsp": 0,
            "pbsp": 0,
            "ssp": staleness - int(strict),
            "pssp": staleness - int(strict),
        }
        self.bound = bounds.get(name, math.inf)  # asp: no bound

    @rule(my_step=st.integers(0, 6), dt=_TIMES)
    def begin(self, my_step: int, dt: float) -> None:
        self.now += dt
        if self.phase != "idle":
            with pytest.raises(UnexpectedMessage):
                self.sync.begin(Step(my_step), now=self.now)
            return
        self.sync.begin(Step(my_step), now=self.now)
        self.phase, self.my_step, self.began = "asking", my_step, self.now
        self.backoff = _MODEL_RECHECK_S
        self.checks = self.asked = self.unanswered = 0
        self.blockers = []

    @rule(
        offset=st.integers(0, 19),
        codes=_CODES,
        dt=_TIMES,
        estimate=st.sampled_from([0.0, 0.5, 7.0, 1e4]),
    )
    def receive(self, offset: int, codes: list[int], dt: float, estimate: float) -> None:
        self.now += dt
        answers = _answers(offset, codes)
        if self.phase != "asking":
            with pytest.raises(UnexpectedMessage):
                self.sync.receive(answers, now=self.now, population_estimate=estimate)
            return
        decision = self.sync.receive(answers, now=self.now, population_estimate=estimate)
        self.checks += 1
        self.asked += len(answers)
        self.unanswered += sum(a is None for a in answers.values())
        floor = self.my_step - self.bound
        behind = sorted(
            p for p, a in answers.items() if a is not None and not a.done and a.step < floor
        )
        if not behind:
            assert decision is PROCEED
            assert self.sync.drain_events() == [
                WaitRecord(
                    step=self.my_step,
                    wait_s=self.now - self.began,
                    n_checks=self.checks,
                    n_asked=self.asked,
                    n_unanswered=self.unanswered,
                    blocked_on=tuple(self.blockers),
                )
            ]
            self.phase, self.deadline = "idle", None
            return
        assert decision is WAIT
        for p in behind:
            if p not in self.blockers and len(self.blockers) < MAX_BLOCKERS:
                self.blockers.append(p)
        self.phase, self.deadline = "backoff", self.now + self.backoff
        self.backoff = min(2 * self.backoff, _MODEL_RECHECK_MAX_S)

    def _timer(self) -> None:
        due = self.phase == "backoff" and self.deadline is not None and self.now >= self.deadline
        assert self.sync.on_timer(now=self.now) is due
        if due:
            self.phase, self.deadline = "asking", None

    @rule(dt=_TIMES)
    def timer(self, dt: float) -> None:
        self.now += dt
        self._timer()

    @precondition(lambda self: self.deadline is not None)
    @rule()
    def timer_at_the_deadline(self) -> None:
        """The driver's timer fires exactly at `next_deadline()`."""
        assert self.deadline is not None
        self.now = max(self.now, self.deadline)
        self._timer()

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert self.sync.phase.value == self.phase
        assert self.sync.next_deadline() == self.deadline
        assert self.sync.drain_events() == []


TestSyncAgainstModel = SyncAgainstModel.TestCase
TestSyncAgainstModel.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
