"""A device's share of the fabric's files: chunks on disk under its data dir, within a quota.

Chunks live at ``<data_dir>/chunks/ab/abcdef…`` named by their SHA-256. A write goes to a temporary
file that is renamed into place, so a crash leaves either the whole chunk or nothing; every read
checks the hash, and a chunk that no longer matches (disk rot, tampering) is deleted and reported
missing, so the coordinator repairs it from another replica. The store rescans the directory when
it opens: what is on disk is what it holds.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path

from neuranet.storage.chunks import ChunkError, chunk_id, is_chunk_id

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


class StorageFull(Exception):
    """The chunk does not fit in what is left of the quota."""


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``1000`` (bytes) -> bytes; ValueError with the accepted forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 20G, 1.5T or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


class ChunkStore:
    def __init__(self, root: Path, quota_bytes: int) -> None:
        if quota_bytes < 0:
            raise ValueError("the storage quota cannot be negative")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self._sizes: dict[str, int] = {}
        self._writing: dict[str, threading.Event] = {}  # chunks being written: set when done
        self._written: dict[str, float] = {}  # monotonic time of recent writes (see `written_within`)
        self._lock = threading.Lock()
        if self.root.exists():
            for path in self.root.glob("*/*"):
                if is_chunk_id(path.name) and path.parent.name == path.name[:2]:
                    self._sizes[path.name] = path.stat().st_size
                elif path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a write that never finished

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.quota_bytes - self.used_bytes)

    def chunks(self) -> list[str]:
        with self._lock:
            return sorted(n for n in self._sizes if n not in self._writing)

    def __contains__(self, name: str) -> bool:
        return name in self._sizes and name not in self._writing

    def written_within(self, name: str, seconds: float) -> bool:
        """Whether this process wrote the chunk in the last ``seconds``."""
        return time.monotonic() - self._written.get(name, -math.inf) < seconds

    def _path(self, name: str) -> Path:
        if not is_chunk_id(name):
            raise ChunkError(f"not a chunk name: {name!r}")
        return self.root / name[:2] / name

    def put(self, name: str, data: bytes) -> None:
        """Keep a chunk (idempotent); `ChunkError` if the bytes are not ``name``, `StorageFull` if it
        does not fit."""
        path = self._path(name)
        if chunk_id(data) != name:
            raise ChunkError(f"chunk {name[:12]}: content does not match its hash")
        while True:
            with self._lock:  # puts run in worker threads: check and reserve the space at once
                self._written[name] = time.monotonic()
                writing = self._writing.get(name)
                if writing is None:
                    if name in self._sizes:
                        return
                    if len(data) > self.free_bytes:
                        raise StorageFull(f"storage quota full: {self.free_bytes} of {self.quota_bytes} bytes "
                                          f"free, chunk needs {len(data)}")
                    self._sizes[name] = len(data)
                    done = self._writing[name] = threading.Event()
                    break
            writing.wait(60.0)  # the same chunk is being written by another put: its outcome decides
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with self._lock:
                self._sizes.pop(name, None)
            raise
        finally:
            with self._lock:
                del self._writing[name]
                if len(self._written) > 10_000:  # keep only recent writes
                    cut = time.monotonic() - 3600.0
                    self._written = {n: t for n, t in self._written.items() if t > cut}
            done.set()

    def get(self, name: str) -> bytes:
        """The chunk's bytes; `KeyError` if not held, `ChunkError` (and the chunk is dropped) if it
        no longer matches its hash."""
        path = self._path(name)
        if name not in self:  # not held, or not written yet
            raise KeyError(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._sizes.pop(name, None)
            raise KeyError(name) from None
        if chunk_id(data) != name:
            self.delete(name)
            raise ChunkError(f"chunk {name[:12]} was damaged on this device and has been dropped")
        return data

    def delete(self, name: str) -> bool:
        """Drop a chunk; False if it was not held (or is being written: that write decides)."""
        path = self._path(name)
        with self._lock:
            if name in self._writing:
                return False
            held = self._sizes.pop(name, None) is not None
        path.unlink(missing_ok=True)
        return held
