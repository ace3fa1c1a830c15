"""Files as content-addressed chunks: split a stream, name each piece by its SHA-256, verify on read.

A file is read in pieces of `CHUNK_SIZE` bytes (the last one shorter), never whole. Each piece is
named by the SHA-256 of the bytes that are stored (the ciphertext when the file is encrypted, see
`neuranet.storage.sealing`), so a device, the coordinator and the reader can all check a chunk
without the key, and identical plaintext chunks of one user are stored once. The `Manifest` lists
a file's chunks in order; it is what the coordinator keeps about a file.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Any

CHUNK_SIZE = 2 ** 20  # one chunk travels as one ~1 MiB message (the server caps a message at 4 MiB)
MAX_CHUNK_SIZE = 2 * 2 ** 20  # what a device or the coordinator accepts as one chunk
MAX_FILE_BYTES = 64 * 2 ** 30  # the largest file the coordinator records
MAX_FILE_CHUNKS = MAX_FILE_BYTES // CHUNK_SIZE  # so a manifest names at most this many chunks (~6 MB of JSON)
HEX_LEN = 64


class ChunkError(ValueError):
    """A chunk is malformed or its bytes do not match its name."""


def chunk_id(data: bytes) -> str:
    """The name of a chunk: the SHA-256 of its stored bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def is_chunk_id(name: str) -> bool:
    return len(name) == HEX_LEN and all(c in "0123456789abcdef" for c in name)


def verify(name: str, data: bytes) -> bytes:
    """``data`` if its SHA-256 is ``name``; `ChunkError` otherwise (a bad replica)."""
    if not is_chunk_id(name):
        raise ChunkError(f"not a chunk name: {name!r}")
    if not hmac.compare_digest(chunk_id(data), name):
        raise ChunkError(f"chunk {name[:12]}: content does not match its hash ({len(data)} bytes)")
    return data


def read_pieces(stream: BinaryIO, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Consecutive pieces of ``size`` bytes from a binary stream (the last may be shorter; none for
    an empty stream)."""
    if not 0 < size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in (0, {MAX_CHUNK_SIZE}], got {size}")
    while True:
        piece = stream.read(size)
        while piece and len(piece) < size:  # a pipe or socket may return short reads
            more = stream.read(size - len(piece))
            if not more:
                break
            piece += more
        if not piece:
            return
        yield piece


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file: its name and stored size."""

    id: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size}


@dataclass(frozen=True, slots=True)
class Manifest:
    """A file as the coordinator knows it: chunks in order, their total size and hash, how it is sealed.

    ``size`` and ``sha256`` are of the stored bytes: the plaintext's, or for a sealed file the
    ciphertext's (its plaintext's size and hash are inside ``sealing``, in its sealed manifest)."""

    name: str
    size: int  # stored bytes
    chunks: tuple[ChunkRef, ...]
    sha256: str  # of the stored bytes in order, checked after a download
    sealing: dict[str, Any] | None = None  # `Sealer.describe()` when encrypted; None otherwise

    @property
    def stored_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "sealing": self.sealing,
                "chunks": [c.to_json() for c in self.chunks]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        try:
            chunks = tuple(ChunkRef(str(c["id"]), int(c["size"])) for c in data["chunks"])
            manifest = cls(str(data["name"]), int(data["size"]), chunks, str(data["sha256"]), data.get("sealing"))
        except (KeyError, TypeError, ValueError) as e:
            raise ChunkError(f"malformed manifest: {e}") from e
        bad = [c.id for c in chunks if not is_chunk_id(c.id) or not 0 <= c.size <= MAX_CHUNK_SIZE]
        if bad:
            raise ChunkError(f"malformed manifest: bad chunk {bad[0]!r}")
        return manifest


def split(stream: BinaryIO, seal: Any | None = None, size: int = CHUNK_SIZE) -> Iterator[tuple[ChunkRef, bytes]]:
    """(ref, stored bytes) for each piece of ``stream``, sealed by ``seal(index, piece)`` when given."""
    for index, piece in enumerate(read_pieces(stream, size)):
        stored = seal(index, piece) if seal is not None else piece
        yield ChunkRef(chunk_id(stored), len(stored)), stored


def unique(refs: Iterable[ChunkRef]) -> list[ChunkRef]:
    """Each chunk once, in first-seen order (a file may repeat a chunk; it is stored once)."""
    seen: set[str] = set()
    out = []
    for r in refs:
        if r.id not in seen:
            seen.add(r.id)
            out.append(r)
    return out
