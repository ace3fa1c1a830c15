"""BlobStore: integrity, concurrent puts, crash leftovers, bad digests, size bound."""

import asyncio
import hashlib

import pytest

from neuranet.server.blobs import BlobError, BlobStore


def run(coro):
    return asyncio.run(coro)


def test_put_get_has_delete(tmp_path):
    async def go():
        s = await BlobStore(tmp_path).open()
        d = await s.put(b"hello")
        assert d == hashlib.sha256(b"hello").hexdigest()
        assert s.path(d).parent.parent.name == d[:2]
        assert await s.has(d) and await s.get(d) == b"hello"
        assert await s.delete(d) and not await s.has(d)
        assert not await s.delete(d)
        with pytest.raises(KeyError):
            await s.get(d)
    run(go())


def test_streaming_writer_hashes_parts(tmp_path):
    async def go():
        s = await BlobStore(tmp_path).open()
        w = s.writer()
        for part in (b"ab", b"cd", b"ef"):
            await w.write(part)
        d = await w.commit(hashlib.sha256(b"abcdef").hexdigest())
        assert await s.get(d) == b"abcdef"
        assert list((tmp_path / "tmp").iterdir()) == []
    run(go())


def test_concurrent_puts_of_same_content(tmp_path):
    async def go():
        s = await BlobStore(tmp_path).open()
        ds = await asyncio.gather(*(s.put(b"x" * 10000) for _ in range(8)))
        assert len(set(ds)) == 1 and await s.get(ds[0]) == b"x" * 10000
        assert list((tmp_path / "tmp").iterdir()) == []
    run(go())


def test_crash_leftovers_removed_on_open(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "dead.tmp").write_bytes(b"partial")
    run(BlobStore(tmp_path).open())
    assert list((tmp_path / "tmp").iterdir()) == []


def test_bad_digest_refused(tmp_path):
    async def go():
        s = await BlobStore(tmp_path).open()
        with pytest.raises(BlobError):
            await s.put(b"data", expected="0" * 64)
        with pytest.raises(BlobError):
            await s.get("../../etc/passwd")
        with pytest.raises(BlobError):
            await s.has("ABC")
        assert list((tmp_path / "tmp").iterdir()) == []
    run(go())


def test_corrupt_blob_detected(tmp_path):
    async def go():
        s = await BlobStore(tmp_path).open()
        d = await s.put(b"good")
        s.path(d).write_bytes(b"evil")
        with pytest.raises(BlobError):
            await s.get(d)
    run(go())


def test_size_bound(tmp_path):
    async def go():
        s = await BlobStore(tmp_path, max_bytes=4).open()
        w = s.writer()
        await w.write(b"1234")
        with pytest.raises(BlobError):
            await w.write(b"5")
        assert list((tmp_path / "tmp").iterdir()) == []
    run(go())
