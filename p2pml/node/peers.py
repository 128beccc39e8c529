"""`RunPeers`: the other nodes of this node's run that it knows, with their last reported steps.

A contact becomes a run peer when its signed ``info`` record says role ``peer``, carries an HTTP
endpoint and this run's tag. Nodes of another run (or with another manifest) are remembered apart,
so they are asked once, logged once and never sampled. A peer that misses `misses_to_forget`
RPCs in a row is forgotten; a peer that reports ``done`` stays known (so it is not rediscovered)
but is never sampled or sent deltas again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from p2pml.core.run import RunManifest
from p2pml.core.types import Address, PeerId, Step
from p2pml.protocol.dht import Contact, NodeRecord, StepReport

__all__ = ["RunPeer", "RunPeers"]

log = logging.getLogger(__name__)

MAX_STRANGERS: Final = 4096


@dataclass(slots=True)
class RunPeer:
    """What this node knows of one peer of its run."""

    contact: Contact
    http: Address
    step: Step
    done: bool = False
    misses: int = 0


class RunPeers:
    """The run's peers as this node knows them; mutated on the event loop only."""

    def __init__(self, manifest: RunManifest, *, misses_to_forget: int) -> None:
        self.manifest = manifest
        self.misses_to_forget = misses_to_forget
        self.peers: dict[PeerId, RunPeer] = {}
        self.strangers: OrderedDict[PeerId, str] = OrderedDict()  # peer -> why it is not one
        self.n_forgotten = 0

    def __contains__(self, peer: PeerId) -> bool:
        return peer in self.peers

    def is_known(self, peer: PeerId) -> bool:
        return peer in self.peers or peer in self.strangers

    def live(self) -> list[PeerId]:
        """Peers that have not finished, sorted by peer id (a stable order for sampling)."""
        return sorted(p for p, rp in self.peers.items() if not rp.done)

    def consider(self, contact: Contact, record: NodeRecord) -> bool:
        """Add `contact` if its record shows a peer of this run; True when it is one."""
        why = self._why_not(record)
        if why is None:
            assert record.http is not None
            known = self.peers.get(contact.peer_id)
            if known is None:
                self.peers[contact.peer_id] = RunPeer(
                    contact, record.http, record.step, record.done
                )
                self.strangers.pop(contact.peer_id, None)
                log.info(
                    "run peer %s at %s (step %d)",
                    contact.peer_id.hex()[:8],
                    record.http,
                    record.step,
                )
            else:
                known.contact, known.http = contact, record.http
                known.step, known.done = max(known.step, record.step), known.done or record.done
            return True
        if contact.peer_id not in self.strangers:
            if record.role == "peer" and record.run:
                log.warning("refusing peer %s: %s", contact.peer_id.hex()[:8], why)
            self.strangers[contact.peer_id] = why
            while len(self.strangers) > MAX_STRANGERS:
                self.strangers.popitem(last=False)
        return False

    def _why_not(self, record: NodeRecord) -> str | None:
        if record.role != "peer":
            return f"its role is {record.role}"
        if record.http is None:
            return "it has no data plane"
        return self.manifest.mismatch(record.run)

    def answered(self, peer: PeerId, report: StepReport) -> None:
        rp = self.peers.get(peer)
        if rp is not None:
            rp.step, rp.misses = report.step, 0
            if report.done and not rp.done:
                rp.done = True
                log.info("run peer %s finished at step %d", peer.hex()[:8], report.step)

    def missed(self, peer: PeerId) -> bool:
        """Count an unanswered RPC; True when the peer is forgotten because of it."""
        rp = self.peers.get(peer)
        if rp is None:
            return False
        rp.misses += 1
        if rp.misses < self.misses_to_forget:
            return False
        del self.peers[peer]
        self.n_forgotten += 1
        log.warning("run peer %s stopped answering; forgotten", peer.hex()[:8])
        return True

    def mark_done(self, peer: PeerId) -> None:
        rp = self.peers.get(peer)
        if rp is not None:
            rp.done = True
