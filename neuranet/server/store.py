"""The coordinator's persistent state: users, tokens, devices, presence history, telemetry.

All database access goes through :class:`Store`, so routers and the hub never
build queries themselves. Secrets are stored as SHA-256 hashes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import and_, bindparam, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from neuranet.server.file_records import FileRecords
from neuranet.server.identity_records import IdentityRecords, StoreError
from neuranet.server.models import ApiToken, Device, JoinToken, PresenceInterval, Run, RunDevice, TelemetryRow, User

_MIGRATIONS = Path(__file__).with_name("migrations")
JOIN_TOKEN_TTL = 24 * 3600.0
# Logins are cached this long; revoking a token, removing a device or disabling a user in this process
# clears them at once, and this bounds how long another coordinator process sharing the database lags.
AUTH_CACHE_SECONDS = 1.0
API_TOKEN_TTL = 90 * 24 * 3600.0  # default life of a new API token
AUTH_CACHE_SIZE = 10_000


class TraceExists(StoreError):
    """A trace was imported under this prefix before (import it with replace, or remove it)."""


SimulatedDevice = tuple[str, dict[str, Any], float, list[tuple[float, float]]]  # name, profile, created_at, online
TracePrefix = Callable[[str, Any], "str | None"]  # (device name, profile) -> the import it came from, or None


def new_id() -> str:
    return uuid.uuid4().hex


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated user behind a request (and the token it came with)."""

    user_id: str
    name: str
    is_admin: bool
    token_id: str = field(default="", compare=False)  # the same user whichever token it used


def _migrate(sync_conn: Any) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


class Store(FileRecords, IdentityRecords):
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"json_deserializer": _load_json}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer; queue writers here instead of failing with "database is locked".
        self._write_lock = asyncio.Lock() if url.startswith("sqlite") else None
        # token hash -> (when looked up, user, token expiry)
        self._auth_cache: dict[str, tuple[float, Principal, float | None]] = {}

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        if self._write_lock is None:
            async with self.session.begin() as s:
                yield s
            return
        async with self._write_lock:
            async with self.session.begin() as s:
                yield s

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_migrate)

    async def close(self) -> None:
        await self.engine.dispose()

    # --- users and tokens -------------------------------------------------------

    async def user_count(self) -> int:
        async with self.session() as s:
            return (await s.execute(select(func.count()).select_from(User))).scalar_one()

    async def create_user(self, name: str, *, is_admin: bool = False,
                          token_expires_in: float | None = None) -> tuple[Principal, str]:
        """Create a user and its first API token (expiring in ``token_expires_in`` seconds, None: never);
        returns the token in clear, once."""
        try:
            async with self._tx() as s:
                if (await s.execute(select(User).where(User.name == name))).scalar_one_or_none():
                    raise StoreError(f"user {name!r} already exists")
                user = User(id=new_id(), name=name, is_admin=is_admin, created_at=time.time(), disabled=False)
                s.add(user)
        except IntegrityError:  # a concurrent create_user won the race for the name
            raise StoreError(f"user {name!r} already exists") from None
        token = await self.create_api_token(user.id, "initial", token_expires_in)
        return Principal(user.id, user.name, user.is_admin), token

    async def create_api_token(self, user_id: str, name: str, expires_in: float | None = API_TOKEN_TTL) -> str:
        """A new API token of the user, valid ``expires_in`` seconds (None: until revoked); in clear, once."""
        token = "nn_" + secrets.token_urlsafe(32)
        now = time.time()
        async with self._tx() as s:
            s.add(ApiToken(id=new_id(), user_id=user_id, name=name, token_hash=hash_secret(token), created_at=now,
                           expires_at=None if expires_in is None else now + expires_in))
        return token

    async def authenticate(self, token: str) -> Principal | None:
        """The user behind an API token, unless it expired or its user is disabled. A valid token is
        remembered for `AUTH_CACHE_SECONDS` (a file transfer makes a request per chunk); revocation
        forgets it at once (`forget_logins`); an invalid one is looked up every time."""
        key = hash_secret(token)
        cached = self._auth_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < AUTH_CACHE_SECONDS and (
                cached[2] is None or cached[2] > time.time()):
            return cached[1]
        self._auth_cache.pop(key, None)
        async with self.session() as s:
            row = (
                await s.execute(select(User, ApiToken.id, ApiToken.expires_at)
                                .join(ApiToken, ApiToken.user_id == User.id).where(ApiToken.token_hash == key))
            ).first()
        if row is None:
            return None
        user, token_id, expires_at = row
        if user.disabled or (expires_at is not None and expires_at <= time.time()):
            return None
        if len(self._auth_cache) >= AUTH_CACHE_SIZE:
            self._auth_cache.clear()
        who = Principal(user.id, user.name, user.is_admin, token_id)
        self._auth_cache[key] = (time.monotonic(), who, expires_at)
        return who

    async def create_join_token(self, user_id: str, ttl: float = JOIN_TOKEN_TTL) -> tuple[str, float]:
        token = "nj_" + secrets.token_urlsafe(24)
        now = time.time()
        async with self._tx() as s:
            s.add(JoinToken(id=new_id(), user_id=user_id, token_hash=hash_secret(token), created_at=now, expires_at=now + ttl))
        return token, now + ttl

    # --- devices -----------------------------------------------------------------

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

    async def create_run(self, user_id: str, kind: str, device_ids: Iterable[str]) -> str:
        run_id = new_id()
        async with self._tx() as s:
            s.add(Run(id=run_id, user_id=user_id, kind=kind, created_at=time.time()))
            await s.flush()
            for d in dict.fromkeys(device_ids):
                s.add(RunDevice(run_id=run_id, device_id=d))
        return run_id

    async def list_runs(self, user_id: str, limit: int) -> list[tuple[Run, list[str]]]:
        """The user's newest runs and deployments (at most ``limit``), each with the devices it was given."""
        async with self.session() as s:
            runs = list((await s.scalars(select(Run).where(Run.user_id == user_id)
                                         .order_by(Run.created_at.desc()).limit(limit))).all())
            rows = (await s.execute(select(RunDevice.run_id, RunDevice.device_id)
                                    .where(RunDevice.run_id.in_([r.id for r in runs])))).all()
        devices: dict[str, list[str]] = {}
        for run_id, device_id in rows:
            devices.setdefault(run_id, []).append(device_id)
        return [(r, devices.get(r.id, [])) for r in runs]

    # --- presence history and telemetry -------------------------------------------

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


async def _devices_named(s: AsyncSession, user_id: str) -> list[Any]:
    """(id, name, profile) of each of a user's devices."""
    return list((await s.execute(select(Device.id, Device.name, Device.profile).where(Device.user_id == user_id))).all())


async def _delete_devices(s: AsyncSession, device_ids: list[str]) -> None:
    """Delete devices; their presence, telemetry and replicas go with them (ON DELETE CASCADE)."""
    for start in range(0, len(device_ids), 500):
        await s.execute(delete(Device).where(Device.id.in_(device_ids[start:start + 500])))


async def _end_presence(s: AsyncSession, device_id: str, at: float) -> None:
    """Close the device's open interval (if any) at ``at``; that is also when it was last seen."""
    await s.execute(
        update(PresenceInterval)
        .where(and_(PresenceInterval.device_id == device_id, PresenceInterval.end.is_(None)))
        .values(end=at)
    )
    await s.execute(update(Device).where(Device.id == device_id).values(last_seen=at))


def _load_json(text: str) -> Any:
    """A JSON column's value. One stored before values were bounded that cannot be decoded (nested past
    the recursion limit) reads as None, so the rest of its row, and every other row, still loads."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
