"""The coordinator's records of when each device was online: one interval per connection.

`Store.presence`; what the availability forecaster learns from.
"""

from __future__ import annotations

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from neuranet.server.models import Device, PresenceInterval
from neuranet.server.records import Repository


class PresenceRecords(Repository):
    async def open_presence(self, device_id: str, now: float) -> None:
        """The device connected: end any interval still open and start a new one (none for a device
        removed meanwhile: the hub then finds it revoked and closes the connection)."""
        async with self._tx() as s:
            if await s.get(Device, device_id) is None:
                return
            await _end_presence(s, device_id, now)
            s.add(PresenceInterval(device_id=device_id, start=now, end=None))

    async def close_presence(self, device_id: str, end: float) -> None:
        await self.close_presences({device_id: end})

    async def close_presences(self, ends: dict[str, float]) -> None:
        """End the open intervals of many devices at once (a shutdown with thousands online)."""
        if not ends:
            return
        async with self._tx() as s:
            for device_id, end in ends.items():
                await _end_presence(s, device_id, end)

    async def close_stale_presence(self) -> int:
        """After a restart, end every interval left open at the device's last sign of life."""
        async with self._tx() as s:
            open_rows = (
                await s.execute(
                    select(PresenceInterval, Device.last_seen)
                    .join(Device, Device.id == PresenceInterval.device_id)
                    .where(PresenceInterval.end.is_(None))
                )
            ).all()
            for interval, last_seen in open_rows:
                interval.end = max(interval.start, last_seen or interval.start)
        return len(open_rows)

    async def presence_history(self, device_id: str, since: float = 0.0) -> list[tuple[float, float | None]]:
        async with self.session() as s:
            rows = await s.execute(
                select(PresenceInterval.start, PresenceInterval.end)
                .where(PresenceInterval.device_id == device_id)
                .where((PresenceInterval.end.is_(None)) | (PresenceInterval.end >= since))
                .order_by(PresenceInterval.start)
            )
            return [(start, end) for start, end in rows.all()]

    async def all_presence(self, device_ids: list[str] | None = None) -> dict[str, tuple[Device, list[tuple[float, float | None]]]]:
        """Every device (or those named) with its online intervals, oldest first: what the forecaster learns from."""
        devices_q = select(Device)
        rows_q = select(PresenceInterval.device_id, PresenceInterval.start, PresenceInterval.end)
        if device_ids is not None:
            devices_q = devices_q.where(Device.id.in_(device_ids))
            rows_q = rows_q.where(PresenceInterval.device_id.in_(device_ids))
        async with self.session() as s:
            devices = {d.id: (d, []) for d in (await s.execute(devices_q)).scalars()}
            rows = await s.execute(rows_q.order_by(PresenceInterval.device_id, PresenceInterval.start))
            for device_id, start, end in rows.all():
                if device_id in devices:
                    devices[device_id][1].append((start, end))
        return devices  # type: ignore[return-value]


async def _end_presence(s: AsyncSession, device_id: str, at: float) -> None:
    """Close the device's open interval (if any) at ``at``; that is also when it was last seen."""
    await s.execute(
        update(PresenceInterval)
        .where(and_(PresenceInterval.device_id == device_id, PresenceInterval.end.is_(None)))
        .values(end=at)
    )
    await s.execute(update(Device).where(Device.id == device_id).values(last_seen=at))
