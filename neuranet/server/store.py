"""The coordinator's persistent state: one database, and a repository per feature over it.

All database access goes through :class:`Store`'s repositories, so routers and the hub never
build queries themselves: ``store.users`` (users, API tokens, logins), ``store.identity`` (join
tokens, enrolment, device login and removal), ``store.devices``, ``store.runs``, ``store.presence``,
``store.traces`` (simulated devices), ``store.telemetry`` and ``store.files``. Secrets are stored as
SHA-256 hashes only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from neuranet.server.device_records import DeviceRecords
from neuranet.server.run_records import RunRecords
from neuranet.server.file_records import FileRecords
from neuranet.server.identity_records import JOIN_TOKEN_TTL, IdentityRecords
from neuranet.server.presence_records import PresenceRecords
from neuranet.server.records import Database, StoreError, UnknownRecord, hash_secret, new_id
from neuranet.server.telemetry_records import TelemetryRecords
from neuranet.server.trace_records import SimulatedDevice, TraceExists, TracePrefix, TraceRecords
from neuranet.server.user_records import API_TOKEN_TTL, AUTH_CACHE_SECONDS, AUTH_CACHE_SIZE, Principal, UserRecords

__all__ = ["API_TOKEN_TTL", "AUTH_CACHE_SECONDS", "AUTH_CACHE_SIZE", "JOIN_TOKEN_TTL", "Principal", "SimulatedDevice",
           "Store", "StoreError", "TraceExists", "TracePrefix", "UnknownRecord", "hash_secret", "new_id"]

_MIGRATIONS = Path(__file__).with_name("migrations")


def _migrate(sync_conn: Any) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


class Store:
    """The engine's lifecycle (`migrate`, `close`) and the repositories that share it."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"json_deserializer": _load_json}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)
        db = Database(self.session, serialise_writes=url.startswith("sqlite"))
        self._tx = db.tx
        self.users = UserRecords(db)
        self.identity = IdentityRecords(db)
        self.devices = DeviceRecords(db)
        self.runs = RunRecords(db)
        self.presence = PresenceRecords(db)
        self.traces = TraceRecords(db)
        self.telemetry = TelemetryRecords(db)
        self.files = FileRecords(db)

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_migrate)

    async def close(self) -> None:
        await self.engine.dispose()


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
