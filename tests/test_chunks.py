"""Chunking and hashing of files, and a device's chunk store: pure, no network (sealing: test_sealing.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.storage.chunks import (
    ChunkError,
    ChunkRef,
    Manifest,
    chunk_id,
    read_pieces,
    split,
    unique,
    verify,
)


class Trickle(io.RawIOBase):
    """A stream that returns at most 3 bytes per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(min(n, 3) if n > 0 else 3)


def test_chunk_names_are_sha256_and_verified() -> None:
    data = b"hello"
    name = chunk_id(data)
    assert name == hashlib.sha256(data).hexdigest()
    assert verify(name, data) == data
    with pytest.raises(ChunkError, match="does not match its hash"):
        verify(name, b"hellO")
    with pytest.raises(ChunkError, match="not a chunk name"):
        verify("../etc/passwd", data)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 700))
def test_split_round_trips_and_pieces_are_full(data: bytes, size: int) -> None:
    parts = list(split(io.BytesIO(data), size=size))
    assert b"".join(p for _, p in parts) == data
    assert all(len(p) == size for _, p in parts[:-1])
    assert all(ref.id == chunk_id(p) and ref.size == len(p) for ref, p in parts)
    assert [p for p in read_pieces(Trickle(data), size)] == [p for _, p in parts]  # short reads refilled


def test_empty_files_and_bad_sizes() -> None:
    assert list(split(io.BytesIO(b""))) == []
    with pytest.raises(ValueError):
        list(read_pieces(io.BytesIO(b"x"), 0))


def test_identical_chunks_are_kept_once() -> None:
    parts = [ref for ref, _ in split(io.BytesIO(b"ab" * 8), size=4)]
    assert len(parts) == 4 and len(unique(parts)) == 1


def test_manifest_round_trip_and_bad_input() -> None:
    refs = tuple(ref for ref, _ in split(io.BytesIO(b"x" * 10), size=4))
    m = Manifest("a.txt", 10, refs, hashlib.sha256(b"x" * 10).hexdigest())
    assert Manifest.from_json(m.to_json()) == m and m.stored_bytes == 10
    bad = m.to_json() | {"chunks": [{"id": "nope", "size": 1}]}
    with pytest.raises(ChunkError, match="bad chunk"):
        Manifest.from_json(bad)
    with pytest.raises(ChunkError, match="malformed manifest"):
        Manifest.from_json({"name": "x"})
    assert ChunkRef("a" * 64, 3).to_json() == {"id": "a" * 64, "size": 3}


# -- a device's chunk store -------------------------------------------------------------------


