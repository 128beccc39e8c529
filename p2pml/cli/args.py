"""Parsing and checking of command-line values; every failure names its flag."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import typer

from p2pml.core.barrier import get_policy
from p2pml.core.sampling import SampleSize
from p2pml.errors import ConfigError

__all__ = [
    "UsageError",
    "bad_flag",
    "check_writable",
    "flag_for",
    "parse_barriers",
    "parse_int_list",
    "parse_samples",
    "parse_shard",
]

# typer re-exports click's BadParameter (recent typers vendor click); its base is click's
# UsageError, the class of every mistake in a command line, whichever click this typer uses.
UsageError: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError"
)

T = TypeVar("T")


def bad_flag(flag: str, value: object, expected: str) -> typer.BadParameter:
    """A usage error that names the flag, the value received and what is allowed."""
    return typer.BadParameter(f"got {value!r}; expected {expected}", param_hint=f"'{flag}'")


def flag_for(err: ConfigError, flags: Mapping[str, str]) -> typer.BadParameter:
    """Turn a `ConfigError` about a config field into a usage error about its flag."""
    return bad_flag(flags.get(err.field, err.field), err.value, err.allowed)


def _split(text: str, flag: str, parse: Callable[[str], T]) -> list[T]:
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise bad_flag(flag, text, "a comma-separated list with no empty items")
    return [parse(item) for item in items]


def parse_barriers(text: str, flag: str = "--barrier") -> list[str]:
    """Parse ``bsp,ssp,pssp``: known, distinct policy names."""

    def one(name: str) -> str:
        try:
            return get_policy(name.lower()).name
        except ConfigError as err:
            raise bad_flag(flag, name, err.allowed) from None

    names = _split(text, flag, one)
    if len(set(names)) != len(names):
        raise bad_flag(flag, text, "each barrier at most once")
    return names


def parse_int_list(text: str, flag: str, *, minimum: int = 0) -> list[int]:
    """Parse ``1,2,4``: whole numbers >= `minimum`."""

    def one(item: str) -> int:
        try:
            value = int(item)
        except ValueError:
            raise bad_flag(flag, item, f"a whole number >= {minimum}") from None
        if value < minimum:
            raise bad_flag(flag, item, f"a whole number >= {minimum}")
        return value

    return _split(text, flag, one)


def parse_samples(text: str, flag: str = "--sample") -> list[SampleSize]:
    """Parse ``1,10,5%``: counts of peers or percentages of the population."""

    def one(item: str) -> SampleSize:
        try:
            return SampleSize.parse(item, field=flag)
        except ConfigError as err:
            raise bad_flag(flag, item, err.allowed) from None

    return _split(text, flag, one)


def parse_shard(text: str) -> tuple[int, int] | None:
    """``auto`` (None: the whole training set in this node's own order) or ``INDEX/COUNT``."""
    if text == "auto":
        return None
    index, _, count = text.partition("/")
    if index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        return int(index), int(count)
    raise bad_flag("--shard", text, "auto, or INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4)")


def check_writable(path: Path | None, flag: str) -> None:
    """Fail now, not after a long run, when `path` cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise bad_flag(flag, str(path), "a file path, not a directory")
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as err:
        raise bad_flag(flag, str(path), f"a writable file path ({err.strerror})") from None
    if not existed:
        path.unlink()
