"""Telemetry intake: a rate limit per device, and rows made ready for the database. Pure.

Samples beyond a device's rate are dropped and counted, not queued: a device that sends thousands a
second must not grow the history (or hold SQLite's single writer lock on everyone's behalf). A
sample's ``ts`` comes from the device's clock, so one from the future is recorded as "now": retention
deletes by ``ts``, and a device must not be able to keep its rows forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuranet.protocol import messages as m

PRUNE_BATCH = 5000  # telemetry rows deleted per maintenance round at most (a short write transaction)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "TokenBucket":
        return cls(rate, burst, burst, now)

    def take(self, wanted: int, now: float) -> int:
        """Take up to ``wanted`` whole tokens; how many were granted."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


class TelemetryIntake:
    """Samples waiting for the next flush, within each device's allowance."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.rows: list[dict[str, Any]] = []
        self.dropped = 0  # samples refused since the server started

    def bucket(self, now: float) -> TokenBucket:
        """A fresh allowance for a device that just connected."""
        return TokenBucket.full(self.rate, self.burst, now)

    def add(self, device_id: str, bucket: TokenBucket, samples: list[m.TelemetrySample], now: float,
            wall_now: float) -> int:
        """Keep what the device's allowance grants (the first samples); returns how many were dropped."""
        kept = bucket.take(len(samples), now)
        for s in samples[:kept]:
            self.rows.append({"device_id": device_id, **s.model_dump(), "ts": min(s.ts, wall_now)})
        dropped = len(samples) - kept
        self.dropped += dropped
        return dropped

    def forget(self, device_id: str) -> None:
        """Drop a removed device's waiting samples (their rows would fail the flush for everyone)."""
        self.rows = [row for row in self.rows if row["device_id"] != device_id]

    def take_rows(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows
