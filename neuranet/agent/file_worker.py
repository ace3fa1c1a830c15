"""The agent's side of files: keep, serve, copy and drop chunks when the coordinator says so, and
fetch them for programs on its own machine.

Chunk bytes of a user's upload ride the control connection (the coordinator is the other end), and
so do those of a download by a client that has no agent on its machine. Everything else goes device
to device over PeerLinks on the ``chunks`` channel, direct when a direct path works and relayed
through the coordinator otherwise:
- copies (the other replicas of an upload, repair, migration): the coordinator sends ``chunk_copy``
  to a holder, which sends the chunk to the target (``op: put``);
- downloads through this agent (`neuranet.net.local_api`, op ``chunk``): the chunk comes from this
  device's store when it holds it, else from a holder (``op: get``), holders tried in random order
  until one returns it intact.
The coordinator grants links on that channel only between one owner's devices, so each side serves
whatever a peer asks there (a kept chunk is checked against its hash; a chunk no file needs is
dropped at the next inventory). A copy found damaged on this disk is dropped and reported
(``chunk_lost``), so the coordinator repairs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, overload

from neuranet.agent.chunk_store import ChunkStore, StorageFull
from neuranet.net.local_api import LocalRequestError
from neuranet.agent.runtime import Agent
from neuranet.net.peerlink import LinkClosed, LinkMessage, PeerLink, RelayUnavailable
from neuranet.protocol import messages as m
from neuranet.protocol.chunk_channel import (BadChunkRequest, LocalChunkAnswer, LocalPutAnswer, PeerAnswer, PeerGet,
                                             PeerGetAnswer, PeerPut, PeerPutAnswer, PeerRequest, parse_local_chunk,
                                             parse_local_put, parse_peer_answer, parse_peer_request, peer_refusal)
from neuranet.protocol.correlator import Correlator
from neuranet.protocol.errors import LinkError, PeerUnreachable, ProtocolError
from neuranet.storage.chunks import MAX_CHUNK_SIZE, ChunkError, verify
from neuranet.tasks import task_scope

log = logging.getLogger("neuranet.files")

CHANNEL = "chunks"
COPY_TIMEOUT = 60.0  # a request on a chunk link not answered in this long fails
LINK_IDLE = 30.0  # an outgoing chunk link unused this long is closed
SERVE_IDLE = 4 * 30.0  # a served link with no request this long is closed (requesters close theirs at LINK_IDLE)
SERVE_PARALLEL = 8  # requests from one peer served at once (reads and writes run in threads)
LINK_ERRORS = (LinkError, ProtocolError, ConnectionError, TimeoutError,
               asyncio.TimeoutError)


class _Link:
    """One outgoing chunk link and its requests in flight (answers carry the request's ``rid``)."""

    def __init__(self, link: PeerLink, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        self.link = link
        self.pending: Correlator[LinkMessage] = Correlator(f"chunk link to {link.peer}")  # by rid
        self.used = time.monotonic()
        self.reader = spawn(self._read())  # owned by the agent: awaited when it stops

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.link.recv()
                self.pending.resolve(msg.meta.get("rid"), msg)
        except BaseException as exc:  # the link ended: every request in flight fails with it
            self.pending.fail_all(exc if isinstance(exc, Exception) else LinkClosed("link closed"))
            if not isinstance(exc, Exception):
                raise

    @property
    def usable(self) -> bool:
        return not self.link.closed and self.link.peer_down_since is None and not self.reader.done()

    async def close(self) -> None:
        """End the link and tell the peer (best effort), so its side does not wait on it."""
        self.reader.cancel()
        await self.link.close(flush_timeout=0.0)


class ChunkLinks:
    """Outgoing chunk links, one per peer device, reused across requests (a link costs a grant from
    the coordinator and a direct-dial attempt), several requests in flight on each, closed when idle."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def _link(self, peer: str) -> _Link:
        async with self._opening.setdefault(peer, asyncio.Lock()):
            entry = self._links.get(peer)
            if entry is not None and not entry.usable:
                await entry.close()  # gone (the peer may be back as a new process): start afresh
                entry = None
            if entry is None:
                entry = self._links[peer] = _Link(await self.agent.links.open(peer, CHANNEL, timeout=COPY_TIMEOUT / 2),
                                                  self.agent.spawn)
                if self._reaper is None or self._reaper.done():
                    self._reaper = self.agent.spawn(self._reap())
            return entry

    @overload
    async def request(self, peer: str, ask: PeerGet, data: bytes = b"") -> tuple[PeerGetAnswer, bytes, str]: ...

    @overload
    async def request(self, peer: str, ask: PeerPut, data: bytes = b"") -> tuple[PeerPutAnswer, bytes, str]: ...

    async def request(self, peer: str, ask: PeerRequest, data: bytes = b"") -> tuple[PeerAnswer, bytes, str]:
        """One request to ``peer`` on the chunks channel: its answer, the answer's bytes, and the path
        taken ("direct" or "relay"). Fails as soon as the peer is gone (unlike a pipeline's link, which
        waits for its peer to come back): another holder or device can serve instead. A malformed
        answer (`BadChunkRequest`, a ProtocolError) fails it like a broken link."""
        for attempt in range(2):  # a cached link may have died since its last use: one fresh try
            entry = await self._link(peer)
            rid, fut = entry.pending.new()
            try:
                entry.used = time.monotonic()
                sent = ask.model_copy(update={"rid": rid})
                # A peer that stopped reading would block the send on the link's window: bounded too.
                await asyncio.wait_for(entry.link.send(data, sent.meta()), COPY_TIMEOUT)
                answer = await _answer(entry.link, fut)
                entry.used = time.monotonic()
                try:
                    typed = parse_peer_answer(sent, answer.meta)
                except BadChunkRequest as exc:
                    raise BadChunkRequest(f"{peer}: {exc}") from None
                return typed, bytes(answer.payload), entry.link.path
            except LINK_ERRORS:
                if self._links.get(peer) is entry:
                    del self._links[peer]
                await entry.close()
                if attempt:
                    raise
            finally:
                entry.pending.discard(rid)
        raise AssertionError("unreachable")

    async def _reap(self) -> None:
        while self._links:
            await asyncio.sleep(LINK_IDLE / 3)
            now = time.monotonic()
            for peer, entry in list(self._links.items()):
                if not entry.pending and now - entry.used > LINK_IDLE:
                    del self._links[peer]
                    await entry.close()


async def _answer(link: PeerLink, reply: asyncio.Future[LinkMessage]) -> LinkMessage:
    """The answer to one request, or an error as soon as the peer is gone or past `COPY_TIMEOUT`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COPY_TIMEOUT
    while not reply.done():
        await asyncio.wait({reply}, timeout=0.25)
        if not reply.done() and link.peer_down_since is not None:
            raise PeerUnreachable(f"{link.peer} went offline")
        if not reply.done() and loop.time() > deadline:
            raise TimeoutError(f"{link.peer} did not answer within {COPY_TIMEOUT:.0f}s")
    return reply.result()


class FileWorker:
    def __init__(self, agent: Agent, store: ChunkStore) -> None:
        self.agent = agent
        self.store = store
        self.links = ChunkLinks(agent)
        self._asks: Correlator[m.ChunkPlaced] = Correlator("upload questions")  # to the coordinator
        self._recheck: asyncio.Task[None] | None = None  # an inventory after chunks kept for a grace

    def install(self) -> None:
        agent = self.agent
        agent.on(m.ChunkPut, self.put)
        agent.on(m.ChunkFetch, self.fetch)
        agent.on(m.ChunkCopy, self.copy)
        agent.on(m.ChunkDelete, self.delete)
        agent.links.serve(CHANNEL, self.serve_link)
        agent.local.register("chunk", self.local_chunk)
        agent.local.register("put", self.local_put)
        agent.on(m.ChunkPlaced, self._placed)
        agent.on_disconnected(self._connection_lost)
        agent.on_connected(self.send_inventory)

    async def send_inventory(self) -> None:
        """What this device holds, in pages (a big store's list would not fit one message)."""
        pages = list(m.chunk_batches(self.store.chunks()))
        for i, page in enumerate(pages):
            await self.agent.send(m.ChunkInventory(quota_bytes=self.store.quota_bytes, used_bytes=self.store.used_bytes,
                                                   chunks=page, last=i == len(pages) - 1))

    # --- this device's store ---------------------------------------------------------------

    async def keep(self, chunk: str, data: bytes) -> str:
        """Store a chunk; "" when kept, else why not."""
        try:
            await asyncio.to_thread(self.store.put, chunk, data)
            return ""
        except (ChunkError, StorageFull, OSError) as exc:
            return str(exc)

    async def read(self, chunk: str) -> bytes | tuple[str, bool]:
        """The chunk's bytes, or why not and whether the copy is still here (a read error) or not (never
        held, or damaged: then it has been dropped and the coordinator is told)."""
        try:
            return await asyncio.to_thread(self.store.get, chunk)
        except KeyError:
            return "not held here", False
        except ChunkError as exc:
            log.warning("%s", exc)
            self.agent.spawn(self._report_lost(chunk))
            return str(exc), False
        except OSError as exc:
            log.warning("reading chunk %s: %s", chunk[:12], exc)
            return str(exc), True

    async def _report_lost(self, chunk: str) -> None:
        try:
            await self.agent.send(m.ChunkLost(chunks=[chunk]))
        except (ConnectionError, OSError):
            pass  # not connected: the next inventory says it is gone

    # --- the coordinator's instructions ----------------------------------------------------------

    async def put(self, agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkPut)
        error = await self.keep(msg.chunk, payload)
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=not error, error=error,
                                      free_bytes=self.store.free_bytes))

    async def _read_or_refuse(self, msg: m.ChunkFetch | m.ChunkCopy) -> bytes | None:
        """The chunk a request is about, or None once the coordinator has been told why not."""
        data = await self.read(msg.chunk)
        if not isinstance(data, tuple):
            return data
        await self.agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=False, error=data[0],
                                           held=data[1], free_bytes=self.store.free_bytes))
        return None

    async def fetch(self, agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkFetch)
        data = await self._read_or_refuse(msg)
        if data is not None:
            await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=True,
                                          free_bytes=self.store.free_bytes), payload=data)

    async def copy(self, agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkCopy)
        data = await self._read_or_refuse(msg)
        if data is None:
            return
        try:
            answer, _, path = await self.links.request(msg.target, PeerPut(chunk=msg.chunk), data)
            error, target_free = answer.error, answer.free
            if not error:
                log.info("chunk %s copied to %s (%d bytes, %s path)", msg.chunk[:12], msg.target, len(data), path)
        except LINK_ERRORS as exc:
            error, target_free = f"copy failed: {type(exc).__name__}: {exc}", -1
        await agent.send(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=not error,
                                      error=f"{msg.target}: {error}" if error else "",
                                      free_bytes=self.store.free_bytes, target_free_bytes=max(-1, target_free)))

    async def delete(self, agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkDelete)
        kept = await asyncio.to_thread(self._drop, msg.chunks, msg.grace)  # one thread hop for a whole batch
        if kept and (self._recheck is None or self._recheck.done()):
            self._recheck = self.agent.spawn(self._inventory_after(msg.grace))

    def _drop(self, names: list[str], grace: float) -> bool:
        """Delete chunks, keeping those written within ``grace`` seconds; whether any was kept."""
        kept = False
        for name in names:
            if grace and self.store.written_within(name, grace):
                kept = True  # its record may be on its way (a copy over a PeerLink races the control link)
                continue
            try:
                self.store.delete(name)
            except ChunkError:
                continue
        return kept

    async def _inventory_after(self, seconds: float) -> None:
        """Report the inventory again once a grace is over: the coordinator then deletes the chunks kept
        for it whose records never came (say, of a file deleted meanwhile), rather than at the next
        reconnect."""
        await asyncio.sleep(seconds)
        try:
            await self.send_inventory()
        except RelayUnavailable:
            pass  # offline now: the inventory goes at the reconnect anyway

    # --- peers ------------------------------------------------------------------------------

    async def serve_link(self, link: PeerLink) -> None:
        """A peer of the same owner puts or gets chunks; up to `SERVE_PARALLEL` requests are served at
        once, each answer tagged with its request's ``rid``."""
        slots = asyncio.Semaphore(SERVE_PARALLEL)
        async with task_scope(f"chunks from {link.peer}") as scope:  # ends when every request served has
            while True:
                try:
                    msg = await asyncio.wait_for(link.recv(), SERVE_IDLE)
                except (LinkError, ProtocolError, asyncio.TimeoutError):
                    return  # ended, broken, or idle long past the requester's own idle close
                await slots.acquire()
                scope.spawn(self._serve_one(link, msg, slots), name="chunk-request")

    async def _serve_one(self, link: PeerLink, msg: LinkMessage, slots: asyncio.Semaphore) -> None:
        try:
            try:
                ask = parse_peer_request(msg.meta)
            except BadChunkRequest as exc:  # answered, so the requester does not wait out its timeout
                log.warning("refused a chunk request from %s: %s", link.peer, exc)
                await link.send(b"", peer_refusal(msg.meta, str(exc)))
                return
            if isinstance(ask, PeerGet):
                data = await self.read(ask.chunk)
                if isinstance(data, tuple):
                    await link.send(b"", PeerGetAnswer(chunk=ask.chunk, rid=ask.rid, error=data[0]).meta())
                else:
                    await link.send(data, PeerGetAnswer(chunk=ask.chunk, rid=ask.rid).meta())
            else:
                error = await self.keep(ask.chunk, bytes(msg.payload))
                await link.send(b"", PeerPutAnswer(chunk=ask.chunk, rid=ask.rid, error=error,
                                                   free=self.store.free_bytes).meta())
        except (LinkError, ProtocolError, ConnectionError):
            pass  # the requester is gone; it fails over on its side
        except Exception as exc:  # answer anyway, so the requester does not wait out its timeout
            log.exception("serving a chunk request from %s failed", link.peer)
            with contextlib.suppress(Exception):
                await link.send(b"", peer_refusal(msg.meta, f"{type(exc).__name__}: {exc}"))
        finally:
            slots.release()

    # --- programs on this machine --------------------------------------------------------------

    async def local_chunk(self, request: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """``{"op": "chunk", "chunk": id, "holders": [device ids]}``: the chunk from this device's store,
        else from the holders (random order, the next one when one fails), checked against its name."""
        try:
            ask = parse_local_chunk(request)
        except BadChunkRequest as exc:
            raise LocalRequestError(str(exc)) from None
        chunk, holders = ask.chunk, ask.holders
        errors = []
        if chunk in self.store:
            data = await self.read(chunk)
            if not isinstance(data, tuple):
                return LocalChunkAnswer(source=self.agent.device_id or "", path="local").meta(), data
            errors.append(f"this device: {data[0]}")
        peers = [h for h in dict.fromkeys(holders) if h != self.agent.device_id]
        random.shuffle(peers)  # spread reads over the replicas
        for peer in peers:
            try:
                answer, data, path = await self.links.request(peer, PeerGet(chunk=chunk))
                if answer.error:
                    raise ChunkError(answer.error)
                return LocalChunkAnswer(source=peer, path=path).meta(), verify(chunk, data)
            except (ChunkError, *LINK_ERRORS) as exc:
                errors.append(f"{peer}: {type(exc).__name__}: {exc}")
        raise LocalRequestError(f"chunk {chunk[:12]}: no holder returned it ({'; '.join(errors) or 'no holders'})")


    async def local_put(self, request: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """``{"op": "put", "chunk": id, "replicas": k, "size": n}`` + the bytes: store the chunk for the
        owner on the devices the coordinator places it on, sending it to each over a PeerLink (or
        keeping it here), and answer once the coordinator has recorded where it is."""
        try:
            ask = parse_local_put(request)
        except BadChunkRequest as exc:
            raise LocalRequestError(str(exc)) from None
        chunk, replicas = ask.chunk, ask.replicas
        if len(payload) > MAX_CHUNK_SIZE:
            raise LocalRequestError(f"a chunk is at most {MAX_CHUNK_SIZE} bytes, got {len(payload)}")
        try:
            verify(chunk, payload)
        except ChunkError as exc:
            raise LocalRequestError(str(exc)) from None
        holders: list[str] = []
        failed: dict[str, str] = {}
        paths: dict[str, int] = {}
        for _ in range(3):  # devices that fail are excluded and others asked for, a few times
            placed = await self._ask(m.ChunkPlace(request=0, chunk=chunk, size=len(payload), replicas=replicas,
                                                  exclude=sorted(failed)))
            holders = placed.holders
            if not placed.targets:
                break
            sent = await asyncio.gather(*(self._send_to(t, chunk, payload) for t in placed.targets))
            stored = []
            for target, (path, error) in zip(placed.targets, sent):
                if error:
                    failed[target] = error
                else:
                    stored.append(target)
                    paths[path] = paths.get(path, 0) + 1
            if stored:
                recorded = (await self._ask(m.ChunkStored(request=0, chunk=chunk, size=len(payload),
                                                          devices=stored))).holders
                holders = list(dict.fromkeys([*holders, *recorded]))
            if len(holders) >= replicas:
                break
        if not holders:
            why = "; ".join(f"{d}: {e}" for d, e in failed.items()) or "no device to store it on"
            raise LocalRequestError(f"chunk {chunk[:12]}: {why}")
        return LocalPutAnswer(holders=holders, paths=paths).meta(), b""

    async def _send_to(self, target: str, chunk: str, data: bytes) -> tuple[str, str]:
        """Give a chunk to one device (this one: keep it); the path taken, and an error ("" if stored)."""
        if target == self.agent.device_id:
            return "local", await self.keep(chunk, data)
        try:
            answer, _, path = await self.links.request(target, PeerPut(chunk=chunk), data)
            return path, answer.error
        except LINK_ERRORS as exc:
            return "", f"{type(exc).__name__}: {exc}"

    async def _ask(self, msg: m.ChunkPlace | m.ChunkStored) -> m.ChunkPlaced:
        """One question to the coordinator about an upload; its answer (`LocalRequestError` if it
        refuses or does not answer within `COPY_TIMEOUT`). A question whose connection is lost before
        its answer came is asked again on the next connection (both kinds are idempotent): the answer
        went with the old one, and waiting out the timeout would stall the upload."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COPY_TIMEOUT
        while True:
            request, fut = self._asks.new()
            ask = msg.model_copy(update={"request": request})
            connection = self.agent.connections
            try:
                await self.agent.send(ask)
                answer = await asyncio.wait_for(fut, deadline - loop.time())
                break
            except RelayUnavailable:  # not connected, or the connection went while we waited
                try:
                    await self.agent.wait_connection(after=connection, timeout=deadline - loop.time())
                except TimeoutError:
                    raise LocalRequestError(f"the coordinator did not answer within {COPY_TIMEOUT:.0f}s "
                                            "(this agent is not connected to it)") from None
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                raise LocalRequestError(f"the coordinator did not answer: {type(exc).__name__}: {exc}") from None
            finally:
                self._asks.discard(request)
        if answer.error:
            raise LocalRequestError(answer.error)
        return answer

    def _connection_lost(self) -> None:
        self._asks.fail_all(lambda: RelayUnavailable("the connection to the coordinator was lost"))

    async def _placed(self, agent: Agent, msg: m.Message, payload: bytes) -> None:
        assert isinstance(msg, m.ChunkPlaced)
        self._asks.resolve(msg.request, msg)


def install(agent: Agent, store: ChunkStore) -> FileWorker:
    """Serve chunk requests from ``store``, fetch chunks for local programs, report the inventory on
    every connection."""
    worker = FileWorker(agent, store)
    worker.install()
    return worker
