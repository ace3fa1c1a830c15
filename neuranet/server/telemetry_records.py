"""The coordinator's records of device telemetry samples (CPU, memory, network, battery), pruned by age.

`Store.telemetry`. Rate limiting and batching of incoming samples is `server/telemetry.py`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select

from neuranet.server.models import TelemetryRow
from neuranet.server.records import Repository


class TelemetryRecords(Repository):
    async def add_telemetry(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            async with self._tx() as s:
                await s.execute(TelemetryRow.__table__.insert(), rows)

    async def prune_telemetry(self, before: float, batch: int) -> int:
        """Delete telemetry sampled before ``before``, at most ``batch`` rows, among the oldest written
        (rows are appended in time order, so only the first ``batch`` by id are looked at: no scan of
        the table when nothing is old); returns the rows deleted."""
        oldest = select(TelemetryRow.id, TelemetryRow.ts).order_by(TelemetryRow.id).limit(batch).subquery()
        async with self._tx() as s:
            result = await s.execute(delete(TelemetryRow).where(
                TelemetryRow.id.in_(select(oldest.c.id).where(oldest.c.ts < before))))
            return result.rowcount or 0

    async def telemetry(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        async with self.session() as s:
            rows = await s.execute(
                select(TelemetryRow).where(TelemetryRow.device_id == device_id).order_by(TelemetryRow.ts.desc()).limit(limit)
            )
            return [
                {c: getattr(r, c) for c in ("ts", "cpu_percent", "mem_percent", "mem_used", "net_sent", "net_recv",
                                            "battery_percent", "power_plugged")}
                for r in reversed(list(rows.scalars()))
            ]
