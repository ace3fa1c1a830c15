"""The agent's side of files: keep, serve and drop chunks when the coordinator says so."""

from __future__ import annotations

import asyncio
import logging

from neuranet.agent.chunk_store import ChunkStore, StorageFull
from neuranet.agent.runtime import Agent
from neuranet.protocol import messages as m
from neuranet.storage.chunks import ChunkError

log = logging.getLogger("neuranet.files")


def install(agent: Agent, store: ChunkStore) -> None:
    """Serve chunk requests from ``store`` and report its inventory on every connection."""

    async def put(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkPut)
        try:
            await asyncio.to_thread(store.put, msg.chunk, payload)
            reply = m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=True, free_bytes=store.free_bytes)
        except (ChunkError, StorageFull, OSError) as exc:
            reply = m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=False, error=str(exc),
                                 free_bytes=store.free_bytes)
        await agent.send(reply)

    async def fetch(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkFetch)
        try:
            data = await asyncio.to_thread(store.get, msg.chunk)
        except KeyError:
            await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=False, held=False,
                                          error="not held here", free_bytes=store.free_bytes))
            return
        except (ChunkError, OSError) as exc:  # a damaged chunk has been dropped; a read error leaves it
            log.warning("%s", exc)
            await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=False, error=str(exc),
                                          held=not isinstance(exc, ChunkError), free_bytes=store.free_bytes))
            return
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=True, free_bytes=store.free_bytes),
                         payload=data)

    async def delete(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkDelete)
        for name in msg.chunks:
            try:
                await asyncio.to_thread(store.delete, name)
            except ChunkError:
                continue

    agent.on(m.ChunkPut, put)
    agent.on(m.ChunkFetch, fetch)
    agent.on(m.ChunkDelete, delete)
    agent.on_connected(lambda: agent.send(m.ChunkInventory(quota_bytes=store.quota_bytes,
                                                           used_bytes=store.used_bytes, chunks=store.chunks())))
