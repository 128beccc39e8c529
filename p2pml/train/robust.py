"""`RobustAggregator`: the trainer's side of robust aggregation (issue 8): received deltas are
screened, grouped by step and combined by the rule of an `AggregationConfig` before they reach the
model (the rules themselves are sans-IO, in `protocol/aggregate.py`).

- **Screening.** A delta whose norm is not finite is dropped; with the norm filter on, so is one
  whose norm is more than `norm_factor` times the median norm of the recently accepted deltas and
  of this node's own recent changes (trusted, so the filter is armed after a few steps whatever
  its peers send). Dropped deltas never reach the model; they are counted as
  ``rejected_outlier`` in the driver's counters and logged at WARNING at most once per sender per
  `WARN_EVERY_S`.
- **Grouping.** The kept deltas are grouped by their step. A group is combined by the rule when it
  has at least `MIN_GROUP` inputs counting this node's own latest change as one more vote, and the
  result (which stands for the mean of the group's received deltas) is added times (group size x
  1/P). Smaller groups go through unchanged, each delta at 1/P: a rule needs a majority to outvote
  one hostile delta. The own change is a vote only: it was applied at 1/P in its own step already
  and is not added again, so with honest peers the update keeps the weights of DESIGN.md §5.
  Under BSP a step's group holds every peer's delta; under (p)SSP a step's deltas arrive spread
  over several steps, so most groups are small and the norm filter is what stops a scaled
  attacker (benchmarks/byzantine.py measures both).

`apply` and `own_change` run in the trainer's ``p2pml-compute`` thread (torch); `count_dropped`
runs on the event loop after each compute job, so the driver's counters are only touched there.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

import torch

from p2pml.core.limits import WarnGate
from p2pml.core.types import PeerId
from p2pml.protocol.aggregate import (
    AggregationConfig,
    Array,
    admits,
    combine_group,
    delta_norm,
)
from p2pml.protocol.messages import DeltaPush, TensorBlob
from p2pml.train.tensors import as_tensor

__all__ = ["WARN_EVERY_S", "Dropped", "RobustAggregator"]

log = logging.getLogger(__name__)

WARN_EVERY_S: Final = 10.0  # at most one warning per sender this often about dropped deltas
_MAX_WARNED: Final = 4096  # senders remembered for rate-limiting before the memory is cleared


def _arrays(blobs: Sequence[TensorBlob]) -> list[Array]:
    """The blobs' arrays, no copy (a model's parameters are floating point)."""
    return [cast(Array, blob.array) for blob in blobs]


@dataclass(frozen=True, slots=True)
class Dropped:
    """A received delta that was dropped: its norm (maybe NaN or infinite) and the filter's
    limit then (None while it warms up, or without a filter)."""

    sender: PeerId
    step: int
    norm: float
    limit: float | None


class RobustAggregator:
    """Screens, groups and combines received deltas into `params`; see the module docstring.

    Args:
        config: the rule and the norm filter's factor (validated here).
        params: the model's trainable parameters, in manifest order.
    """

    def __init__(
        self, config: AggregationConfig, params: Sequence[tuple[str, torch.nn.Parameter]]
    ) -> None:
        self.config = config.validate()
        self._params = params
        self._gate = config.norm_filter()
        self._own: list[Array] | None = None
        self._dropped: deque[Dropped] = deque()  # the compute thread appends, the loop pops
        self._warned = WarnGate[PeerId](WARN_EVERY_S, max_keys=_MAX_WARNED)

    # -- compute thread --------------------------------------------------------------------------
    def own_change(self, blobs: Sequence[TensorBlob]) -> None:
        """Note this node's change of the step just computed: the next groups' extra vote, and a
        trusted norm for the filter."""
        self._own = _arrays(blobs)
        if self._gate is not None:
            self._gate.observe(delta_norm(self._own))

    def apply(self, deltas: Sequence[DeltaPush], weight: float) -> None:
        """Add the kept deltas to the parameters, each step's group as the rule combines it."""
        groups: dict[int, list[DeltaPush]] = {}
        for msg in self._screen(deltas):
            groups.setdefault(msg.step, []).append(msg)
        with torch.no_grad():
            for _, group in sorted(groups.items()):
                arrays = [_arrays(msg.tensors) for msg in group]
                combined = combine_group(arrays, self.config.rule, own=self._own)
                if combined is None:
                    for msg in group:
                        for (_, param), blob in zip(self._params, msg.tensors, strict=True):
                            param.add_(as_tensor(blob), alpha=weight)
                    continue
                for (_, param), array in zip(self._params, combined, strict=True):
                    param.add_(torch.from_numpy(array), alpha=weight * len(group))

    def _screen(self, deltas: Sequence[DeltaPush]) -> list[DeltaPush]:
        kept = []
        gate = self._gate
        for msg in deltas:
            norm = delta_norm(_arrays(msg.tensors))
            if admits(gate, norm):
                kept.append(msg)
            else:
                limit = None if gate is None else gate.limit
                self._dropped.append(Dropped(msg.sender, msg.step, norm, limit))
        return kept

    # -- event loop ------------------------------------------------------------------------------
    def count_dropped(self, counters: Counter[str], *, now: float) -> list[Dropped]:
        """Count the deltas dropped since the last call as ``rejected_outlier`` in `counters`
        and log them (one WARNING per sender per `WARN_EVERY_S`); returns them.

        Args:
            now: seconds on the monotonic clock.
        """
        out: list[Dropped] = []
        while self._dropped:
            dropped = self._dropped.popleft()
            out.append(dropped)
            counters["rejected_outlier"] += 1
            if self._warned.open(dropped.sender, now=now) is None:
                continue
            log.warning(
                "dropped the delta of step %d from %s: its norm %.4g is out of line (limit %s); "
                "more from it are counted as rejected_outlier and logged every %.0f s",
                dropped.step,
                dropped.sender.hex()[:8],
                dropped.norm,
                "none yet" if dropped.limit is None else f"{dropped.limit:.4g}",
                WARN_EVERY_S,
            )
        return out
