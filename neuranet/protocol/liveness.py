"""When the other end of a control connection counts as gone: one rule for both ends. Pure: the
caller passes the time in.

Silence alone proves nothing: a side that was itself stalled (a paused process, a long collection, a
suspended laptop) finds every peer silent when it wakes. So a side declares its peer gone only once a
probe it sent has gone unanswered for ``timeout`` (the coordinator's ``offline_after``); any message
from the peer answers it. The agent's probes are its heartbeats, the coordinator's a heartbeat of its
own to an agent that missed one. A stall of either end shorter than ``timeout`` then drops nobody:
every probe sent before or during it is answered as soon as both ends run again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Liveness:
    """What one side knows of its peer: when it last heard from it, and the first probe since."""

    timeout: float  # a probe unanswered this long: the peer is gone
    probe_after: float  # silence after which a probe is due
    heard_at: float
    probe_sent_at: float | None = None  # the first probe sent since heard_at

    def heard(self, now: float) -> None:
        """Anything arrived from the peer: it answers every probe sent before."""
        self.heard_at = max(self.heard_at, now)
        self.probe_sent_at = None

    def probe_due(self, now: float) -> bool:
        return self.probe_sent_at is None and now - self.heard_at >= self.probe_after

    def probed(self, now: float) -> None:
        """A probe went out (only the first since the peer was last heard starts the clock)."""
        if self.probe_sent_at is None:
            self.probe_sent_at = now

    def gone(self, now: float) -> bool:
        return self.probe_sent_at is not None and now - self.probe_sent_at >= self.timeout

    @property
    def deadline(self) -> float:
        """When the peer counts as gone if nothing arrives (infinite while no probe is out)."""
        return math.inf if self.probe_sent_at is None else self.probe_sent_at + self.timeout
