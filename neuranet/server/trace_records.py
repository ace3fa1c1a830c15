"""The coordinator's simulated devices: hosts of an imported availability trace, history only.

`Store.traces`. Such a device has a key no one holds, so it never connects; it is there for the
forecaster and the planner to learn from and place on.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from neuranet.server.models import Device, PresenceInterval, User
from neuranet.server.records import Repository, StoreError, new_id


class TraceExists(StoreError):
    """A trace was imported under this prefix before (import it with replace, or remove it)."""


SimulatedDevice = tuple[str, dict[str, Any], float, list[tuple[float, float]]]  # name, profile, created_at, online
TracePrefix = Callable[[str, Any], "str | None"]  # (device name, profile) -> the import it came from, or None


class TraceRecords(Repository):
    async def add_simulated_devices(self, user_id: str, devices: list[SimulatedDevice], *, prefix_of: TracePrefix,
                                    prefix: str, replace: bool = False, limit: int | None = None) -> list[str]:
        """Devices that exist only as history (an imported trace): (name, profile, created_at, online intervals).

        Each gets a random public key that no one holds, so it can never connect; its last sign of
        life is the end of its history (``profile["history_end"]``). ``prefix_of`` names the import
        a device came from (None: not imported): devices of an earlier import of ``prefix`` are
        replaced when ``replace``, else refused, and the user keeps at most ``limit`` in all. One
        transaction: a refused import leaves nothing behind.
        """
        ids = []
        names = [d[0] for d in devices]
        async with self._tx() as s:
            # one import per user at a time (PostgreSQL; SQLite's writers are serialised anyway)
            await s.execute(select(User.id).where(User.id == user_id).with_for_update())
            mine = await _devices_named(s, user_id)
            imported = [(d, prefix_of(name, profile)) for d, name, profile in mine]
            same = [d for d, p in imported if p == prefix]
            if same and not replace:
                raise TraceExists(f"{len(same)} devices of a trace imported as {prefix!r} exist already; import again "
                                  f"with replace (CLI: --replace), or remove them (`neuranet trace rm {prefix}`)")
            kept = sum(1 for _, p in imported if p is not None and p != prefix)
            if limit is not None and kept + len(devices) > limit:
                raise StoreError(f"the trace has {len(devices)} hosts; with your {kept} other simulated devices that "
                                 f"is more than the {limit} a user may have (remove some with `neuranet trace rm`)")
            await _delete_devices(s, same)
            gone = set(same)
            taken = {name for d, name, _ in mine if d not in gone} & set(names)
            if taken or len(set(names)) < len(names):
                clash = sorted(taken)[0] if taken else next(n for n in names if names.count(n) > 1)
                raise StoreError(f"you already have a device named {clash!r} ({len(taken) or 1} name(s) clash): "
                                 "import with another --prefix, or remove those devices first")
            for name, profile, created_at, online in devices:
                device = Device(id=new_id(), user_id=user_id, name=name, public_key=os.urandom(32),
                                profile=profile, created_at=created_at, last_seen=profile.get("history_end"))
                s.add(device)
                ids.append(device.id)
            await s.flush()
            rows = [{"device_id": device_id, "start": a, "end": b}
                    for device_id, (_, _, _, online) in zip(ids, devices) for a, b in online]
            if rows:
                await s.execute(PresenceInterval.__table__.insert(), rows)
        return ids

    async def remove_simulated_devices(self, user_id: str, prefix: str, prefix_of: TracePrefix) -> int:
        """Remove the devices of the trace imported as ``prefix`` (with their history); how many."""
        async with self._tx() as s:
            mine = await _devices_named(s, user_id)
            gone = [d for d, name, profile in mine if prefix_of(name, profile) == prefix]
            await _delete_devices(s, gone)
        return len(gone)


async def _devices_named(s: AsyncSession, user_id: str) -> list[Any]:
    """(id, name, profile) of each of a user's devices."""
    return list((await s.execute(select(Device.id, Device.name, Device.profile).where(Device.user_id == user_id))).all())


async def _delete_devices(s: AsyncSession, device_ids: list[str]) -> None:
    """Delete devices; their presence, telemetry and replicas go with them (ON DELETE CASCADE)."""
    for start in range(0, len(device_ids), 500):
        await s.execute(delete(Device).where(Device.id.in_(device_ids[start:start + 500])))
