"""Fault plans for tests and chaos runs: `FaultPlan`, `Partition` and the pure decision `decide`.

A plan says how a node's outgoing traffic is disturbed: datagrams and requests are dropped with
probability `loss`, delayed by `delay_s` plus a uniform `jitter_s`, sent twice with probability
`duplicate`, or held back by an extra `reorder_delay_s` with probability `reorder` so that later
messages overtake them; during a `Partition`'s window, addresses in different groups cannot talk.
Windows are in unix seconds so that separate processes reading the same file agree on them.
`p2pml/io/faults.py` applies a plan to a node's real transports.

Must not import asyncio, sockets, threads, time, module-level random, logging or torch: time and
randomness arrive as parameters (`now_unix_s`, `rng`).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from p2pml.core.config import _is_finite, _is_int
from p2pml.core.types import Address, _is_hostname
from p2pml.errors import ConfigError

__all__ = ["FaultPlan", "FaultVerdict", "Partition", "decide"]

_PLAN_KEYS: Final = (
    "seed",
    "loss",
    "delay_s",
    "jitter_s",
    "duplicate",
    "reorder",
    "reorder_delay_s",
    "request_loss",
    "partitions",
)
_PARTITION_KEYS: Final = ("start_unix_s", "end_unix_s", "groups")
_DEFAULT_REORDER_DELAY_S: Final = 0.05


def _is_entry(text: object) -> bool:
    """A host (IP literal or DNS name) or a ``host:port`` / ``[v6]:port`` address."""
    if not isinstance(text, str) or not text:
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    if _is_hostname(text):
        return True
    try:
        Address.parse(text)
    except ConfigError:
        return False
    return True


def _matches(entry: str, addrs: Sequence[Address]) -> bool:
    return any(entry in (a.host, str(a)) for a in addrs)


@dataclass(frozen=True, slots=True)
class Partition:
    """During ``[start_unix_s, end_unix_s)``, addresses in different `groups` cannot talk.

    Attributes:
        start_unix_s, end_unix_s: the window, in unix seconds (the end may be ``inf``).
        groups: at least two groups of hosts (any port) or ``host:port`` strings; a node is in
            the group that lists any of its addresses (its DHT or HTTP address, or its host). An
            address in no group talks to everyone.
    """

    start_unix_s: float
    end_unix_s: float
    groups: tuple[tuple[str, ...], ...]

    def validate(self, where: str = "partition") -> Partition:
        """Return self, or raise `ConfigError` naming the bad field."""
        if not _is_finite(self.start_unix_s):
            raise ConfigError(f"{where}.start_unix_s", self.start_unix_s, "a finite unix time")
        end = self.end_unix_s
        if isinstance(end, bool) or not isinstance(end, int | float) or not end > self.start_unix_s:
            raise ConfigError(
                f"{where}.end_unix_s", end, f"a unix time > start_unix_s ({self.start_unix_s})"
            )
        groups = self.groups
        if not isinstance(groups, tuple) or len(groups) < 2:
            raise ConfigError(f"{where}.groups", groups, "at least two groups of addresses")
        seen: set[str] = set()
        for group in groups:
            if not isinstance(group, tuple) or not group:
                raise ConfigError(f"{where}.groups", group, "a non-empty list of addresses")
            for entry in group:
                if not _is_entry(entry):
                    raise ConfigError(f"{where}.groups", entry, "a host or host:port")
                if entry in seen:
                    raise ConfigError(f"{where}.groups", entry, "an address in one group only")
                seen.add(entry)
        return self

    def is_active(self, now_unix_s: float) -> bool:
        return self.start_unix_s <= now_unix_s < self.end_unix_s

    def group_of(self, addrs: Sequence[Address]) -> int | None:
        """The index of the group listing any of `addrs`, or None."""
        for index, group in enumerate(self.groups):
            if any(_matches(entry, addrs) for entry in group):
                return index
        return None

    def separates(self, src: Sequence[Address], dst: Sequence[Address]) -> bool:
        """True when `src` and `dst` are in two different groups of this partition."""
        a, b = self.group_of(src), self.group_of(dst)
        return a is not None and b is not None and a != b


@dataclass(frozen=True, slots=True)
class FaultVerdict:
    """What to do with one outgoing message.

    Attributes:
        drop: send nothing (`delays_s` is then empty).
        delays_s: one delay per copy to send, in seconds (two copies for a duplicate).
        partitioned: the drop is a partition's, not random loss.
        reordered: a copy is held back by the plan's `reorder_delay_s`.
    """

    drop: bool
    delays_s: tuple[float, ...]
    partitioned: bool = False
    reordered: bool = False

    @property
    def duplicated(self) -> bool:
        return len(self.delays_s) > 1

    @property
    def delayed(self) -> bool:
        return any(d > 0 for d in self.delays_s)


PASS: Final = FaultVerdict(False, (0.0,))
"""Send once, now."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """How a node's outgoing datagrams and requests are disturbed (see the module docstring).

    Attributes:
        seed: the seed of the decisions; the same seed gives the same sequence of verdicts.
        loss: probability that a datagram or request is dropped, in [0, 1].
        delay_s: added one-way delay, seconds.
        jitter_s: a uniform extra delay in [0, jitter_s) per copy (which also reorders).
        duplicate: probability that a message is sent twice, in [0, 1].
        reorder: probability that a copy is held back by `reorder_delay_s` more, in [0, 1].
        reorder_delay_s: how long a reordered copy is held back, seconds.
        request_loss: probability that an HTTP request fails as if the peer were unreachable;
            None: `loss`. (TCP retransmits lost packets, so datagram loss rarely fails a whole
            request: a chaos run of "5 % datagram loss" may want a lower value here.)
        partitions: windows during which groups of addresses cannot talk.
    """

    seed: int = 0
    loss: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay_s: float = _DEFAULT_REORDER_DELAY_S
    request_loss: float | None = None
    partitions: tuple[Partition, ...] = ()

    def validate(self) -> FaultPlan:
        """Return self, or raise `ConfigError` naming the first bad field, its value and range."""
        if not _is_int(self.seed):
            raise ConfigError("seed", self.seed, "an integer")
        for name in ("loss", "duplicate", "reorder", "request_loss"):
            value = getattr(self, name)
            if name == "request_loss" and value is None:
                continue
            if not _is_finite(value) or not 0 <= value <= 1:
                raise ConfigError(name, value, "a probability in [0, 1]")
        for name in ("delay_s", "jitter_s", "reorder_delay_s"):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0:
                raise ConfigError(name, value, "a finite number of seconds >= 0")
        if not isinstance(self.partitions, tuple):
            raise ConfigError("partitions", self.partitions, "a list of partitions")
        for index, partition in enumerate(self.partitions):
            if not isinstance(partition, Partition):
                raise ConfigError(f"partitions[{index}]", partition, "a Partition")
            partition.validate(f"partitions[{index}]")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> FaultPlan:
        """A validated plan from a TOML or JSON document's content; unknown keys are refused.

        Raises:
            ConfigError: naming the key, for an unknown key or a bad value.
        """
        _check_keys(data, _PLAN_KEYS, "fault plan")
        fields: dict[str, object] = {k: v for k, v in data.items() if k != "partitions"}
        for name in _PLAN_KEYS[1:-1]:
            if _is_int(fields.get(name)):  # TOML writes 0 for 0.0
                fields[name] = float(fields[name])  # type: ignore[arg-type]
        raw = data.get("partitions", [])
        if not isinstance(raw, list):
            raise ConfigError("partitions", raw, "a list of tables (TOML [[partitions]])")
        partitions = tuple(_partition(item, f"partitions[{i}]") for i, item in enumerate(raw))
        return cls(**fields, partitions=partitions).validate()  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line for logs: the non-default settings."""
        parts = [f"seed {self.seed}"]
        for name in ("loss", "request_loss", "duplicate", "reorder"):
            if getattr(self, name) is not None and getattr(self, name) != 0:
                parts.append(f"{name} {getattr(self, name):g}")
        for name in ("delay_s", "jitter_s"):
            if getattr(self, name):
                parts.append(f"{name[:-2]} {getattr(self, name):g} s")
        if self.reorder:
            parts.append(f"reorder delay {self.reorder_delay_s:g} s")
        for p in self.partitions:
            groups = " | ".join(",".join(g) for g in p.groups)
            parts.append(f"partition {groups} from {p.start_unix_s:.3f} to {p.end_unix_s:.3f}")
        return "; ".join(parts)


