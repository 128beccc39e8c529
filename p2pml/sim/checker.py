"""How a simulated node decides its barrier: by drawing samples, or from their exact distribution.

Theory of operation. A checker answers three questions for the engine: may a node that has just
completed a step proceed (`first_check`); which blocked nodes pass after some node's step changed
(`on_change`, the any-change re-check model); and does a blocked node pass when it polls (`poll`).
All transitions of the blocked set live in this file.

`PolicyChecker` is the reference: every check draws beta peers with ``core.sampling.sample_peers``
from the node's own rng and applies ``core.barrier.decide`` to a `BarrierView`. It costs O(P) per
check and, in the any-change model, one check per blocked node per event.

`AnalyticChecker` is the fast path. Every policy is "proceed iff each observed peer has reached
``min_peer_step``" (``core.barrier``), so a fresh-sample check passes with the hypergeometric
probability C(m, beta) / C(P-1, beta), m being the other nodes at or above that step
(``core.sampling.pass_probability``). A blocked node's threshold is fixed, so its pass probability
changes only when some node reaches exactly that threshold. Between such changes its re-checks in
the any-change model are i.i.d. Bernoulli trials, so the index of the event at which it passes is
geometric: we draw it once and redraw (memorylessly) when the probability changes. Held samples are
tracked with per-peer waiter lists. Tests in ``tests/sim`` check that both paths agree
statistically.

Must not import io/, node/, asyncio, aiohttp, kademlia, time or module-level random.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from p2pml.core.barrier import (
    AspParams,
    BarrierParams,
    BarrierView,
    Decision,
    decide,
    min_peer_step,
)
from p2pml.core.sampling import pass_probability, sample_peers
from p2pml.core.types import PeerId, Step
from p2pml.sim.engine import Population

__all__ = ["AnalyticChecker", "PolicyChecker", "sim_peer_id"]

_NEVER = -1


def sim_peer_id(node: int) -> PeerId:
    """The 20-byte peer id of simulated node `node`."""
    return PeerId(node.to_bytes(20, "big"))


class PolicyChecker:
    """The reference checker: draws every sample and applies the policy to a `BarrierView`."""

    def __init__(
        self,
        population: Population,
        params: BarrierParams,
        rngs: list[random.Random],
        *,
        sample: int,
        full_view: bool,
        any_change: bool,
        hold_sample: bool = False,
    ) -> None:
        self.population = population
        self.params = params
        self.rngs = rngs
        self.any_change = any_change
        self.sample = sample
        self.full_view = full_view
        self.hold_sample = hold_sample
        self._nodes = list(range(population.n_nodes))
        self._ids = [sim_peer_id(n) for n in self._nodes]
        self._blocked: dict[int, list[int]] = {}

    def _draw(self, node: int) -> list[int]:
        if self.full_view:
            return [n for n in self._nodes if n != node]
        if isinstance(self.params, AspParams):
            return []
        return sample_peers(self._nodes, self.sample, self.rngs[node], exclude=node)

    def _passes(self, node: int, peers: list[int]) -> bool:
        steps = self.population.steps
        view = BarrierView(
            my_step=Step(steps[node]),
            peer_steps={self._ids[p]: Step(steps[p]) for p in peers},
            population_estimate=float(self.population.n_nodes),
        )
        return decide(view, self.params) is Decision.PROCEED

    def _recheck(self, node: int) -> bool:
        held = self._blocked[node]
        peers = held if self.hold_sample else self._draw(node)
        if self._passes(node, peers):
            del self._blocked[node]
            return True
        return False

    def first_check(self, node: int, now: float) -> bool:
        peers = self._draw(node)
        if self._passes(node, peers):
            return True
        self._blocked[node] = peers
        return False

    def on_change(self, node: int, step: int, now: float) -> list[int]:
        if not self.any_change:
            return []
        return [other for other in sorted(self._blocked) if self._recheck(other)]

    def poll(self, node: int, now: float) -> bool:
        return self._recheck(node)


class AnalyticChecker:
    """The fast checker: exact pass probabilities, geometric re-check counts, waiter lists."""

    def __init__(
        self,
        population: Population,
        params: BarrierParams,
        rngs: list[random.Random],
        *,
        sample: int,
        full_view: bool,
        any_change: bool,
        hold_sample: bool = False,
        group_rng: random.Random,
    ) -> None:
        self.population = population
        self.params = params
        self.rngs = rngs
        self.any_change = any_change
        self.group_rng = group_rng
        n_other = population.n_nodes - 1
        beta = n_other if full_view else min(sample, n_other)
        # _pass_p[m]: the chance that a fresh sample passes when m other nodes are at the threshold.
        self._pass_p = [pass_probability(n_other, m, beta) for m in range(n_other + 1)]
        self.hold_sample = hold_sample and not full_view
        self.beta = beta
        self._nodes = list(range(population.n_nodes))
        self._threshold: dict[int, int] = {}
        # Fresh samples: blocked nodes grouped by threshold, and each group's next passing event.
        self._event = 0
        self._groups: defaultdict[int, set[int]] = defaultdict(set)
        self._group_due: dict[int, int] = {}
        self._due: defaultdict[int, list[int]] = defaultdict(list)
        # Held samples: who waits on which peer reaching which step, and how many peers are left.
        self._waiting_on: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
        self._outstanding: dict[int, int] = {}

    def _p(self, threshold: int) -> float:
        return self._pass_p[self.population.count_at_least(threshold) - 1]

    def _reschedule(self, threshold: int, first_event: int) -> None:
        """Draw the next event, from `first_event` on, at which some member of a group passes.

        Each member passes each event with probability p, independently, so some member passes with
        probability 1 - (1 - p)^n per event and the wait for that is geometric.
        """
        members = self._groups.get(threshold)
        p = self._p(threshold)
        if not members or p <= 0.0:
            self._group_due.pop(threshold, None)
            return
        due = first_event
        if p < 1.0:
            p_any = -math.expm1(len(members) * math.log1p(-p))
            if p_any < 1.0:
                u = 1.0 - self.group_rng.random()
                due += int(math.log(u) / math.log1p(-p_any))
        self._group_due[threshold] = due
        self._due[due].append(threshold)

    def _group_passes(self, threshold: int) -> list[int]:
        """The members of a group that pass at its due event: at least one, each with chance p."""
        members = sorted(self._groups[threshold])
        n, p = len(members), self._p(threshold)
        if p >= 1.0:
            chosen = members
        else:
            rng, log_q = self.group_rng, math.log1p(-p)
            p_any = -math.expm1(n * log_q)
            # The first passer's position, given that someone passes, then geometric gaps.
            position = min(int(math.log1p(-rng.random() * p_any) / log_q), n - 1)
            chosen = []
            while position < n:
                chosen.append(members[position])
                position += 1 + int(math.log(1.0 - rng.random()) / log_q)
        self._groups[threshold].difference_update(chosen)
        for node in chosen:
            del self._threshold[node]
        self._reschedule(threshold, self._event + 1)
        return chosen

    def _block(self, node: int, threshold: int) -> bool:
        """Block `node` on `threshold`; False when a held sample is already satisfied."""
        if self.hold_sample:
            steps = self.population.steps
            peers = sample_peers(self._nodes, self.beta, self.rngs[node], exclude=node)
            behind = [p for p in peers if steps[p] < threshold]
            if not behind:
                return False
            self._outstanding[node] = len(behind)
            for p in behind:
                self._waiting_on[p].append((node, threshold))
        elif self.any_change:
            self._groups[threshold].add(node)
            self._reschedule(threshold, self._event + 1)
        self._threshold[node] = threshold
        return True

    def first_check(self, node: int, now: float) -> bool:
        threshold = min_peer_step(self.params, self.population.steps[node])
        if threshold is None:
            return True
        if self.hold_sample:
            return not self._block(node, threshold)
        if self.rngs[node].random() < self._p(threshold):
            return True
        return not self._block(node, threshold)

    def on_change(self, node: int, step: int, now: float) -> list[int]:
        if self.hold_sample:
            return self._release_waiters(node, step)
        if not self.any_change:
            return []
        self._event += 1
        if step in self._groups:
            self._reschedule(step, self._event)
        passed: list[int] = []
        for threshold in sorted(set(self._due.pop(self._event, ()))):
            if self._group_due.get(threshold) == self._event:
                passed += self._group_passes(threshold)
        return sorted(passed)

    def _release_waiters(self, node: int, step: int) -> list[int]:
        waiters = self._waiting_on.pop(node, [])
        keep: list[tuple[int, int]] = []
        passed: list[int] = []
        for other, threshold in waiters:
            if threshold > step:
                keep.append((other, threshold))
                continue
            self._outstanding[other] -= 1
            if self._outstanding[other] == 0:
                del self._outstanding[other]
                passed.append(other)
        if keep:
            self._waiting_on[node] = keep
        if not self.any_change:
            return []  # released at their next poll, which finds no outstanding peer
        for other in passed:
            del self._threshold[other]
        return sorted(passed)

    def poll(self, node: int, now: float) -> bool:
        threshold = self._threshold[node]
        if self.hold_sample:
            passes = node not in self._outstanding
        else:
            passes = self.rngs[node].random() < self._p(threshold)
        if passes:
            del self._threshold[node]
        return passes
