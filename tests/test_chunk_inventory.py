"""A device holding 100,000 chunks against a real coordinator: its inventory goes in pages that fit the
protocol's header limit, it stays connected, and a file of 50,000 of them can be deleted."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric_helpers import async_wait_for, free_port
from neuranet.agent import file_worker
from neuranet.agent.chunk_store import ChunkStore
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from neuranet.fabric import LocalFabric
from neuranet.server.models import ChunkReplica, FileChunk, StoredFile
from neuranet.server.store import Store

pytestmark = pytest.mark.slow
N = 100_000


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory where there is one: creating 100,000 files on this disk takes up to a
    minute, in tmpfs about a second."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="neuranet-test-") as d:
        yield Path(d)


def make_chunk_files(root: Path, names: list[str]) -> None:
    """Empty files named like chunks, where the store looks (it reads names and sizes when it opens;
    contents are checked only when a chunk is read, which this test never does)."""
    for prefix in {n[:2] for n in names}:
        (root / prefix).mkdir(parents=True, exist_ok=True)
    for name in names:
        os.close(os.open(root / name[:2] / name, os.O_CREAT | os.O_WRONLY, 0o644))


async def record_file(db_url: str, user_id: str, device_id: str, name: str, chunks: list[str]) -> None:
    """The records an upload of ``chunks`` to ``device_id`` would leave, written in bulk (uploading
    100,000 chunks over REST would take minutes)."""
    store = Store(db_url)
    try:
        async with store._tx() as s:
            now = time.time()
            await s.execute(ChunkReplica.__table__.insert(), [
                {"user_id": user_id, "chunk_id": c, "device_id": device_id, "size": 0, "stored_at": now}
                for c in chunks])
            await s.execute(StoredFile.__table__.insert(), [
                {"id": "f" * 32, "user_id": user_id, "name": name, "size": 0, "sha256": "0" * 64, "replicas": 1,
                 "sealing": None, "created_at": now}])
            await s.execute(FileChunk.__table__.insert(), [
                {"file_id": "f" * 32, "idx": i, "chunk_id": c, "size": 0} for i, c in enumerate(chunks)])
    finally:
        await store.close()


def storing_agent(cfg: AgentConfig) -> tuple[Agent, ChunkStore]:
    agent = Agent(cfg)
    store = ChunkStore(cfg.data_dir / "chunks", cfg.storage_bytes)
    file_worker.install(agent, store)
    return agent, store


async def test_a_device_holding_100000_chunks_stays_connected_and_a_big_file_deletes(tmp_path: Path,
                                                                                     fast_dir: Path) -> None:
    names = sorted(hashlib.sha256(i.to_bytes(4, "big")).hexdigest() for i in range(N))
    kept, stale = names[: N // 2], names[N // 2 :]
    with LocalFabric(tmp_path / "fabric") as fabric:
        await asyncio.to_thread(fabric.start_server, 30.0, free_port())
        with fabric.client() as c:
            jt = c.create_join_token()["join_token"]
            user_id = c.me()["user_id"]
        cfg = AgentConfig(server_url=fabric.url, data_dir=fast_dir / "agent", join_token=jt, measure=False,
                          listen_host="127.0.0.1", storage_bytes=1 << 30)
        agent, _ = storing_agent(cfg)  # enrol first (empty), so that the records can name the device
        async with agent:
            await agent.wait_connected()
        device_id = agent.device_id
        assert device_id
        await record_file(f"sqlite+aiosqlite:///{fabric.server_dir / 'neuranet.db'}", user_id, device_id, "big",
                          kept)
        await asyncio.to_thread(make_chunk_files, cfg.data_dir / "chunks", names)

        agent, store = storing_agent(cfg)
        assert len(store.chunks()) == N
        async with agent:
            await agent.wait_connected()
            # The whole inventory arrives (26 pages) and is reconciled once: the chunks no record names
            # are deleted, the file's stay.
            await async_wait_for(lambda: len(store.chunks()) == len(kept), 60, "the stale chunks deleted")
            assert store.chunks() == kept
            with fabric.client() as c:
                deleted = await asyncio.to_thread(c.delete_file, "big")
                assert deleted["replicas_freed"] == len(kept)
                await async_wait_for(lambda: not store.chunks(), 60, "the file's chunks deleted")
                assert agent.connections == 1  # no reconnect on the way
                history = c.request("GET", f"/api/v1/devices/{device_id}/history")
                assert len(history["intervals"]) == 2  # the enrolment's connection and this one