def _check_keys(data: object, allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(where, data, "a table")
    for key in data:
        if key not in allowed:
            raise ConfigError(where, key, "keys among " + ", ".join(allowed))


def _partition(item: object, where: str) -> Partition:
    _check_keys(item, _PARTITION_KEYS, where)
    assert isinstance(item, Mapping)  # checked just above
    for key in _PARTITION_KEYS:
        if key not in item:
            raise ConfigError(f"{where}.{key}", None, "a value (the key is required)")
    groups = item["groups"]
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise ConfigError(f"{where}.groups", groups, "a list of lists of addresses")
    start, end = item["start_unix_s"], item["end_unix_s"]
    return Partition(
        float(start) if _is_int(start) else start,
        float(end) if _is_int(end) else end,
        tuple(tuple(g) for g in groups),
    ).validate(where)


def decide(
    plan: FaultPlan,
    rng: random.Random,
    *,
    src: Address | Sequence[Address],
    dst: Address | Sequence[Address],
    now_unix_s: float,
    request: bool = False,
) -> FaultVerdict:
    """What to do with one message from `src` to `dst` at `now_unix_s`.

    Args:
        plan: a validated plan.
        rng: the caller's stream; the same stream state gives the same verdict.
        src, dst: the sender's and receiver's addresses (a node may have several: DHT, HTTP).
        now_unix_s: the current unix time, seconds (partition windows).
        request: an HTTP request (`FaultPlan.request_loss` applies) rather than a datagram.

    Returns:
        A verdict: dropped (by a partition or random loss), or one or two copies with a delay
        each. Random draws happen in a fixed order (loss, duplicate, then per copy jitter and
        reorder), so a plan's sequence of verdicts depends only on its seed and the calls.
    """
    srcs = (src,) if isinstance(src, Address) else tuple(src)
    dsts = (dst,) if isinstance(dst, Address) else tuple(dst)
    for partition in plan.partitions:
        if partition.is_active(now_unix_s) and partition.separates(srcs, dsts):
            return FaultVerdict(True, (), partitioned=True)
    loss = plan.request_loss if request and plan.request_loss is not None else plan.loss
    if rng.random() < loss:
        return FaultVerdict(True, ())
    copies = 2 if rng.random() < plan.duplicate else 1
    delays: list[float] = []
    reordered = False
    for _ in range(copies):
        delay = plan.delay_s + rng.uniform(0.0, plan.jitter_s)
        if rng.random() < plan.reorder:
            delay += plan.reorder_delay_s
            reordered = True
        delays.append(delay)
    if not reordered and copies == 1 and delays[0] == 0.0:
        return PASS
    return FaultVerdict(False, tuple(delays), reordered=reordered)
