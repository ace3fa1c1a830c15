"""What every repository of the coordinator's store shares: the session factory and the one transaction helper.

`Store` builds one `Database` and hands it to each repository (`UserRecords`, `DeviceRecords`, ...);
a repository reads with ``self.session()`` and writes inside ``self._tx()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from typing import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neuranet.errors import Conflict, NotFound


class StoreError(Conflict):
    """A request the store refuses (it clashes with what is stored); the message says what to change."""


class UnknownRecord(NotFound, StoreError):
    """The request names a token, device or user that is not there (or not the caller's)."""


def new_id() -> str:
    return uuid.uuid4().hex


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Database:
    """Sessions on one engine, and the transaction every write goes through."""

    def __init__(self, session: async_sessionmaker[AsyncSession], *, serialise_writes: bool) -> None:
        self.session = session
        # SQLite allows one writer; queue writers here instead of failing with "database is locked".
        self._write_lock = asyncio.Lock() if serialise_writes else None

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed on exit (rolled back on an exception)."""
        async with self._write_lock or contextlib.nullcontext():
            async with self.session.begin() as s:
                yield s


class Repository:
    """One feature's records: reads with `session`, writes inside `_tx`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.session = db.session
        self._tx = db.tx