def test_chunk_store_quota_verification_and_restart(tmp_path) -> None:
    from neuranet.agent.chunk_store import ChunkStore, StorageFull, parse_size

    store = ChunkStore(tmp_path / "chunks", quota_bytes=10)
    a, b = b"12345678", b"abc"
    store.put(chunk_id(a), a)
    store.put(chunk_id(a), a)  # idempotent
    assert store.used_bytes == 8 and store.free_bytes == 2 and chunk_id(a) in store
    with pytest.raises(StorageFull, match="quota full: 2 of 10 bytes free"):
        store.put(chunk_id(b), b)
    with pytest.raises(ChunkError, match="does not match"):
        store.put(chunk_id(b"x"), b"y")
    with pytest.raises(ChunkError, match="not a chunk name"):
        store.put("../../etc/passwd", b"x")
    assert store.get(chunk_id(a)) == a
    # What is on disk is what a reopened store holds; a half-written chunk is cleaned away.
    (tmp_path / "chunks" / "ab").mkdir()
    (tmp_path / "chunks" / "ab" / ("ab" + "0" * 62 + ".1.tmp")).write_bytes(b"partial")
    again = ChunkStore(tmp_path / "chunks", quota_bytes=10)
    assert again.chunks() == [chunk_id(a)] and not list((tmp_path / "chunks" / "ab").iterdir())
    # A chunk damaged on disk is dropped on read.
    path = tmp_path / "chunks" / chunk_id(a)[:2] / chunk_id(a)
    path.write_bytes(b"12345679")
    with pytest.raises(ChunkError, match="damaged"):
        again.get(chunk_id(a))
    assert chunk_id(a) not in again and not path.exists() and again.used_bytes == 0
    with pytest.raises(KeyError):
        again.get(chunk_id(a))
    assert again.delete(chunk_id(b)) is False
    assert parse_size("20G") == 20 * 2 ** 30 and parse_size("1.5k") == 1536 and parse_size("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_chunk_store_reads_and_puts_during_a_write(tmp_path, monkeypatch) -> None:
    import os
    import threading
    import time

    from neuranet.agent import chunk_store
    from neuranet.agent.chunk_store import ChunkStore

    store = ChunkStore(tmp_path / "chunks", quota_bytes=1000)
    data = b"x" * 100
    name = chunk_id(data)
    entered = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        time.sleep(0.3)
        real_fsync(fd)

    monkeypatch.setattr(chunk_store.os, "fsync", slow_fsync)
    first = threading.Thread(target=store.put, args=(name, data))
    first.start()
    assert entered.wait(5)
    # While it is written: not held yet for readers, deletes and the inventory, and nothing is lost.
    with pytest.raises(KeyError):
        store.get(name)
    assert name not in store and store.chunks() == [] and store.delete(name) is False
    second = threading.Thread(target=store.put, args=(name, data))  # the same chunk again waits for the first
    second.start()
    first.join(5)
    second.join(5)
    assert store.get(name) == data and store.chunks() == [name] and store.used_bytes == 100
    assert store.written_within(name, 60) and not store.written_within(chunk_id(b"other"), 60)


def test_every_list_of_chunk_names_fits_the_header_limit() -> None:
    from pydantic import ValidationError

    from neuranet.protocol import messages as m
    from neuranet.protocol.envelope import MAX_HEADER_BYTES, decode_frame, encode_frame

    full = ["f" * 64] * m.MAX_CHUNK_NAMES
    longest_id = "d" * m.MAX_ID_CHARS
    for msg in (m.ChunkInventory(quota_bytes=2 ** 63 - 1, used_bytes=2 ** 63 - 1, chunks=full, last=False),
                m.ChunkDelete(chunks=full, grace=86400.0), m.ChunkLost(chunks=full)):
        frame = encode_frame(msg.envelope(id=2 ** 63 - 1, src=longest_id, dst=longest_id))
        assert MAX_HEADER_BYTES - 4096 < len(frame) <= MAX_HEADER_BYTES  # full, and it fits
        assert m.parse(decode_frame(frame)) == msg
        with pytest.raises(ValidationError):  # one more name is refused before it is encoded
            type(msg).model_validate({**msg.model_dump(), "chunks": full + ["f" * 64]})
    with pytest.raises(ValidationError):
        m.ChunkDelete(chunks=["../../etc/passwd"])  # names only
    names = [f"{i:064x}" for i in range(2 * m.MAX_CHUNK_NAMES + 1)]
    batches = list(m.chunk_batches(names))
    assert [len(b) for b in batches] == [m.MAX_CHUNK_NAMES, m.MAX_CHUNK_NAMES, 1]
    assert sum(batches, []) == names and list(m.chunk_batches([])) == [[]]


async def test_inventory_pages_are_reconciled_whole_and_bounded(tmp_path) -> None:
    import asyncio
    from types import SimpleNamespace

    from neuranet.agent.chunk_store import ChunkStore
    from neuranet.agent.file_worker import FileWorker
    from neuranet.protocol import messages as m
    from neuranet.protocol.errors import MessageTooLarge
    from neuranet.server.files import FileBook
    from neuranet.server.fleet import Fleet

    store = ChunkStore(tmp_path / "chunks", quota_bytes=1000)
    names = []
    for i in range(5):
        data = bytes([i]) * 10
        store.put(chunk_id(data), data)
        names.append(chunk_id(data))
    sent: list = []

    async def send(msg, payload=b""):
        sent.append(msg)

    agent = SimpleNamespace(send=send, links=None, local=None)
    await FileWorker(agent, store).send_inventory()  # type: ignore[arg-type]
    assert [p.chunks for p in sent] == [sorted(names)] and sent[0].last

    # The coordinator reconciles once, against every page: it holds one of the five on record.
    async def device_chunks(device_id):
        return {names[0]: 10}

    records = SimpleNamespace(files=SimpleNamespace(device_chunks=device_chunks))
    told: list = []

    class Conn:  # a connection as FileBook sees it (weakly referenced, like the hub's)
        device_id, user_id = "d", "u"
        reply = send = staticmethod(told.append)

    conn = Conn()
    book = FileBook(Fleet({}), records, None, max_inventory=5)  # type: ignore[arg-type]
    pages = list(m.chunk_batches(names, per=2))
    for i, page in enumerate(pages):
        book.on_message(conn, m.ChunkInventory(quota_bytes=1000, used_bytes=50, chunks=page,  # type: ignore[arg-type]
                                               last=i == len(pages) - 1), b"")
    await book._tasks.join()  # the reconciliation runs in a task of the book's
    assert len(told) == 1 and sorted(told[0].chunks) == sorted(names[1:]) and told[0].grace > 0
    # Pages that never say `last` are held only up to the bound; past it the device is refused.
    for page in (names[:2], names[2:4]):
        book.on_message(conn, m.ChunkInventory(quota_bytes=1000, used_bytes=0, chunks=page, last=False), b"")  # type: ignore[arg-type]
    with pytest.raises(MessageTooLarge, match="passes 5 chunks"):
        book.on_message(conn, m.ChunkInventory(quota_bytes=1000, used_bytes=0, chunks=names[3:], last=False), b"")  # type: ignore[arg-type]
    assert conn not in book._inventories  # what it had sent is dropped
    await book.close()


async def test_deletes_of_100000_chunks_go_in_messages_that_fit(tmp_path) -> None:
    from types import SimpleNamespace

    from neuranet.config import Limits
    from neuranet.protocol import messages as m
    from neuranet.protocol.envelope import decode_frame
    from neuranet.server.files import FileBook
    from neuranet.server.fleet import Fleet
    from neuranet.server.hub import AgentConnection

    frames: list[bytes] = []

    async def write(frame: bytes) -> None:
        frames.append(frame)

    async def close(code: int, reason: str) -> None:
        raise AssertionError(f"closed: {reason}")

    conn = AgentConnection("d", "u", write, close, Limits.max_queued_bytes_per_peer)
    book = FileBook(Fleet({"d": conn}), None, None)  # type: ignore[arg-type]
    names = [f"{i:064x}" for i in range(100_000)]
    await book.delete_replicas({"d": names, "offline": names[:10]}, grace=5.0)  # a file deleted, say
    writer = asyncio.ensure_future(conn.writer())
    await conn.drained(timeout=30)
    await conn.close()
    await writer
    deletes = [m.parse(decode_frame(f, Limits.max_message_bytes)) for f in frames]
    assert all(isinstance(d, m.ChunkDelete) and d.grace == 5.0 for d in deletes)
    assert [c for d in deletes for c in d.chunks] == names and len(deletes) == -(-100_000 // m.MAX_CHUNK_NAMES)


async def test_chunks_kept_for_a_grace_are_reported_again_when_it_is_over(tmp_path) -> None:
    import asyncio
    from types import SimpleNamespace

    from neuranet.agent.chunk_store import ChunkStore
    from neuranet.agent.file_worker import FileWorker
    from neuranet.protocol import messages as m

    store = ChunkStore(tmp_path / "chunks", quota_bytes=1000)
    fresh, old = b"fresh" * 4, b"old" * 4
    store.put(chunk_id(old), old)
    await asyncio.sleep(0.3)
    store.put(chunk_id(fresh), fresh)
    sent: list = []

    async def send(msg, payload=b""):
        sent.append(msg)

    worker = FileWorker(SimpleNamespace(send=send, links=None, local=None, spawn=asyncio.ensure_future),  # type: ignore[arg-type]
                        store)
    delete = m.ChunkDelete(chunks=[chunk_id(fresh), chunk_id(old)], grace=0.2)
    await worker.delete(worker.agent, delete, b"")
    # The chunk written within the grace stays (its record may be on its way), the other goes ...
    assert store.chunks() == [chunk_id(fresh)] and sent == []
    # ... and once the grace is over the device says again what it holds, so that the coordinator
    # can delete it for good if no record came; that delete is no longer held back.
    await asyncio.sleep(0.4)
    assert len(sent) == 1 and sent[0].chunks == [chunk_id(fresh)] and sent[0].last
    await worker.delete(worker.agent, delete, b"")
    assert store.chunks() == []
    await asyncio.sleep(0.3)
    assert len(sent) == 1  # nothing kept, nothing to report again


def test_replication_reports_the_least_copied_chunk_and_how_many_are_short() -> None:
    from neuranet.server.files import Replication, replication

    held = {"a": ["d1", "d2", "d3"], "b": ["d1", "d2"], "c": ["d1", "d1", "d2", "d3", "d4"]}
    assert replication(["a", "b", "c"], held, 3) == Replication(3, 2, 1)
    assert replication(["a", "c"], held, 3) == Replication(3, 3, 0)  # more copies than asked: still 3 of 3
    assert replication(["b", "b", "x"], held, 2) == Replication(2, 0, 1)  # x has no holder left
    assert replication([], held, 3) == Replication(3, 3, 0)  # an empty file is as replicated as asked


def test_storage_figures_a_device_reports_fit_the_placement_arithmetic() -> None:
    from pydantic import ValidationError

    from neuranet.protocol import messages as m

    with pytest.raises(ValidationError):  # placement computes in int64: 2**63 used to raise there
        m.ChunkInventory(quota_bytes=2 ** 63, used_bytes=0, chunks=[])
    with pytest.raises(ValidationError):
        m.ChunkReply(request=1, chunk="a" * 64, ok=True, free_bytes=2 ** 63)
    assert m.ChunkInventory(quota_bytes=2 ** 63 - 1, used_bytes=0, chunks=[]).quota_bytes == 2 ** 63 - 1
