"""Delta exchange rules: the delivery plan, tensor and age checks, finiteness, the due rule."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pml.core.run import TensorSpec
from p2pml.core.types import PeerId
from p2pml.errors import Refused
from p2pml.protocol.deltas import (
    check_delta,
    check_finite,
    check_finite_tensors,
    check_tensors,
    is_due,
    plan_delivery,
)
from p2pml.protocol.messages import DeltaPush, TensorBlob

SPECS = (TensorSpec("w", "float32", (2, 3)), TensorSpec("b", "float32", (3,)))


def pid(i: int) -> PeerId:
    return PeerId(i.to_bytes(20, "big"))


def peers(n: int) -> list[PeerId]:
    return [pid(i) for i in range(n)]


def blobs(**overrides: np.ndarray) -> tuple[TensorBlob, ...]:
    """Tensors matching SPECS (zeros), with some arrays replaced."""
    arrays = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)} | overrides
    return tuple(TensorBlob.of(name, array) for name, array in arrays.items())


def push(step: int = 4, tensors: tuple[TensorBlob, ...] | None = None) -> DeltaPush:
    return DeltaPush(
        run_id="run-1@0123456789abcdef",
        sender=pid(99),
        step=step,
        base_version=step,
        tensors=blobs() if tensors is None else tensors,
    )


# --- plan_delivery ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_peers", [0, 1, 5, 7])
def test_plan_delivery_small_run_sends_to_every_peer(n_peers, rng):
    others = peers(n_peers)
    plan = plan_delivery(others, full_delivery_max=8, fanout=3, rng=rng)
    assert plan.targets == tuple(others)
    assert plan.n_participants == n_peers + 1
    assert plan.gossip is False
    assert plan.weight == 1.0 / (n_peers + 1)


def test_plan_delivery_at_full_delivery_max_is_still_full(rng):
    others = peers(7)  # with this node: 8 nodes, exactly full_delivery_max
    plan = plan_delivery(others, full_delivery_max=8, fanout=3, rng=rng)
    assert plan.targets == tuple(others)
    assert (plan.n_participants, plan.gossip) == (8, False)


def test_plan_delivery_one_past_full_delivery_max_samples_a_fanout(rng):
    others = peers(8)  # 9 nodes
    plan = plan_delivery(others, full_delivery_max=8, fanout=3, rng=rng)
    assert len(plan.targets) == 3
    assert (plan.n_participants, plan.gossip) == (4, True)


def test_plan_delivery_large_run_sends_to_fanout_distinct_peers(rng):
    others = peers(200)
    plan = plan_delivery(others, full_delivery_max=32, fanout=8, rng=rng)
    assert len(plan.targets) == len(set(plan.targets)) == 8
    assert set(plan.targets) <= set(others)
    assert plan.gossip is True
    assert plan.n_participants == 9
    assert plan.weight == 1.0 / 9


def test_plan_delivery_is_deterministic_for_a_seeded_rng(rng):
    seed = rng.getrandbits(64)
    plans = [
        plan_delivery(peers(100), full_delivery_max=4, fanout=10, rng=random.Random(seed))
        for _ in range(2)
    ]
    assert plans[0] == plans[1]


def test_plan_delivery_draws_different_samples_over_time(rng):
    draws = {
        plan_delivery(peers(100), full_delivery_max=4, fanout=10, rng=rng).targets for _ in range(5)
    }
    assert len(draws) > 1


@settings(max_examples=100)
@given(
    n_peers=st.integers(0, 40),
    full_delivery_max=st.integers(1, 40),
    fanout=st.integers(1, 50),
    seed=st.integers(0, 2**32),
)
def test_plan_delivery_never_targets_more_than_the_peers(n_peers, full_delivery_max, fanout, seed):
    others = peers(n_peers)
    plan = plan_delivery(
        others, full_delivery_max=full_delivery_max, fanout=fanout, rng=random.Random(seed)
    )
    assert len(plan.targets) <= n_peers
    assert len(set(plan.targets)) == len(plan.targets)
    assert set(plan.targets) <= set(others)
    assert 0.0 < plan.weight <= 1.0


# --- check_tensors and check_delta ------------------------------------------------------------


def test_check_tensors_accepts_a_matching_delta():
    check_tensors(blobs(), SPECS)


@pytest.mark.parametrize(
    ("tensors", "code", "fragments"),
    [
        (blobs()[:1], "shape", ["1 tensors", "the model has 2"]),
        ((*blobs(), TensorBlob.of("c", np.zeros(1, np.float32))), "shape", ["3 tensors", "2"]),
        ((), "shape", ["0 tensors", "the model has 2"]),
        (
            (TensorBlob.of("v", np.zeros((2, 3), np.float32)), blobs()[1]),
            "shape",
            ["'v'", "'w'"],
        ),
        (tuple(reversed(blobs())), "shape", ["'b'", "'w'"]),
        (blobs(w=np.zeros((3, 2), np.float32)), "shape", ["'w'", "(3, 2)", "expected (2, 3)"]),
        (blobs(b=np.zeros((3, 1), np.float32)), "shape", ["'b'", "(3, 1)", "expected (3,)"]),
        (blobs(b=np.zeros(4, np.float32)), "shape", ["'b'", "(4,)", "expected (3,)"]),
        (
            blobs(w=np.zeros((2, 3), np.float64)),
            "dtype",
            ["'w'", "float64", "expected float32"],
        ),
        (blobs(b=np.zeros(3, np.int32)), "dtype", ["'b'", "int32", "expected float32"]),
        (blobs(b=np.zeros(3, np.float16)), "dtype", ["'b'", "float16", "expected float32"]),
    ],
)
def test_check_tensors_refuses_a_mismatch(tensors, code, fragments):
    with pytest.raises(Refused) as info:
        check_tensors(tensors, SPECS)
    assert info.value.code == code
    message = str(info.value)
    assert message.startswith("delta ")
    for fragment in fragments:
        assert fragment in message


def test_check_tensors_names_what_is_checked():
    with pytest.raises(Refused, match=r"^model tensor 'w' has shape"):
        check_tensors(blobs(w=np.zeros(6, np.float32)), SPECS, what="model")


def test_check_tensors_checks_the_dtype_before_the_shape():
    with pytest.raises(Refused) as info:
        check_tensors(blobs(w=np.zeros(6, np.float64)), SPECS)
    assert info.value.code == "dtype"


def test_check_delta_accepts_the_newest_delta():
    check_delta(push(step=4), SPECS, completed=5, max_age=0)


def test_check_delta_accepts_a_delta_from_ahead():
    check_delta(push(step=9), SPECS, completed=5, max_age=0)


@pytest.mark.parametrize("max_age", [0, 1, 4])
def test_check_delta_accepts_age_equal_to_max_age(max_age):
    completed = 10
    step = completed - 1 - max_age
    check_delta(push(step=step), SPECS, completed=completed, max_age=max_age)


@pytest.mark.parametrize("max_age", [0, 1, 4])
def test_check_delta_refuses_age_one_past_max_age(max_age):
    completed = 10
    step = completed - 2 - max_age
    with pytest.raises(Refused) as info:
        check_delta(push(step=step), SPECS, completed=completed, max_age=max_age)
    assert info.value.code == "stale"
    message = str(info.value)
    assert f"step {step}" in message
    assert f"{max_age + 1} steps old" in message
    assert f"completed {completed} steps" in message
    assert f"limit is {max_age}" in message


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        (blobs()[:1], "shape"),
        (blobs(w=np.zeros((3, 2), np.float32)), "shape"),
        (blobs(w=np.zeros((2, 3), np.float64)), "dtype"),
    ],
)
def test_check_delta_checks_the_tensors(tensors, code):
    with pytest.raises(Refused) as info:
        check_delta(push(step=4, tensors=tensors), SPECS, completed=5, max_age=0)
    assert info.value.code == code


def test_check_delta_checks_the_tensors_before_the_age():
    stale_and_misshapen = push(step=0, tensors=blobs()[:1])
    with pytest.raises(Refused) as info:
        check_delta(stale_and_misshapen, SPECS, completed=100, max_age=0)
    assert info.value.code == "shape"


def test_check_delta_leaves_finiteness_to_check_finite():
    delta = push(step=4, tensors=blobs(w=np.full((2, 3), np.nan, np.float32)))
    check_delta(delta, SPECS, completed=5, max_age=0)


# --- check_finite -----------------------------------------------------------------------------


def test_check_finite_accepts_finite_values():
    check_finite(push(tensors=blobs(w=np.full((2, 3), 3e38, np.float32))))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_check_finite_refuses_nan_and_infinity(bad, dtype):
    array = np.zeros(3, dtype)
    array[1] = bad
    with pytest.raises(Refused) as info:
        check_finite(push(tensors=blobs(b=array)))
    assert info.value.code == "nonfinite"
    assert "'b'" in str(info.value)


def test_check_finite_names_the_first_bad_tensor():
    tensors = blobs(w=np.full((2, 3), np.inf, np.float32), b=np.full(3, np.nan, np.float32))
    with pytest.raises(Refused, match="'w'"):
        check_finite(push(tensors=tensors))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64])
def test_check_finite_skips_integer_tensors(dtype):
    info = np.iinfo(dtype)
    check_finite_tensors([TensorBlob.of("i", np.array([info.min, 0, info.max], dtype))])


def test_check_finite_tensors_names_what_is_checked():
    with pytest.raises(Refused, match=r"^model tensor 'x' holds NaN"):
        check_finite_tensors([TensorBlob.of("x", np.array([np.nan], np.float32))], "model")


def test_check_finite_accepts_an_empty_tensor():
    check_finite_tensors([TensorBlob.of("e", np.zeros((0, 3), np.float32))])


# --- is_due -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta_step", "completed", "expected"),
    [(0, 1, True), (3, 10, True), (4, 5, True), (5, 5, False), (6, 5, False), (0, 0, False)],
)
def test_is_due_in_lockstep_holds_deltas_of_steps_not_yet_completed(
    delta_step, completed, expected
):
    assert is_due(delta_step, completed, lockstep=True) is expected


@pytest.mark.parametrize(("delta_step", "completed"), [(0, 1), (4, 5), (5, 5), (9, 5), (0, 0)])
def test_is_due_without_lockstep_is_always_due(delta_step, completed):
    assert is_due(delta_step, completed, lockstep=False) is True


def test_plan_delivery_weighs_by_the_targets_when_fewer_peers_than_the_fanout():
    peers = [PeerId(bytes([i]) * 20) for i in range(2)]
    plan = plan_delivery(peers, full_delivery_max=1, fanout=8, rng=random.Random(1))
    assert plan.gossip and len(plan.targets) == 2 and plan.weight == pytest.approx(1 / 3)
