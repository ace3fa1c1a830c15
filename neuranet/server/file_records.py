"""The coordinator's records of files: which chunks make a file, and which devices hold each chunk.

`Store.files`. A chunk is kept once per user however many files use it; it is freed when the
last file that uses it is deleted. Nothing here talks to devices (see `server/files.py`).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from neuranet.errors import Conflict, NotFound
from neuranet.server.models import ChunkReplica, FileChunk, StoredFile
from neuranet.server.records import Repository


class FileRecordError(Conflict):
    """A file operation the records refuse (name taken, chunks missing)."""


class UnknownFile(NotFound, FileRecordError):
    """The user has no file of that name."""


class FileRecords(Repository):
    async def replicas_of(self, user_id: str, chunk_ids: list[str]) -> dict[str, list[str]]:
        """Holders of each of a user's chunks (chunks nobody holds are absent)."""
        out: dict[str, list[str]] = defaultdict(list)
        async with self.session() as s:
            for start in range(0, len(chunk_ids), 500):
                rows = await s.execute(select(ChunkReplica.chunk_id, ChunkReplica.device_id).where(
                    ChunkReplica.user_id == user_id, ChunkReplica.chunk_id.in_(chunk_ids[start:start + 500])))
                for chunk, device in rows:
                    out[chunk].append(device)
        return dict(out)

    async def add_replica(self, user_id: str, chunk_id: str, size: int, device_id: str) -> None:
        """Record that a device holds a chunk."""
        await self.add_replicas(user_id, chunk_id, size, [device_id])

    async def add_replicas(self, user_id: str, chunk_id: str, size: int, device_ids: list[str]) -> None:
        """Record that devices hold a chunk (one upsert statement: this runs for every chunk stored)."""
        if not device_ids:
            return
        async with self._tx() as s:
            insert = pg_insert if s.bind.dialect.name == "postgresql" else sqlite_insert
            now = time.time()
            rows = [{"user_id": user_id, "chunk_id": chunk_id, "device_id": d, "size": size, "stored_at": now}
                    for d in dict.fromkeys(device_ids)]
            await s.execute(insert(ChunkReplica).values(rows).on_conflict_do_update(
                index_elements=["user_id", "chunk_id", "device_id"], set_={"size": size, "stored_at": now}))

    async def remove_replica(self, user_id: str, chunk_id: str, device_id: str) -> None:
        async with self._tx() as s:
            await s.execute(delete(ChunkReplica).where(ChunkReplica.user_id == user_id, ChunkReplica.chunk_id == chunk_id,
                                                       ChunkReplica.device_id == device_id))

    async def create_file(self, user_id: str, name: str, size: int, sha256: str, replicas: int,
                          sealing: dict[str, Any] | None, chunks: list[tuple[str, int]],
                          overwrite: bool = False) -> tuple[StoredFile, dict[str, list[str]]]:
        """Record a file whose chunks are all stored; returns it and, when it replaced an older file of
        the same name, the replicas that are no longer used (device -> chunks) for the caller to delete."""
        freed: dict[str, list[str]] = {}
        async with self._tx() as s:
            wanted = sorted({c for c, _ in chunks})
            held: set[str] = set()
            for start in range(0, len(wanted), 500):  # a database binds a bounded number of parameters
                held.update((await s.execute(select(ChunkReplica.chunk_id).where(
                    ChunkReplica.user_id == user_id, ChunkReplica.chunk_id.in_(wanted[start:start + 500])))).scalars())
            missing = [c for c, _ in chunks if c not in held]
            if missing:
                raise FileRecordError(f"{len(missing)} chunk(s) of {name!r} are not stored (first: {missing[0][:12]}); "
                                      "upload them first")
            old = (await s.execute(select(StoredFile).where(StoredFile.user_id == user_id,
                                                            StoredFile.name == name))).scalar_one_or_none()
            old_chunks: set[str] = set()
            if old is not None:
                if not overwrite:
                    raise FileRecordError(f"a file named {name!r} already exists (delete it, or overwrite)")
                old_chunks = await _chunks_of(s, old.id)
                await s.delete(old)
                await s.flush()
            row = StoredFile(id=uuid.uuid4().hex, user_id=user_id, name=name, size=size, sha256=sha256,
                             replicas=replicas, sealing=sealing, created_at=time.time())
            s.add(row)
            await s.flush()  # the file row first: its chunks refer to it
            s.add_all(FileChunk(file_id=row.id, idx=i, chunk_id=c, size=n) for i, (c, n) in enumerate(chunks))
            await s.flush()
            freed = await _free_unused(s, user_id, old_chunks)
        return row, freed

    async def get_file(self, user_id: str, name: str) -> tuple[StoredFile, list[FileChunk]] | None:
        async with self.session() as s:
            row = (await s.execute(select(StoredFile).where(StoredFile.user_id == user_id,
                                                            StoredFile.name == name))).scalar_one_or_none()
            if row is None:
                return None
            chunks = (await s.execute(select(FileChunk).where(FileChunk.file_id == row.id)
                                      .order_by(FileChunk.idx))).scalars().all()
            return row, list(chunks)

    async def list_files(self, user_id: str) -> list[StoredFile]:
        async with self.session() as s:
            rows = await s.execute(select(StoredFile).where(StoredFile.user_id == user_id).order_by(StoredFile.name))
            return list(rows.scalars())

    async def delete_file(self, user_id: str, name: str) -> dict[str, list[str]]:
        """Forget a file; returns the replicas no file uses any more (device -> chunks), already removed
        from the records, for the caller to delete on the devices."""
        async with self._tx() as s:
            row = (await s.execute(select(StoredFile).where(StoredFile.user_id == user_id,
                                                            StoredFile.name == name))).scalar_one_or_none()
            if row is None:
                raise UnknownFile(f"no file named {name!r}")
            chunks = await _chunks_of(s, row.id)
            await s.delete(row)
            await s.flush()
            return await _free_unused(s, user_id, chunks)

    async def device_chunks(self, device_id: str) -> dict[str, int]:
        """Chunks the records say a device holds, with their sizes."""
        async with self.session() as s:
            rows = await s.execute(select(ChunkReplica.chunk_id, ChunkReplica.size)
                                   .where(ChunkReplica.device_id == device_id))
            return dict(rows.all())

    async def stored_chunks(self, user_id: str) -> list[tuple[str, int, int, list[str]]]:
        """Every chunk a user's files use: (chunk, size, replicas wanted, holders)."""
        async with self.session() as s:
            wanted = await s.execute(
                select(FileChunk.chunk_id, func.max(FileChunk.size), func.max(StoredFile.replicas))
                .join(StoredFile, StoredFile.id == FileChunk.file_id)
                .where(StoredFile.user_id == user_id).group_by(FileChunk.chunk_id))
            holders: dict[str, list[str]] = defaultdict(list)
            for chunk, device in await s.execute(select(ChunkReplica.chunk_id, ChunkReplica.device_id)
                                                 .where(ChunkReplica.user_id == user_id)):
                holders[chunk].append(device)
            return [(c, int(n), int(k), holders.get(c, [])) for c, n, k in wanted]

    async def users_with_storage(self) -> list[str]:
        """Users with files or stored chunks."""
        async with self.session() as s:
            return list((await s.execute(select(StoredFile.user_id).union(select(ChunkReplica.user_id)))).scalars())

    async def touch_replicas(self, user_id: str, chunk_id: str) -> int:
        """Mark a chunk as just uploaded again (an upload in progress uses it: not an orphan); returns
        how many replicas it has (0: gone meanwhile, store it anew)."""
        async with self._tx() as s:
            done = await s.execute(update(ChunkReplica).where(ChunkReplica.user_id == user_id,
                                                              ChunkReplica.chunk_id == chunk_id)
                                   .values(stored_at=time.time()))
            return int(done.rowcount or 0)

    async def remove_orphans(self, user_id: str, before: float) -> dict[str, list[str]]:
        """Forget the replicas of chunks that no file of the user uses and that were last stored before
        ``before`` (uploads that never finished); returns them (device -> chunks) for the caller to
        delete on the devices."""
        async with self._tx() as s:
            used = select(FileChunk.chunk_id).join(StoredFile, StoredFile.id == FileChunk.file_id).where(
                StoredFile.user_id == user_id)
            stale = (select(ChunkReplica.chunk_id).where(ChunkReplica.user_id == user_id,
                                                         ChunkReplica.chunk_id.not_in(used))
                     .group_by(ChunkReplica.chunk_id).having(func.max(ChunkReplica.stored_at) < before))
            # One statement that says what it removed, so a replica recorded meanwhile is kept or reported,
            # never removed unreported; stored_at again in the outer WHERE, which PostgreSQL rechecks on
            # rows touched meanwhile.
            rows = await s.execute(delete(ChunkReplica).where(ChunkReplica.user_id == user_id,
                                                              ChunkReplica.chunk_id.in_(stale),
                                                              ChunkReplica.stored_at < before)
                                   .returning(ChunkReplica.chunk_id, ChunkReplica.device_id))
            freed: dict[str, list[str]] = defaultdict(list)
            for chunk, device in rows:
                freed[device].append(chunk)
            return dict(freed)


