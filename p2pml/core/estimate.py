"""Population-size estimation from the density of node IDs seen in lookups.

Node IDs are uniform over the 160-bit space (they are hashes of public keys). For a random target,
let d_k be the XOR distance to the k-th closest node and u_k = d_k / 2^160. Among N uniform IDs,
u_k ~ Beta(k, N - k + 1), so E[1 / u_k] = N / (k - 1) and N^ = (k - 1) / u_k is unbiased (the naive
k / u_k is high by a factor k / (k - 1), 5 % at k = 20). Averaged over L independent lookups its
relative standard error is about 1 / sqrt(L (k - 2)): 23.6 %, 11.8 % and 5.9 % at L = 1, 4, 16 for
k = 20. While a node's routing table holds everyone the population is simply counted.

Pure maths: must not import asyncio, sockets, threads, time, module-level random or torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from p2pml.errors import ConfigError

__all__ = [
    "ID_SPACE",
    "PopulationEstimate",
    "estimate_from_lookups",
    "estimate_population",
    "relative_error",
]

ID_SPACE: Final = 1 << 160


@dataclass(frozen=True, slots=True)
class PopulationEstimate:
    """An estimate N^ of the population, with how it was made.

    Attributes:
        n_hat: the estimate (>= 1).
        n_lookups: L, the lookups averaged; 0 when the population was counted exactly.
        k: which closest node's distance was used.
        rel_error: the expected relative standard error (0 when exact).
    """

    n_hat: float
    n_lookups: int
    k: int
    rel_error: float

    @property
    def is_exact(self) -> bool:
        return self.n_lookups == 0


def relative_error(n_lookups: int, k: int) -> float:
    """The relative standard error 1 / sqrt(L (k - 2)) of the averaged estimator (k >= 3)."""
    if k < 3:
        raise ConfigError("k", k, "an integer >= 3")
    if n_lookups < 1:
        raise ConfigError("n_lookups", n_lookups, "an integer >= 1")
    return 1.0 / math.sqrt(n_lookups * (k - 2))


def estimate_population(
    kth_distances: Sequence[int], *, k: int, n_known: int | None = None
) -> PopulationEstimate:
    """Estimate N from the k-th closest XOR distances of L random-target lookups.

    Args:
        kth_distances: per lookup, the XOR distance (an int in [0, 2^160)) from the target to the
            k-th closest node found, counting this node too.
        k: the rank used, >= 3.
        n_known: the number of nodes (this one included) when the routing table is known to hold
            every node; then that count is returned exactly.

    Raises:
        ConfigError: for k < 3, no lookups, or a distance outside the ID space.
    """
    if n_known is not None:
        if n_known < 1:
            raise ConfigError("n_known", n_known, "an integer >= 1")
        return PopulationEstimate(float(n_known), 0, k, 0.0)
    if k < 3:
        raise ConfigError("k", k, "an integer >= 3")
    if not kth_distances:
        raise ConfigError("kth_distances", [], "at least one lookup's distance")
    for d in kth_distances:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < ID_SPACE:
            raise ConfigError("kth_distances", d, "integers in [0, 2^160)")
    # A zero distance (the target is a node id) would give an infinite term: count it as 1.
    terms = [(k - 1) * ID_SPACE / max(d, 1) for d in kth_distances]
    n_hat = max(statistics.fmean(terms), float(k))
    return PopulationEstimate(n_hat, len(kth_distances), k, relative_error(len(kth_distances), k))


def estimate_from_lookups(
    kth_distances: Sequence[int | None],
    *,
    k: int,
    n_known: int,
    complete: Sequence[bool],
    met_unknown: bool,
    table_complete: bool,
) -> PopulationEstimate:
    """Count or estimate N from one round of random lookups.

    The population is counted (`n_known`, this node included) when a lookup that ran to its end
    found fewer than k nodes and fewer than k + 1 are known (it asked everyone there is), or when
    the lookups met nobody the routing table did not already hold while no bucket holds a contact
    it turned away (the table knows everyone: if it lacked a share f of the nodes, L lookups of k
    nodes would all miss them with probability about exp(-f L k), so a count that passes this is
    off by about 1 / (L k) at most). Otherwise N is estimated from the lookups that found k nodes.

    Args:
        kth_distances: per lookup, the k-th closest distance (self counted), None if under k found.
        n_known: the distinct nodes known, this one included.
        complete: per lookup, whether it ran to its end (not cut by its time budget).
        met_unknown: a lookup returned a node the table did not hold before the round.
        table_complete: no bucket holds a contact it had to turn away.
    """
    found = [d for d in kth_distances if d is not None]
    short_and_done = any(d is None and c for d, c in zip(kth_distances, complete, strict=True))
    if (short_and_done and n_known <= k) or (table_complete and not met_unknown) or not found:
        return estimate_population([], k=k, n_known=n_known)
    return estimate_population(found, k=k)
