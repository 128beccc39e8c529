"""The seed role: a long-lived DHT entry point with no model and no training.

A seed is a `KademliaOverlay` with role ``seed`` that keeps refreshing its table and estimate, and
optionally joins other seeds and saves its contacts as JSON so a restart finds the network again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from p2pml.core.config import OverlayConfig
from p2pml.core.types import Address
from p2pml.errors import OverlayError
from p2pml.io.overlay import KademliaOverlay, load_contacts, write_contacts
from p2pml.protocol.auth import Admission
from p2pml.protocol.identity import NodeKey

__all__ = ["run_seed"]

log = logging.getLogger(__name__)


async def _save(overlay: KademliaOverlay, path: Path | None) -> None:
    if path is None or not overlay.contacts():
        return
    document = overlay.contacts_document()  # on the loop: the table changes under other threads
    try:
        await asyncio.to_thread(write_contacts, path, document)
    except OSError as err:
        log.warning("could not save contacts to %s: %s", path, err.strerror)


async def run_seed(
    config: OverlayConfig,
    key: NodeKey,
    *,
    bootstrap: Sequence[Address],
    contacts_path: Path | None,
    stop: asyncio.Event,
    on_ready: asyncio.Future[str] | None = None,
    admission: Admission | None = None,
) -> None:
    """Serve as a seed until `stop` is set.

    Args:
        bootstrap: other seeds to join (failing to reach them is logged, not fatal: the first seed
            of a network has nobody to join).
        contacts_path: where to save contacts every refresh, and read them back at start.
        on_ready: set to the contact string once listening.
        admission: who may take part in the run (default open): a closed run's seed holds and
            serves only admitted contacts.
    """
    admission = admission if admission is not None else Admission()
    async with KademliaOverlay(config, key, role="seed", admission=admission) as overlay:
        log.info("seed %s listening; contact string: %s", overlay.short_id, overlay.contact_string)
        log.info("seed %s admits: %s", overlay.short_id, admission.describe())
        if on_ready is not None:
            on_ready.set_result(overlay.contact_string)
        known = list(bootstrap)
        if contacts_path is not None and await asyncio.to_thread(contacts_path.exists):
            known += await asyncio.to_thread(load_contacts, contacts_path)
        if known:
            try:
                await overlay.bootstrap(known)
            except OverlayError as err:
                log.warning("seed starts alone: %s", err)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=config.refresh_interval_s)
            except TimeoutError:
                await _save(overlay, contacts_path)
        await _save(overlay, contacts_path)
        log.info("seed %s stopped", overlay.short_id)