async def _chunks_of(s: AsyncSession, file_id: str) -> set[str]:
    return set((await s.execute(select(FileChunk.chunk_id).where(FileChunk.file_id == file_id))).scalars())


async def _free_unused(s: AsyncSession, user_id: str, candidates: set[str]) -> dict[str, list[str]]:
    """Remove the replicas of those ``candidates`` (chunks of a file just removed) that no file of the
    user uses any more; device -> chunks removed. Only candidates: chunks of an upload in progress
    belong to no file yet and must stay."""
    if not candidates:
        return {}
    freed: dict[str, list[str]] = defaultdict(list)
    ordered = sorted(candidates)
    for start in range(0, len(ordered), 500):  # a database binds a bounded number of parameters
        batch = ordered[start:start + 500]
        used = set((await s.execute(select(FileChunk.chunk_id).join(StoredFile, StoredFile.id == FileChunk.file_id)
                                    .where(StoredFile.user_id == user_id, FileChunk.chunk_id.in_(batch)))).scalars())
        gone = [c for c in batch if c not in used]
        if not gone:
            continue
        rows = (await s.execute(select(ChunkReplica.chunk_id, ChunkReplica.device_id).where(
            ChunkReplica.user_id == user_id, ChunkReplica.chunk_id.in_(gone)))).all()
        for chunk, device in rows:
            freed[device].append(chunk)
        await s.execute(delete(ChunkReplica).where(ChunkReplica.user_id == user_id, ChunkReplica.chunk_id.in_(gone)))
    return dict(freed)
