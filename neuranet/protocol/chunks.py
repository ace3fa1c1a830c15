"""Chunk-plane messages: a device keeps, fetches, copies, deletes and reports chunks for its owner.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Iterator

from pydantic import Field, StringConstraints

from neuranet.protocol.envelope import MAX_HEADER_BYTES
from neuranet.protocol.message_base import INT64_MAX, Message, Text

_ChunkName = Field(pattern=r"^[0-9a-f]{64}$")


class ChunkPut(Message):
    """Server asks a device to keep a chunk (payload: its bytes, named by their SHA-256)."""

    TYPE: ClassVar[str] = "chunk_put"
    request: int = Field(ge=0)
    chunk: str = _ChunkName


class ChunkFetch(Message):
    """Server asks a device for a chunk it holds; the reply carries the bytes."""

    TYPE: ClassVar[str] = "chunk_fetch"
    request: int = Field(ge=0)
    chunk: str = _ChunkName


ChunkName = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Lists of chunk names are sized by bytes: a name is 66 bytes of msgpack (a str8 header and 64 hex
# digits), and a message carrying a list keeps this much of the header limit for everything else.
_CHUNK_NAME_BYTES = 2 + 64
_HEADER_ROOM = 4096
MAX_CHUNK_NAMES = (MAX_HEADER_BYTES - _HEADER_ROOM) // _CHUNK_NAME_BYTES  # per message (3,909)


def chunk_batches(names: list[str], per: int = MAX_CHUNK_NAMES) -> Iterator[list[str]]:
    """``names`` in lists that each fit one message (at least one list, maybe empty)."""
    yield names[:per]
    for i in range(per, len(names), per):
        yield names[i:i + per]


class ChunkDelete(Message):
    """Server tells a device to drop chunks (no reply needed: a later inventory shows what is left).
    ``grace``: keep a copy written in the last that many seconds. The records do not know of copies
    being deleted as stale (an inventory check, unfinished uploads), and a copy that just arrived over
    a PeerLink may be one whose record is still on its way."""

    TYPE: ClassVar[str] = "chunk_delete"
    chunks: list[ChunkName] = Field(max_length=MAX_CHUNK_NAMES)
    grace: float = Field(0.0, ge=0.0, le=86400.0)


class ChunkCopy(Message):
    """Server asks a device to copy a chunk it holds to another of its owner's devices, over a
    PeerLink on the ``chunks`` channel (direct or relayed); the reply says how it went."""

    TYPE: ClassVar[str] = "chunk_copy"
    request: int = Field(ge=0)
    chunk: str = _ChunkName
    target: str = Field(min_length=1, max_length=128)


class ChunkReply(Message):
    """A device answers a put or fetch (payload: the chunk's bytes for a fetch); ``held`` is False
    when a fetched chunk is not (or, damaged, no longer) on the device; ``free_bytes`` is what its
    quota has left."""

    TYPE: ClassVar[str] = "chunk_reply"
    request: int = Field(ge=0)
    chunk: str = _ChunkName
    ok: bool
    error: Text = ""
    held: bool = True
    free_bytes: int = Field(0, ge=0, le=INT64_MAX)
    target_free_bytes: int = Field(-1, ge=-1, le=INT64_MAX)  # for a copy: what the target's quota has left (-1: unknown)


class ChunkPlace(Message):
    """A device uploads a chunk for its owner (a program on its machine gave it the bytes): it asks
    where the chunk should go. ``exclude``: devices that already failed to take it."""

    TYPE: ClassVar[str] = "chunk_place"
    request: int = Field(ge=0)
    chunk: str = _ChunkName
    size: int = Field(ge=0, le=16 << 20)
    replicas: int = Field(ge=1, le=16)
    exclude: list[str] = Field(default_factory=list, max_length=64)


class ChunkStored(Message):
    """The uploading device reports which devices now hold the chunk (it sent them the bytes over
    PeerLinks, or kept them itself); the server records them and answers with `ChunkPlaced`."""

    TYPE: ClassVar[str] = "chunk_stored"
    request: int = Field(ge=0)
    chunk: str = _ChunkName
    size: int = Field(ge=0, le=16 << 20)
    devices: list[str] = Field(max_length=64)


class ChunkPlaced(Message):
    """The server's answer to `ChunkPlace` (``holders``: who holds it already; ``targets``: where to send
    it) and to `ChunkStored` (``holders``: the devices just recorded); ``error`` when it cannot be placed."""

    TYPE: ClassVar[str] = "chunk_placed"
    request: int = Field(ge=0)
    chunk: str = _ChunkName
    holders: list[str] = Field(default_factory=list, max_length=64)
    targets: list[str] = Field(default_factory=list, max_length=64)
    error: Text = ""


class ChunkLost(Message):
    """A device found chunks damaged on its disk (a read failed its hash) and dropped them."""

    TYPE: ClassVar[str] = "chunk_lost"
    chunks: list[ChunkName] = Field(max_length=MAX_CHUNK_NAMES)


class ChunkInventory(Message):
    """A device's storage on connecting: its quota, bytes used, and the chunks it holds, in pages of
    at most `MAX_CHUNK_NAMES` names (``last`` on the final one)."""

    TYPE: ClassVar[str] = "chunk_inventory"
    quota_bytes: int = Field(ge=0, le=INT64_MAX)
    used_bytes: int = Field(ge=0, le=INT64_MAX)
    chunks: list[ChunkName] = Field(max_length=MAX_CHUNK_NAMES)
    last: bool = True
