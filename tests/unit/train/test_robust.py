"""Robust aggregation in the trainer and the parameter server (issue 8): the plain mean is today's
path exactly, a robust rule outvotes a sign-flipped delta x 100 within a step's group, groups too
small to outvote anything go through unchanged, non-finite or out-of-line deltas never reach the
model and are counted, and the warning about them is rate-limited."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from p2pml.core.run import NodeConfig
from p2pml.core.types import PeerId
from p2pml.errors import ConfigError
from p2pml.node.server import ParameterServer
from p2pml.protocol.aggregate import AggregationConfig
from p2pml.protocol.messages import DeltaPush, TensorBlob
from p2pml.protocol.server import Apply
from p2pml.train.loop import Trainer
from p2pml.train.robust import WARN_EVERY_S, RobustAggregator
from p2pml.train.tensors import run_manifest, trainable

WEIGHT = 1 / 6


class Driver:
    """Just enough of a `StepDriver` to build a `Trainer` (no step is run)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.manifest = run_manifest("robust", model, {})
        self.counters: Counter[str] = Counter()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def peer(i: int) -> PeerId:
    return PeerId(bytes([i]) * 20)


def direction(m: torch.nn.Module) -> list[np.ndarray]:
    gen = np.random.default_rng(0)
    return [gen.standard_normal(tuple(p.shape)).astype(np.float32) for p in m.parameters()]


def push(arrays: list[np.ndarray], *, sender: int = 1, step: int = 0) -> DeltaPush:
    names = ["weight", "bias"]
    blobs = tuple(
        TensorBlob(n, np.ascontiguousarray(a)) for n, a in zip(names, arrays, strict=True)
    )
    return DeltaPush("robust@x", peer(sender), step, step, blobs)


def honest(base: list[np.ndarray], n: int, *, step: int = 0, first: int = 1) -> list[DeltaPush]:
    gen = np.random.default_rng(step + 1)
    return [
        push(
            [b + 0.01 * gen.standard_normal(b.shape).astype(np.float32) for b in base],
            sender=first + i,
            step=step,
        )
        for i in range(n)
    ]


def attack(base: list[np.ndarray], *, step: int = 0, sender: int = 99) -> DeltaPush:
    return push([-100.0 * b for b in base], sender=sender, step=step)


def params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def moved(m: torch.nn.Module, before: list[torch.Tensor]) -> list[np.ndarray]:
    return [(p.detach() - b).numpy() for p, b in zip(m.parameters(), before, strict=True)]


def plain_sum(deltas: list[DeltaPush], weight: float) -> list[np.ndarray]:
    return [sum(weight * d.tensors[k].array for d in deltas) for k in range(2)]  # type: ignore[misc]


def trainer(m: torch.nn.Module, config: AggregationConfig | None = None) -> Trainer:
    return Trainer(Driver(m), m, torch.optim.SGD(m.parameters(), lr=0.1), aggregation=config)


# -- the trainer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, AggregationConfig()])
def test_trainer_mean_path_adds_every_delta_exactly_as_before(config):
    m = model()
    t = trainer(m, config)
    assert t._robust is None  # the plain mean takes today's code path
    deltas = [*honest(direction(m), 3), *honest(direction(m), 2, step=1, first=5)]
    before = params(m)
    t._apply_deltas(deltas, WEIGHT)
    want = [b.clone() for b in before]
    for d in deltas:  # the same additions in the same order: bit for bit
        for w, blob in zip(want, d.tensors, strict=True):
            w.add_(torch.from_numpy(blob.array), alpha=WEIGHT)
    for got, expected in zip(m.parameters(), want, strict=True):
        assert torch.equal(got.detach(), expected)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "centered_clip"])
def test_trainer_robust_rule_outvotes_a_sign_flipped_delta_times_100(rule):
    m = model()
    base = direction(m)
    good = honest(base, 4)
    target = plain_sum(good, WEIGHT * 5 / 4)  # what 5 honest deltas would have added
    scale = float(np.sqrt(sum(np.sum(a * a) for a in target)))

    def error(config: AggregationConfig) -> float:
        mm = model()
        before = params(mm)
        trainer(mm, config)._apply_deltas([*good, attack(base)], WEIGHT)
        got = moved(mm, before)
        return float(np.sqrt(sum(np.sum((g - w) ** 2) for g, w in zip(got, target, strict=True))))

    assert error(AggregationConfig()) > 10 * scale  # the plain mean is wrecked
    assert error(AggregationConfig.build(rule, norm_factor=0)) < 0.2 * scale


