"""Barrier policies: `BarrierView`, `Decision`, the bsp/ssp/asp/pbsp/pssp rules and their registry.

A policy is a pure, total, deterministic function of ``(view, params)``. It never samples: for pBSP
and pSSP the caller draws the sample (``core/sampling.py``) and puts only the sampled peers in the
view, so the probabilistic barriers are the BSP and SSP rules applied to a sample (Wang, Catterall
and Mortier, "Probabilistic Synchronous Parallel", arXiv 1709.07772, section 3). Staleness is
counted in steps.

Must not import asyncio, sockets, threads, time, module-level random, logging configuration or
torch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, assert_never

from p2pml.core.types import PeerId, Step
from p2pml.errors import ConfigError

__all__ = [
    "BARRIER_NAMES",
    "AspParams",
    "BarrierParams",
    "BarrierView",
    "BspParams",
    "Decision",
    "PbspParams",
    "PolicySpec",
    "PsspParams",
    "SspParams",
    "asp",
    "bsp",
    "decide",
    "get_policy",
    "make_params",
    "min_peer_step",
    "pbsp",
    "pssp",
    "ssp",
]


class Decision(enum.Enum):
    """What a barrier tells a node that has finished a step."""

    PROCEED = "proceed"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class BarrierView:
    """What a node sees when it checks its barrier.

    Attributes:
        my_step: steps this node has completed.
        peer_steps: completed steps of the observed (or sampled) peers, never including this node.
        population_estimate: the node's estimate of the population size N (>= 1).
    """

    my_step: Step
    peer_steps: Mapping[PeerId, Step]
    population_estimate: float


@dataclass(frozen=True, slots=True)
class BspParams:
    """Bulk synchronous parallel: every node must have reached my step."""


@dataclass(frozen=True, slots=True)
class AspParams:
    """Asynchronous parallel: never wait."""


@dataclass(frozen=True, slots=True)
class SspParams:
    """Stale synchronous parallel: no node may be more than `staleness` steps behind me.

    With ``strict`` a lag of exactly `staleness` also blocks (some systems count this way), so
    ``strict`` needs ``staleness >= 1`` and SSP(s, strict) equals SSP(s - 1).
    """

    staleness: int
    strict: bool = False


@dataclass(frozen=True, slots=True)
class PbspParams:
    """Probabilistic BSP: the BSP rule over `sample` peers drawn uniformly at random."""

    sample: int


@dataclass(frozen=True, slots=True)
class PsspParams:
    """Probabilistic SSP: the SSP rule over `sample` peers drawn uniformly at random."""

    sample: int
    staleness: int
    strict: bool = False


BarrierParams = BspParams | AspParams | SspParams | PbspParams | PsspParams


def min_peer_step(params: BarrierParams, my_step: int) -> int | None:
    """The lowest step an observed peer may have for the barrier to proceed.

    Every policy here is "proceed iff every observed peer has reached this step"; ASP has no such
    step and returns None. The simulator's analytic fast path uses this to stay the same rule.
    """
    match params:
        case BspParams() | PbspParams():
            return my_step
        case SspParams() | PsspParams():
            return my_step - params.staleness + (1 if params.strict else 0)
        case AspParams():
            return None
        case _:
            assert_never(params)


def _all_reached(view: BarrierView, lowest: int | None) -> Decision:
    if lowest is None or all(step >= lowest for step in view.peer_steps.values()):
        return Decision.PROCEED
    return Decision.WAIT


def bsp(view: BarrierView, params: BspParams) -> Decision:
    """Proceed iff every observed peer has completed at least as many steps as I have."""
    return _all_reached(view, min_peer_step(params, view.my_step))


def ssp(view: BarrierView, params: SspParams) -> Decision:
    """Proceed iff no observed peer lags me by more than `staleness` steps (`strict`: s or more)."""
    return _all_reached(view, min_peer_step(params, view.my_step))


def asp(view: BarrierView, params: AspParams) -> Decision:
    """Always proceed."""
    return Decision.PROCEED


def pbsp(view: BarrierView, params: PbspParams) -> Decision:
    """The BSP rule over the sampled peers in `view` (an empty sample proceeds, as ASP)."""
    return _all_reached(view, min_peer_step(params, view.my_step))


def pssp(view: BarrierView, params: PsspParams) -> Decision:
    """The SSP rule over the sampled peers in `view` (an empty sample proceeds, as ASP)."""
    return _all_reached(view, min_peer_step(params, view.my_step))


def decide(view: BarrierView, params: BarrierParams) -> Decision:
    """Apply the policy that `params` belongs to."""
    match params:
        case BspParams():
            return bsp(view, params)
        case SspParams():
            return ssp(view, params)
        case AspParams():
            return asp(view, params)
        case PbspParams():
            return pbsp(view, params)
        case PsspParams():
            return pssp(view, params)
        case _:
            assert_never(params)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A registry entry: the policy's name, whether it samples and whether it uses a staleness."""

    name: str
    sampled: bool
    uses_staleness: bool
    build: Callable[[int, int, bool], BarrierParams]


def _build_ssp(sample: int, staleness: int, strict: bool) -> BarrierParams:
    return SspParams(staleness, strict)


def _build_pbsp(sample: int, staleness: int, strict: bool) -> BarrierParams:
    return PbspParams(sample)


def _build_pssp(sample: int, staleness: int, strict: bool) -> BarrierParams:
    return PsspParams(sample, staleness, strict)


_REGISTRY: Final[Mapping[str, PolicySpec]] = {
    "bsp": PolicySpec("bsp", False, False, lambda _b, _s, _t: BspParams()),
    "ssp": PolicySpec("ssp", False, True, _build_ssp),
    "asp": PolicySpec("asp", False, False, lambda _b, _s, _t: AspParams()),
    "pbsp": PolicySpec("pbsp", True, False, _build_pbsp),
    "pssp": PolicySpec("pssp", True, True, _build_pssp),
}

BARRIER_NAMES: Final[tuple[str, ...]] = tuple(_REGISTRY)


def get_policy(name: str) -> PolicySpec:
    """Look a policy up by name.

    Raises:
        ConfigError: for an unknown name; the message lists the valid names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError("barrier", name, "one of " + ", ".join(BARRIER_NAMES)) from None


def make_params(
    name: str, *, sample: int = 0, staleness: int = 0, strict: bool = False
) -> BarrierParams:
    """Build validated params for the policy `name`.

    Args:
        name: a registry name (bsp, ssp, asp, pbsp, pssp).
        sample: beta, the number of peers sampled per check (pbsp, pssp), >= 0.
        staleness: s, in steps (ssp, pssp), >= 0; >= 1 when `strict`.
        strict: count a lag of exactly s as too stale.

    Raises:
        ConfigError: for an unknown name or a value out of range, naming the field.
    """
    spec = get_policy(name)
    for field, value in (("sample", sample), ("staleness", staleness)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(field, value, "an integer >= 0")
    if spec.uses_staleness and strict and staleness < 1:
        raise ConfigError("staleness", staleness, ">= 1 with a strict staleness comparison")
    return spec.build(sample, staleness, strict)
