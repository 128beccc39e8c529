"""Robust aggregation of deltas (towards issue 8): how the deltas of several peers for one step are
combined, and which delta is too far out of line to be used at all.

Pure numpy, sans-IO: no clock, no randomness, no logging. A delta is a sequence of arrays (one per
parameter, in manifest order); every delta combined together has the same shapes. Each rule
returns one delta that stands for the *mean* of its inputs, so a caller that weighs the mean of n
deltas by n/P (DESIGN.md §5) keeps doing so:

- ``mean``: the plain mean (what the node does today);
- ``median``: the coordinate-wise median; one peer in three cannot move a coordinate past the
  honest values;
- ``trimmed_mean``: per coordinate, drop the `trim` share of the largest and of the smallest
  values, rounded up (so one at each end as soon as `trim` > 0: the few deltas of one step are
  where one hostile peer must be trimmed), and average the rest;
- ``centered_clip``: start from the coordinate-wise median and move towards each delta by at most
  `radius` in L2 norm (Karimireddy, He and Jaggi, ICML 2021, "Learning from History for Byzantine
  Robust Optimization"), for `iterations` rounds; without a radius, the median distance of the
  inputs from that start, so the radius follows the honest deltas' spread whatever their scale.

A rule needs a majority to outvote anything: `combine_group` combines groups of at least
`MIN_GROUP` inputs and leaves smaller ones to the caller, who applies them unchanged.
`AggregationConfig` is what a node is told to do (the rule, and the norm filter's factor).

`NormFilter` keeps the norms of recently accepted deltas and refuses a delta whose norm is more
than `factor` times their median: a sign-flipped delta scaled by 100 is dropped (and counted by the
caller) before any rule sees it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from p2pml.errors import ConfigError

__all__ = [
    "DEFAULT_NORM_FACTOR",
    "MIN_GROUP",
    "RULES",
    "AggregationConfig",
    "AggregationRule",
    "Array",
    "NormFilter",
    "admits",
    "combine",
    "combine_group",
    "delta_norm",
]

Array = npt.NDArray[np.floating]
Delta = Sequence[Array]
RuleName = Literal["mean", "median", "trimmed_mean", "centered_clip"]
RULES: Final[tuple[RuleName, ...]] = ("mean", "median", "trimmed_mean", "centered_clip")
MIN_GROUP: Final = 3  # the fewest inputs in which one hostile delta can be outvoted
DEFAULT_NORM_FACTOR: Final = 10.0  # the norm filter's factor when a robust rule is on


@dataclass(frozen=True, slots=True)
class AggregationRule:
    """A rule and its parameters; see the module docstring.

    Attributes:
        name: one of `RULES`.
        trim: for ``trimmed_mean``, the share dropped at each end, in [0, 0.5).
        radius: for ``centered_clip``, the largest L2 step towards one delta (> 0); None: the
            median distance of the inputs from their coordinate-wise median, per call.
        iterations: for ``centered_clip``, the rounds of clipping (>= 1).
    """

    name: RuleName = "mean"
    trim: float = 0.1
    radius: float | None = None
    iterations: int = 3

    def validate(self) -> AggregationRule:
        """Return self.

        Raises:
            ConfigError: naming the field that is out of range.
        """
        if self.name not in RULES:
            raise ConfigError("aggregation", self.name, "one of " + ", ".join(RULES))
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError("trim", self.trim, "a share in [0, 0.5)")
        radius = self.radius
        if radius is not None and not (
            isinstance(radius, int | float) and radius > 0 and math.isfinite(radius)
        ):
            raise ConfigError("radius", radius, "a finite number > 0, or unset for automatic")
        if isinstance(self.iterations, bool) or not self.iterations >= 1:
            raise ConfigError("iterations", self.iterations, "a whole number >= 1")
        return self


def admits(gate: NormFilter | None, norm: float) -> bool:
    """Whether a delta of `norm` is kept: by the filter `gate`, or without one, when finite."""
    return gate.admit_norm(norm) if gate is not None else math.isfinite(norm)


_NORM_CHUNK: Final = 1 << 20  # elements cast to float64 at a time


def delta_norm(delta: Delta) -> float:
    """The L2 norm of a whole delta (all its arrays as one vector)."""
    total = 0.0
    for a in delta:  # summed in float64: a float16 delta's squares overflow in its own dtype
        flat = np.asarray(a).reshape(-1)
        for start in range(0, flat.size, _NORM_CHUNK):
            part = flat[start : start + _NORM_CHUNK].astype(np.float64)
            total += float(np.dot(part, part))
    return math.sqrt(total)


def _check(deltas: Sequence[Delta]) -> None:
    if not deltas:
        raise ConfigError("deltas", 0, "at least one delta to combine")
    shapes = [tuple(np.shape(a)) for a in deltas[0]]
    for i, delta in enumerate(deltas[1:], start=1):
        if [tuple(np.shape(a)) for a in delta] != shapes:
            raise ConfigError(f"delta {i} shapes", [np.shape(a) for a in delta], str(shapes))


def combine(deltas: Sequence[Delta], rule: AggregationRule | None = None) -> list[Array]:
    """One delta standing for the mean of `deltas` under `rule` (the plain mean by default).

    The result's arrays have the inputs' shapes and the dtype of the first delta's arrays; the
    arithmetic runs in float64. The order of `deltas` does not matter.

    Raises:
        ConfigError: for no deltas, or deltas whose shapes differ.
    """
    rule = (rule or AggregationRule()).validate()
    _check(deltas)
    out: list[Array] = []
    if rule.name == "centered_clip":
        return _centered_clip(deltas, rule)
    for k, first in enumerate(deltas[0]):
        stack = np.stack([np.asarray(d[k], dtype=np.float64) for d in deltas])
        if rule.name == "mean":
            value = stack.mean(axis=0)
        elif rule.name == "median":
            value = np.median(stack, axis=0)
        else:
            value = _trimmed_mean(stack, rule.trim)
        out.append(value.astype(np.asarray(first).dtype, copy=False))
    return out


def combine_group(
    deltas: Sequence[Delta], rule: AggregationRule, *, own: Delta | None = None
) -> list[Array] | None:
    """The deltas of one step combined by `rule`, standing for their mean; None when the rule is
    the mean or the group is smaller than `MIN_GROUP` (a rule needs a majority to outvote one
    hostile delta, so one or two deltas go through unchanged: the caller adds each as it is).

    Args:
        deltas: the received deltas of one step.
        own: the caller's own latest change, as one more vote: it counts towards `MIN_GROUP` and
            enters the rule, but the result still stands for the mean of `deltas` (the caller has
            applied its own change already, and weighs the result by ``len(deltas)``).

    Raises:
        ConfigError: for a bad rule, or deltas whose shapes differ.
    """
    inputs = [*deltas, own] if own is not None else list(deltas)
    if rule.name == "mean" or len(inputs) < MIN_GROUP:
        return None
    return combine(inputs, rule)


def _trimmed_mean(stack: npt.NDArray[np.float64], trim: float) -> npt.NDArray[np.float64]:
    n = stack.shape[0]
    cut = min(math.ceil(trim * n - 1e-9), (n - 1) // 2)  # 1e-9: 0.1 * 30 is not above 3
    kept = np.sort(stack, axis=0)[cut : n - cut] if cut else stack
    result: npt.NDArray[np.float64] = kept.mean(axis=0)
    return result


def _centered_clip(deltas: Sequence[Delta], rule: AggregationRule) -> list[Array]:
    flat = np.stack(
        [np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in d]) for d in deltas]
    )
    centre = np.median(flat, axis=0)
    radius = rule.radius
    if radius is None:
        radius = float(np.median(np.linalg.norm(flat - centre, axis=1)))
    for _ in range(rule.iterations if radius > 0 else 0):  # radius 0: most inputs are the centre
        diffs = flat - centre
        norms = np.linalg.norm(diffs, axis=1)
        # min(1, radius / norm), written so that a zero norm (a delta at the centre) is 1
        scale = radius / np.maximum(norms, radius)
        centre = centre + (diffs * scale[:, None]).mean(axis=0)
    out: list[Array] = []
    offset = 0
    for first in deltas[0]:
        array = np.asarray(first)
        size = array.size
        out.append(centre[offset : offset + size].reshape(array.shape).astype(array.dtype))
        offset += size
    return out


@dataclass(slots=True)
class NormFilter:
    """Refuses deltas whose norm is far out of line with the recently accepted ones.

    A delta is refused when at least `warmup` norms have been accepted and its norm exceeds
    `factor` times their median (over the last `window`). A non-finite norm is always refused.
    Accepted norms join the window; refused ones never do, so a flood of large deltas cannot
    drag the median up.
    """

    factor: float = 10.0
    window: int = 64
    warmup: int = 4
    _norms: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not (self.factor > 1 and math.isfinite(self.factor)):
            raise ConfigError("norm factor", self.factor, "a finite number > 1")
        if not 1 <= self.warmup <= self.window:
            raise ConfigError("norm warmup", self.warmup, f"a whole number in [1, {self.window}]")
        self._norms = deque(self._norms, maxlen=self.window)

    @property
    def limit(self) -> float | None:
        """The largest norm accepted now, or None while warming up."""
        if len(self._norms) < self.warmup:
            return None
        return self.factor * float(np.median(np.asarray(self._norms)))

    def admit(self, delta: Delta) -> bool:
        """Whether `delta` may be used; an admitted delta's norm joins the window."""
        return self.admit_norm(delta_norm(delta))

    def admit_norm(self, norm: float) -> bool:
        """`admit` for a delta whose norm the caller has computed."""
        if not math.isfinite(norm):
            return False
        limit = self.limit
        if limit is not None and norm > limit:
            return False
        self._norms.append(norm)
        return True

    def observe(self, norm: float) -> None:
        """Add the norm of a trusted delta (the caller's own change) to the window unchecked;
        a non-finite norm is ignored."""
        if math.isfinite(norm):
            self._norms.append(norm)


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    """How a node combines the deltas it receives, and which it drops (issue 8).

    Attributes:
        rule: how the deltas of one step are combined (`AggregationRule`).
        norm_factor: drop a received delta whose norm exceeds this many times the median of the
            recent ones (`NormFilter`); 0 turns the filter off.
    """

    rule: AggregationRule = AggregationRule()
    norm_factor: float = 0.0

    @classmethod
    def build(
        cls,
        name: str = "mean",
        *,
        trim: float = 0.1,
        radius: float | None = None,
        norm_factor: float | None = None,
    ) -> AggregationConfig:
        """A validated config; `norm_factor` None means `DEFAULT_NORM_FACTOR` with a robust
        rule and off with the mean.

        Raises:
            ConfigError: naming the field (``aggregation``, ``trim``, ``radius`` or
                ``norm_factor``) that is out of range.
        """
        rule = AggregationRule(name, trim=trim, radius=radius)  # type: ignore[arg-type]
        if norm_factor is None:
            norm_factor = DEFAULT_NORM_FACTOR if rule.name != "mean" else 0.0
        return cls(rule, norm_factor).validate()

    @property
    def is_plain(self) -> bool:
        """The plain mean without a filter: every delta is added as it is."""
        return self.rule.name == "mean" and not self.norm_factor

    def validate(self) -> AggregationConfig:
        """Return self, or raise `ConfigError` naming the first bad field."""
        self.rule.validate()
        factor = self.norm_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ConfigError("norm_factor", factor, "0 (off) or a finite number > 1")
        if factor != 0 and not (factor > 1 and math.isfinite(factor)):
            raise ConfigError("norm_factor", factor, "0 (off) or a finite number > 1")
        return self

    def norm_filter(self) -> NormFilter | None:
        """A fresh filter of this config's factor, or None when it is off."""
        return NormFilter(factor=self.norm_factor) if self.norm_factor else None