@pytest.mark.parametrize("n", [1, 2])
def test_trainer_groups_smaller_than_three_go_through_unchanged(n):
    m = model()
    t = trainer(m, AggregationConfig.build("median", norm_factor=0))
    deltas = [*honest(direction(m), n - 1), attack(direction(m))]
    before = params(m)
    t._apply_deltas(deltas, WEIGHT)
    for got, want in zip(moved(m, before), plain_sum(deltas, WEIGHT), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_trainer_groups_deltas_by_step_and_counts_its_own_change_as_a_vote():
    m = model()
    base = direction(m)
    t = trainer(m, AggregationConfig.build("median", norm_factor=0))
    # step 3: one honest delta and the attacker's; alone they are too few to outvote it
    pair = [*honest(base, 1, step=3), attack(base, step=3)]
    before = params(m)
    t._apply_deltas(pair, WEIGHT)
    assert np.linalg.norm(moved(m, before)[0]) > 10 * WEIGHT * np.linalg.norm(base[0])
    # with this node's own change as a third vote the median holds
    t._robust.own_change(honest(base, 1, first=50)[0].tensors)  # type: ignore[union-attr]
    before = params(m)
    t._apply_deltas(pair, WEIGHT)
    got = moved(m, before)[0]
    np.testing.assert_allclose(got, 2 * WEIGHT * base[0], rtol=0.1, atol=0.05)
    # two steps of two deltas each: each step's group is combined on its own
    before = params(m)
    t._apply_deltas([*pair, *honest(base, 1, step=4), attack(base, step=4)], WEIGHT)
    np.testing.assert_allclose(moved(m, before)[0], 4 * WEIGHT * base[0], rtol=0.1, atol=0.05)


@pytest.mark.parametrize("factor", [0.0, 10.0])
def test_trainer_never_lets_a_nonfinite_delta_reach_the_model(factor):
    m = model()
    t = trainer(m, AggregationConfig.build("median", norm_factor=factor))
    bad = push([np.full((3, 4), np.nan, np.float32), np.full(3, np.inf, np.float32)])
    t._apply_deltas([*honest(direction(m), 3, first=2), bad], WEIGHT)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    t._count_dropped()
    assert t.node.counters["rejected_outlier"] == 1


def test_norm_filter_drops_an_out_of_line_delta_counts_it_and_warns_once_per_sender(caplog):
    m = model()
    robust = RobustAggregator(AggregationConfig.build("mean", norm_factor=10), trainable(m))
    base = direction(m)
    for own in honest(base, 4, first=40):  # this node's own changes arm the filter
        robust.own_change(own.tensors)
    before = params(m)
    robust.apply([*honest(base, 2), attack(base), attack(base, step=1)], WEIGHT)
    good = plain_sum(honest(base, 2), WEIGHT)
    for got, want in zip(moved(m, before), good, strict=True):  # only the honest two
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    counters: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, logger="p2pml.train.robust"):
        dropped = robust.count_dropped(counters, now=100.0)
        robust.apply([attack(base, step=2)], WEIGHT)
        robust.count_dropped(counters, now=100.0 + WARN_EVERY_S / 2)
        robust.apply([attack(base, step=3)], WEIGHT)
        robust.count_dropped(counters, now=100.0 + WARN_EVERY_S)
    assert counters["rejected_outlier"] == 4
    assert [d.step for d in dropped] == [0, 1] and dropped[0].limit is not None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("rejected_outlier" in w for w in warnings)
    assert "step 0 from 63636363" in warnings[0] and "step 3" in warnings[1]


def test_norm_filter_admits_everything_while_it_warms_up():
    m = model()
    robust = RobustAggregator(AggregationConfig.build("mean", norm_factor=10), trainable(m))
    robust.apply([attack(direction(m))], WEIGHT)  # no norms to compare with yet
    assert robust.count_dropped(Counter(), now=0.0) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "mode"}, "aggregation"),
        ({"trim": 0.5}, "trim"),
        ({"radius": 0.0}, "radius"),
        ({"norm_factor": 1.0}, "norm_factor"),
        ({"norm_factor": float("nan")}, "norm_factor"),
    ],
)
def test_bad_aggregation_configs_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        AggregationConfig.build(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("rule", "factor", "expected"), [("mean", None, 0.0), ("median", None, 10.0), ("median", 0, 0)]
)
def test_the_norm_filter_is_on_by_default_only_with_a_robust_rule(rule, factor, expected):
    assert AggregationConfig.build(rule, norm_factor=factor).norm_factor == expected


# -- the parameter server -------------------------------------------------------------------------


def server(m: torch.nn.Module, config: AggregationConfig) -> ParameterServer:
    blobs = [TensorBlob(n, p.detach().numpy()) for n, p in trainable(m)]
    return ParameterServer(NodeConfig(), run_manifest("robust", m, {}), blobs, aggregation=config)


def round_of(deltas: list[DeltaPush]) -> Apply[DeltaPush]:
    n = len(deltas)
    return Apply(tuple(deltas), 1.0 / n, 1, 0, (0,) * n)


def test_server_combines_a_bsp_round_by_the_rule():
    m = model()
    base = direction(m)
    good = honest(base, 4)
    ps = server(m, AggregationConfig.build("median", norm_factor=0))
    before = params(m)
    ps._apply(round_of([*good, attack(base)]))
    np.testing.assert_allclose(moved(m, before)[0], base[0], rtol=0.05, atol=0.03)


def test_server_drops_an_outlier_and_applies_the_mean_of_the_rest():
    m = model()
    base = direction(m)
    ps = server(m, AggregationConfig.build("mean", norm_factor=10))
    ps._apply(round_of(honest(base, 4, step=0)))  # arms the filter
    before = params(m)
    good = honest(base, 3, step=1)
    ps._apply(round_of([*good, attack(base, step=1)]))
    for got, want in zip(moved(m, before), plain_sum(good, 1 / 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ps._count_dropped()
    assert ps.counters["rejected_outlier"] == 1
