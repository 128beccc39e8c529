"""The resume rule: keep a checkpoint within the staleness bound of the run, else pull."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pml.core.types import PeerId
from p2pml.errors import ConfigError
from p2pml.protocol.resume import ResumeSource, plan_resume


def pid(i: int) -> PeerId:
    return PeerId(i.to_bytes(20, "big"))


@pytest.mark.parametrize(
    ("checkpoint", "peers", "bound", "source"),
    [
        (40, {}, 4, ResumeSource.CHECKPOINT),  # alone: nothing to pull
        (40, {pid(1): 44}, 4, ResumeSource.CHECKPOINT),  # exactly the bound behind
        (40, {pid(1): 45}, 4, ResumeSource.PEER),  # one step beyond it
        (40, {pid(1): 10}, 4, ResumeSource.CHECKPOINT),  # the run is behind the checkpoint
        (40, {pid(1): 40}, 0, ResumeSource.CHECKPOINT),
        (40, {pid(1): 41}, 0, ResumeSource.PEER),
        (40, {pid(1): 12, pid(2): 160}, 4, ResumeSource.PEER),  # the most advanced peer counts
    ],
)
def test_plan_resume_pulls_only_beyond_the_staleness_bound(checkpoint, peers, bound, source):
    plan = plan_resume(checkpoint, peers, bound=bound)
    assert plan.source is source
    assert plan.run_step == max(peers.values(), default=0)


def test_plan_resume_names_the_most_advanced_peer_and_the_lag():
    plan = plan_resume(40, {pid(3): 160, pid(1): 12, pid(2): 160}, bound=4)
    assert (plan.ahead, plan.run_step, plan.lag, plan.bound) == (pid(2), 160, 120, 4)


@pytest.mark.parametrize(("checkpoint", "bound"), [(-1, 4), (3, -1)])
def test_plan_resume_refuses_negative_steps_and_bounds(checkpoint, bound):
    with pytest.raises(ConfigError):
        plan_resume(checkpoint, {}, bound=bound)


@given(
    checkpoint=st.integers(0, 1000),
    steps=st.lists(st.integers(0, 1000), max_size=6),
    bound=st.integers(0, 50),
)
def test_plan_resume_a_larger_bound_never_turns_keeping_into_pulling(checkpoint, steps, bound):
    peers = {pid(i): s for i, s in enumerate(steps)}
    kept = plan_resume(checkpoint, peers, bound=bound).source is ResumeSource.CHECKPOINT
    looser = plan_resume(checkpoint, peers, bound=bound + 1).source is ResumeSource.CHECKPOINT
    assert looser or not kept
