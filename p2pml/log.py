"""Loggers: `get_logger`, the peer-id adapter, and `setup_logging` (for the CLI and examples)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["PeerLoggerAdapter", "get_logger", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Return the module logger for `name` (use ``__name__``)."""
    return logging.getLogger(name)


class PeerLoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with a node's short peer id, e.g. ``[3fa9c1d2] joined``."""

    def __init__(self, logger: logging.Logger, short_id: str) -> None:
        super().__init__(logger, {"peer": short_id})
        self.short_id = short_id

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.short_id}] {msg}", kwargs


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger for a command-line run. The library never calls this."""
    logging.basicConfig(level=level, format=_FORMAT)
