"""Saying out loud that a run is open."""

from __future__ import annotations

import logging

from p2pml.protocol.auth import Admission

__all__ = ["warn_if_open"]

log = logging.getLogger("p2pml.node")


def warn_if_open(admission: Admission, run_id: str) -> None:
    """Log a WARNING when `admission` lets any key take part in run `run_id`."""
    if admission.is_open:
        log.warning(
            "run %s is OPEN: any node that reaches this one and knows the run's manifest can "
            "send it deltas and models (every frame is still signed and checked for replays); "
            "close the run with --run-key SECRET or --allow-keys FILE",
            run_id,
        )
    else:
        log.info("run %s is closed: %s", run_id, admission.describe())
