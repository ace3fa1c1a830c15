"""Content-addressed blob store: sha256-named files, atomic writes, all file I/O off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from pathlib import Path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TMP_SUFFIX = ".tmp"


class BlobError(Exception):
    """A blob was refused: bad digest, too large, or its content did not match."""


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BlobError(f"not a sha256 hex digest: {str(digest)[:80]!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobWriter:
    """Streams one blob in parts, hashing as it appends; ``commit`` makes it visible under its digest."""

    def __init__(self, store: "BlobStore") -> None:
        self._store = store
        self._hash = hashlib.sha256()
        self._size = 0
        self._tmp = store._tmp_path()
        self._file = None
        self._done = False

    def _open(self) -> None:
        self._file = open(self._tmp, "wb")

    async def write(self, data: bytes) -> None:
        if self._done:
            raise BlobError("blob writer already finished")
        if self._size + len(data) > self._store.max_bytes:
            await self.abort()
            raise BlobError(f"blob larger than {self._store.max_bytes} bytes")
        if self._file is None:
            await asyncio.to_thread(self._open)
        self._hash.update(data)
        self._size += len(data)
        await asyncio.to_thread(self._file.write, data)

    async def commit(self, expected: str | None = None) -> str:
        """Make the blob durable and visible; refuse it if ``expected`` is given and differs."""
        if self._done:
            raise BlobError("blob writer already finished")
        if self._file is None:
            await asyncio.to_thread(self._open)
        digest = self._hash.hexdigest()
        if expected is not None and digest != check_digest(expected):
            await self.abort()
            raise BlobError(f"content hashes to {digest}, not {expected}")
        self._done = True
        await asyncio.to_thread(self._store._install, self._file, self._tmp, digest)
        return digest

    async def abort(self) -> None:
        self._done = True
        await asyncio.to_thread(self._discard)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class BlobStore:
    """Blobs under ``root/ab/cd/<digest>``; a write is temp file + fsync + rename + dir fsync."""

    def __init__(self, root: Path, max_bytes: int = 8 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._tmp_dir = self.root / "tmp"

    def _open_sync(self) -> None:
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp_dir.glob(f"*{_TMP_SUFFIX}"):  # a crash mid-write left these
            leftover.unlink(missing_ok=True)

    async def open(self) -> "BlobStore":
        """Create the directories and remove temp files a crash left behind."""
        await asyncio.to_thread(self._open_sync)
        return self

    def path(self, digest: str) -> Path:
        d = check_digest(digest)
        return self.root / d[:2] / d[2:4] / d

    def _tmp_path(self) -> Path:
        return self._tmp_dir / f"{uuid.uuid4().hex}{_TMP_SUFFIX}"

    def _install(self, file, tmp: Path, digest: str) -> None:
        file.flush()
        os.fsync(file.fileno())
        file.close()
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # same content under the same name: a concurrent put is harmless
        _fsync_dir(final.parent)

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    async def put(self, data: bytes, expected: str | None = None) -> str:
        """Store ``data``; returns its sha256 hex digest."""
        w = self.writer()
        await w.write(data)
        return await w.commit(expected)

    def _get_sync(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(digest) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest} is corrupt on disk")
        return data

    async def get(self, digest: str) -> bytes:
        """The blob's bytes, verified; KeyError if absent."""
        return await asyncio.to_thread(self._get_sync, digest)

    async def has(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path(digest).is_file)

    async def delete(self, digest: str) -> bool:
        """Remove a blob; False if it was not there."""
        def _rm() -> bool:
            try:
                self.path(digest).unlink()
                return True
            except FileNotFoundError:
                return False
        return await asyncio.to_thread(_rm)
