"""The coordinator's records of devices (profile, last sign of life, who may link).

`Store.devices`; runs are `Store.runs` (`run_records.py`). Enrolment and removal are `Store.identity` (`identity_records.py`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, update

from neuranet.server.models import Device, RunDevice
from neuranet.server.records import Repository


class DeviceRecords(Repository):
    async def get_device(self, device_id: str) -> Device | None:
        async with self.session() as s:
            return await s.get(Device, device_id)

    async def list_devices(self, user_id: str) -> list[Device]:
        async with self.session() as s:
            rows = await s.execute(select(Device).where(Device.user_id == user_id).order_by(Device.created_at))
            return list(rows.scalars())

    async def set_profile(self, device_id: str, profile: dict[str, Any]) -> None:
        async with self._tx() as s:
            await s.execute(update(Device).where(Device.id == device_id).values(profile=profile))

    async def touch_devices(self, last_seen: dict[str, float]) -> None:
        """Record when each device was last heard from (batched by the hub)."""
        if not last_seen:
            return
        # One executemany instead of one UPDATE per device: at a few thousand agents the per-statement
        # round trips (ORM compile + a hop to the driver thread each) cost most of a core and held the
        # SQLite write lock long enough to stall enrolments.
        table = Device.__table__
        stmt = table.update().where(table.c.id == bindparam("_device_id")).values(last_seen=bindparam("_last_seen"))
        params = [{"_device_id": device_id, "_last_seen": ts} for device_id, ts in last_seen.items()]
        async with self._tx() as s:
            await s.execute(stmt, params)

    async def may_link(self, device_a: str, device_b: str) -> bool:
        """Two devices may open a PeerLink if they share an owner or a run."""
        async with self.session() as s:
            owners = dict((await s.execute(select(Device.id, Device.user_id).where(Device.id.in_([device_a, device_b])))).all())
            if len(owners) != 2:
                return False
            if owners[device_a] == owners[device_b]:
                return True
            a, b = RunDevice.__table__.alias("a"), RunDevice.__table__.alias("b")
            shared = await s.execute(
                select(a.c.run_id).join(b, a.c.run_id == b.c.run_id).where(a.c.device_id == device_a, b.c.device_id == device_b)
            )
            return shared.first() is not None
