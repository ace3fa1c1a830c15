"""The agent's side of files: keep, serve, copy and drop chunks when the coordinator says so.

Chunk bytes from a user's upload and for a user's download ride the control connection (the
coordinator is the other end). Copies between devices (the other replicas of an upload, repair,
migration) go device to device: the holder sends the chunk over a PeerLink on the ``chunks``
channel, direct when a direct path works and relayed through the coordinator otherwise. The
coordinator grants links on that channel only between one owner's devices, so the receiving side
keeps whatever a peer sends there (after checking its hash); a chunk no file needs is dropped at
the next inventory.
"""

from __future__ import annotations

import asyncio
import logging
import time

from neuranet.agent.chunk_store import ChunkStore, StorageFull
from neuranet.agent.runtime import Agent
from neuranet.net.peerlink import LinkClosed, PeerLink
from neuranet.protocol import messages as m
from neuranet.protocol.errors import LinkRefused, PeerUnavailable, ProtocolError
from neuranet.storage.chunks import ChunkError

log = logging.getLogger("neuranet.files")

CHANNEL = "chunks"
COPY_TIMEOUT = 60.0  # a copy whose target has not confirmed in this long fails
LINK_IDLE = 30.0  # an outgoing chunk link unused this long is closed
LINK_ERRORS = (LinkClosed, LinkRefused, PeerUnavailable, ProtocolError, ConnectionError, TimeoutError,
               asyncio.TimeoutError)


class ChunkLinks:
    """Outgoing chunk links, one per target device, reused across copies (a link costs a grant
    from the coordinator and a direct-dial attempt) and closed when idle."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._links: dict[str, tuple[PeerLink, asyncio.Lock]] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._used: dict[str, float] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def _link(self, target: str) -> tuple[PeerLink, asyncio.Lock]:
        async with self._opening.setdefault(target, asyncio.Lock()):
            entry = self._links.get(target)
            if entry is None or entry[0].closed:
                link = await self.agent.links.open(target, CHANNEL, timeout=COPY_TIMEOUT / 2)
                entry = self._links[target] = (link, asyncio.Lock())
                if self._reaper is None or self._reaper.done():
                    self._reaper = self.agent.spawn(self._reap())
            return entry

    async def send(self, target: str, chunk: str, data: bytes) -> tuple[dict[str, object], str]:
        """Send one chunk to ``target``; its answer (``error``, ``free``) and the path taken."""
        for attempt in range(2):  # a cached link may have died since its last use: one fresh try
            link, lock = await self._link(target)
            try:
                async with lock:  # one chunk at a time per link, so each answer matches its chunk
                    self._used[target] = time.monotonic()
                    await link.send(data, {"chunk": chunk})
                    answer = await asyncio.wait_for(link.recv(), COPY_TIMEOUT)
                    self._used[target] = time.monotonic()
                    if answer.meta.get("chunk") != chunk:
                        raise ProtocolError(f"{target} answered for another chunk")
                    return answer.meta, link.path
            except LINK_ERRORS:
                link.abort()
                self._links.pop(target, None)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _reap(self) -> None:
        while self._links:
            await asyncio.sleep(LINK_IDLE / 3)
            now = time.monotonic()
            for target, (link, lock) in list(self._links.items()):
                if not lock.locked() and now - self._used.get(target, 0.0) > LINK_IDLE:
                    del self._links[target]
                    await link.close(flush_timeout=2.0)


def install(agent: Agent, store: ChunkStore) -> None:
    """Serve chunk requests from ``store`` and report its inventory on every connection."""
    links = ChunkLinks(agent)

    async def keep(chunk: str, data: bytes) -> str:
        """Store a chunk; "" when kept, else why not."""
        try:
            await asyncio.to_thread(store.put, chunk, data)
            return ""
        except (ChunkError, StorageFull, OSError) as exc:
            return str(exc)

    async def put(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkPut)
        error = await keep(msg.chunk, payload)
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=not error, error=error,
                                      free_bytes=store.free_bytes))

    async def read(request: int, chunk: str) -> bytes | m.ChunkReply:
        """The chunk's bytes, or the reply that says why they cannot be had."""
        try:
            return await asyncio.to_thread(store.get, chunk)
        except KeyError:
            return m.ChunkReply(request=request, chunk=chunk, ok=False, held=False, error="not held here",
                                free_bytes=store.free_bytes)
        except (ChunkError, OSError) as exc:  # a damaged chunk has been dropped; a read error leaves it
            log.warning("%s", exc)
            return m.ChunkReply(request=request, chunk=chunk, ok=False, error=str(exc),
                                held=not isinstance(exc, ChunkError), free_bytes=store.free_bytes)

    async def fetch(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkFetch)
        data = await read(msg.request, msg.chunk)
        if isinstance(data, m.ChunkReply):
            await agent.send(data)
            return
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=True, free_bytes=store.free_bytes),
                         payload=data)

    async def copy(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkCopy)
        data = await read(msg.request, msg.chunk)
        if isinstance(data, m.ChunkReply):
            await agent.send(data)
            return
        try:
            answer, path = await links.send(msg.target, msg.chunk, data)
            error = str(answer.get("error") or "")
            target_free = int(answer.get("free", -1))  # type: ignore[call-overload]
            if not error:
                log.info("chunk %s copied to %s (%d bytes, %s path)", msg.chunk[:12], msg.target, len(data), path)
        except LINK_ERRORS as exc:
            error, target_free = f"copy to {msg.target} failed: {type(exc).__name__}: {exc}", -1
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=not error,
                                      error=f"{msg.target}: {error}" if error else "",
                                      free_bytes=store.free_bytes, target_free_bytes=max(-1, target_free)))

    async def receive(link: PeerLink) -> None:
        """A peer of the same owner sends chunks (one at a time); keep each and answer."""
        while True:
            try:
                msg = await link.recv()
            except (LinkClosed, PeerUnavailable):
                return
            chunk = str(msg.meta.get("chunk", ""))
            error = await keep(chunk, bytes(msg.payload))
            await link.send(b"", {"chunk": chunk, "error": error, "free": store.free_bytes})

    async def delete(agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkDelete)
        for name in msg.chunks:
            try:
                await asyncio.to_thread(store.delete, name)
            except ChunkError:
                continue

    agent.on(m.ChunkPut, put)
    agent.on(m.ChunkFetch, fetch)
    agent.on(m.ChunkCopy, copy)
    agent.on(m.ChunkDelete, delete)
    agent.links.serve(CHANNEL, receive)
    agent.on_connected(lambda: agent.send(m.ChunkInventory(quota_bytes=store.quota_bytes,
                                                           used_bytes=store.used_bytes, chunks=store.chunks())))
