"""Files on the fabric, coordinator side: put chunks on devices, fetch them back, delete and repair.

`FileBook` talks to agents over their control connections: ``chunk_put`` to keep a chunk and
``chunk_fetch`` to read one (the bytes of a user's upload or download ride as message payloads,
about 1 MiB each), ``chunk_copy`` to have a holder copy a chunk to another device over a PeerLink
(the other replicas of an upload, repair and migration: device to device, direct when it can be),
``chunk_delete`` to drop some; an agent that uploads for a program on its own machine asks
``chunk_place`` and reports ``chunk_stored``. Placement is `neuranet.storage.placement` over the
owner's online devices that offer storage, each weighted by its availability forecast. A chunk upload is acknowledged only once it is
on disk on at least one device and recorded in the database, so a server restart loses nothing
acknowledged. Deletion is recorded first; devices offline at the time drop the chunks when they
return (their inventory is reconciled against the records on every connection). A repair loop
restores the replica count of chunks whose holders are gone or offline past a deadline, and
migrates chunks whose predicted availability is below target, within a byte budget per round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from neuranet.errors import Conflict, Gone, NeuraNetError, NoSpace, TimedOut, Unavailable
from neuranet.forecast.features import HORIZONS
from neuranet.config import Limits
from neuranet.protocol import messages as m
from neuranet.protocol.correlator import Correlator
from neuranet.protocol.errors import MessageTooLarge
from neuranet.tasks import OwnedTasks
from neuranet.storage.chunks import ChunkError, verify
from neuranet.storage.placement import ChunkState, DeviceView, PlacementError, availability, place, plan_moves

if TYPE_CHECKING:
    from neuranet.server.fleet import Fleet
    from neuranet.server.forecasting import ForecastService
    from neuranet.server.hub import AgentConnection, Handler
    from neuranet.server.store import Store

log = logging.getLogger("neuranet.files")
CHUNK_TIMEOUT = 60.0  # a device that does not answer a chunk request in this long is skipped
VIEW_TTL = 10.0  # seconds a user's device views (forecasts) are reused between chunks
STALE_GRACE = 600.0  # devices keep copies this recent despite a stale delete (their record may be on its way)


class FileError(NeuraNetError):
    """A file request that cannot be served; the subclass says which kind of failure it is."""

    def __init__(self, message: str, copy_gone: bool = False) -> None:
        super().__init__(message)
        self.copy_gone = copy_gone  # the device no longer holds the chunk it was asked for


class FileUnavailable(FileError, Unavailable):
    """The devices holding or meant to hold the chunk are offline or failed."""


class FileTimedOut(FileError, TimedOut):
    """A device did not answer a chunk request in time."""


class ChunkGone(FileError, Gone):
    """No replica of the chunk is left."""


class NoStorage(FileError, Conflict):
    """None of the user's devices offers storage."""


class StorageFull(FileError, NoSpace):
    """No device has room for the chunk."""


class _ConnectionLost(FileUnavailable):
    """The connection a request went out on is gone, so its answer will never come."""


@dataclass(frozen=True)
class Replication:
    """A file's chunks against its replica target."""

    wanted: int
    now: int  # copies of its least-replicated chunk (at most `wanted`)
    short: int  # chunks with fewer than `wanted` copies


def replication(chunks: list[str], holders: dict[str, list[str]], wanted: int) -> Replication:
    """``chunks``: the file's chunk list (in order, a repeated chunk counted each time)."""
    counts = [len(set(holders.get(c, ()))) for c in chunks]
    return Replication(wanted, min(min(counts, default=wanted), wanted), sum(n < wanted for n in counts))


@dataclass
class Space:
    quota: int
    free: int


class FileBook:
    def __init__(self, fleet: "Fleet", store: "Store", forecasts: "ForecastService", repair_interval: float = 60.0,
                 lost_after: float = 24 * 3600.0, orphan_after: float = 24 * 3600.0, bytes_per_round: int = 256 * 2 ** 20,
                 max_inventory: int = Limits.max_inventory_chunks,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.store = store
        self.forecasts = forecasts
        self._clock = clock  # wall time: how long a device has been away, how old an orphan is
        self._monotonic = monotonic  # how old a cached view is
        self.repair_interval = repair_interval
        self.lost_after = lost_after
        self.orphan_after = orphan_after
        self.bytes_per_round = bytes_per_round
        self.max_inventory = max_inventory
        self.space: dict[str, Space] = {}  # device -> storage it reported
        # request id -> (device, the connection the request went out on, its answer)
        self._pending: Correlator[tuple[m.ChunkReply, bytes]] = Correlator("chunk requests")  # tag: (device, conn)
        self._views: dict[str, tuple[float, int, list[tuple[str, str, object]]]] = {}  # user -> (when, _offers then, devices)
        # Changes of what devices offer: views cached before one are not reused, or the chunks uploaded
        # right after a device reported its storage (say, just after a restart) would skip it.
        self._offers = 0
        # Locks only while someone holds them: one per chunk forever would grow without bound.
        self._chunk_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks = OwnedTasks("files")  # inventory reconciliations
        # Inventory pages received so far, per connection (dropped with the connection).
        self._inventories: weakref.WeakKeyDictionary[AgentConnection, set[str]] = weakref.WeakKeyDictionary()
        self._repair_wanted = asyncio.Event()
        fleet.on_lost(self.on_device_lost)
        fleet.on_replaced(self.on_connection_lost)
        fleet.on_removed(self.forget_device)

    def handlers(self) -> dict[type[m.Message], "Handler"]:
        return dict.fromkeys((m.ChunkReply, m.ChunkInventory, m.ChunkLost, m.ChunkPlace, m.ChunkStored), self.on_message)

    # --- messages from agents --------------------------------------------------------

    def on_message(self, conn: "AgentConnection", msg: m.Message, payload: bytes) -> None:
        if isinstance(msg, m.ChunkReply):
            sent = self._pending.tag(msg.request)
            if sent is not None and sent[0] == conn.device_id:
                self._pending.resolve(msg.request, (msg, payload))
            if conn.device_id in self.space:
                self.space[conn.device_id].free = msg.free_bytes
        elif isinstance(msg, m.ChunkInventory):
            known = self.space.get(conn.device_id)
            if known is None or known.quota != msg.quota_bytes:
                self._offers += 1  # a device offers storage now (or other storage): cached views are stale
            self.space[conn.device_id] = Space(msg.quota_bytes, max(0, msg.quota_bytes - msg.used_bytes))
            pages = self._inventories.setdefault(conn, set())
            if len(pages) + len(msg.chunks) > self.max_inventory:  # pages that never say `last`, say
                del self._inventories[conn]
                raise MessageTooLarge(f"the chunk inventory passes {self.max_inventory} chunks, the most a "
                                      f"device may hold")
            pages.update(msg.chunks)
            if msg.last:
                del self._inventories[conn]
                self._tasks.spawn(self._reconcile(conn, pages), name=f"reconcile-{conn.device_id}")
        elif isinstance(msg, m.ChunkLost):
            self._tasks.spawn(self._forget(conn, msg.chunks), name=f"forget-{conn.device_id}")
        elif isinstance(msg, (m.ChunkPlace, m.ChunkStored)):
            self._tasks.spawn(self._upload_step(conn, msg), name=f"upload-step-{conn.device_id}")

    async def close(self) -> None:
        await self._tasks.close()

    def on_device_lost(self, device_id: str) -> None:
        self._pending.fail_all(lambda: FileUnavailable(f"device {device_id} went offline"),
                               where=lambda sent: sent[0] == device_id)

    def on_connection_lost(self, conn: "AgentConnection") -> None:
        """A device's connection was replaced by a newer one: what was asked on the old one is asked again
        (`_request`) instead of waiting out `CHUNK_TIMEOUT` for answers that went with it."""
        self._pending.fail_all(lambda: _ConnectionLost(f"the connection to device {conn.device_id} was lost"),
                               where=lambda sent: sent[1] is conn)

    def forget_device(self, device_id: str) -> None:
        """A device was removed (its replica records went with it): stop offering it for placement and
        repair its chunks now rather than at the next round."""
        self.space.pop(device_id, None)
        self._views.clear()
        self.repair_soon()

    def repair_soon(self) -> None:
        self._repair_wanted.set()

    async def _upload_step(self, conn: "AgentConnection", msg: m.ChunkPlace | m.ChunkStored) -> None:
        """A device uploading a chunk itself asks where it should go, or reports where it went."""
        try:
            if isinstance(msg, m.ChunkPlace):
                holders, targets = await self.plan_upload(conn.user_id, msg.chunk, msg.size, msg.replicas, msg.exclude)
            else:
                holders, targets = await self.record_upload(conn.user_id, msg.chunk, msg.size, msg.devices), []
            reply = m.ChunkPlaced(request=msg.request, chunk=msg.chunk, holders=holders, targets=targets)
        except FileError as exc:
            reply = m.ChunkPlaced(request=msg.request, chunk=msg.chunk, error=str(exc))
        except Exception as exc:
            log.exception("upload step %s from %s failed", msg.TYPE, conn.device_id)
            reply = m.ChunkPlaced(request=msg.request, chunk=msg.chunk, error=f"server error: {type(exc).__name__}")
        conn.reply(reply)

    async def _forget(self, conn: "AgentConnection", chunks: list[str]) -> None:
        """A device dropped damaged copies: forget them (the repair loop makes new ones)."""
        try:
            for chunk in chunks:
                await self.store.files.remove_replica(conn.user_id, chunk, conn.device_id)
        except Exception:
            log.exception("forgetting the lost chunks of %s failed", conn.device_id)

    async def _reconcile(self, conn: "AgentConnection", held: set[str]) -> None:
        """A device just reported what it holds: drop what no file needs (deleted while it was away),
        and forget records of chunks it no longer has (lost or damaged on its disk)."""
        try:
            recorded = await self.store.files.device_chunks(conn.device_id)
            stale = sorted(held - set(recorded))
            for batch in m.chunk_batches(stale) if stale else ():
                conn.send(m.ChunkDelete(chunks=batch, grace=STALE_GRACE))
            for chunk in set(recorded) - held:
                await self.store.files.remove_replica(conn.user_id, chunk, conn.device_id)
        except Exception:
            log.exception("reconciling the chunks of %s failed", conn.device_id)

    # --- requests to agents -------------------------------------------------------------

    async def _request(self, device_id: str, msg: m.Message, payload: bytes = b"") -> tuple[m.ChunkReply, bytes]:
        """Ask a device (chunk requests are idempotent: one whose connection was replaced is asked again on
        the new one, within the same `CHUNK_TIMEOUT`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHUNK_TIMEOUT
        while True:
            conn = self.fleet.connection(device_id)
            if conn is None:
                raise FileUnavailable(f"device {device_id} is offline")
            _, fut = self._pending.new((device_id, conn), id=msg.request)  # type: ignore[attr-defined]
            try:
                conn.send(msg, payload=payload)
                return await asyncio.wait_for(fut, deadline - loop.time())
            except _ConnectionLost:
                if self.fleet.connection(device_id) is conn:  # no newer connection to ask on
                    raise
            except asyncio.TimeoutError:
                raise FileTimedOut(f"device {device_id} did not answer within {CHUNK_TIMEOUT:.0f}s") from None
            finally:
                self._pending.discard(msg.request)  # type: ignore[attr-defined]

    def _request_id(self) -> int:
        return self._pending.next_id()

    async def _put_on(self, user_id: str, device_id: str, chunk_id: str, data: bytes) -> str | None:
        """Store a chunk on one device and record it; None when done, else why not."""
        try:
            reply, _ = await self._request(device_id, m.ChunkPut(request=self._request_id(), chunk=chunk_id), data)
        except FileError as exc:
            log.info("storing %s on %s failed: %s", chunk_id[:12], device_id, exc)
            return str(exc)
        if not reply.ok:
            log.info("%s refused chunk %s: %s", device_id, chunk_id[:12], reply.error)
            return f"device {device_id}: {reply.error}"
        await self.store.files.add_replica(user_id, chunk_id, len(data), device_id)
        return None

    async def _copy(self, user_id: str, source: str, target: str, chunk_id: str, size: int) -> str | None:
        """Have ``source`` copy a chunk to ``target`` over a PeerLink and record it; None when done, else
        why not. A source whose copy turned out missing or damaged loses its record."""
        try:
            reply, _ = await self._request(source, m.ChunkCopy(request=self._request_id(), chunk=chunk_id, target=target))
        except FileError as exc:
            log.info("copying %s from %s to %s failed: %s", chunk_id[:12], source, target, exc)
            return str(exc)
        if reply.target_free_bytes >= 0 and target in self.space:
            self.space[target].free = reply.target_free_bytes
        if not reply.ok:
            log.info("copying %s from %s failed: %s", chunk_id[:12], source, reply.error)
            if not reply.held:
                await self.store.files.remove_replica(user_id, chunk_id, source)
            return f"device {source}: {reply.error}"
        await self.store.files.add_replica(user_id, chunk_id, size, target)
        return None

    async def _copy_or_put(self, user_id: str, source: str, target: str, chunk_id: str, data: bytes) -> str | None:
        """During an upload: a copy device to device, else (the copy failed) the bytes from here."""
        if await self._copy(user_id, source, target, chunk_id, len(data)) is None:
            return None
        return await self._put_on(user_id, target, chunk_id, data)

    async def fetch(self, user_id: str, chunk_id: str, holders: list[str]) -> bytes:
        """The chunk's bytes from the first online holder that returns them intact; a holder whose copy
        is damaged loses it (and the repair loop makes a new one)."""
        errors = []
        online = [d for d in holders if self.fleet.online(d)]
        random.shuffle(online)  # spread reads over the replicas (and every copy gets checked in time)
        for device_id in online:
            try:
                reply, data = await self._request(device_id, m.ChunkFetch(request=self._request_id(), chunk=chunk_id))
                if not reply.ok:
                    raise FileError(reply.error, copy_gone=not reply.held)
                return verify(chunk_id, data)
            except (FileError, ChunkError) as exc:
                errors.append(f"{device_id}: {exc}")
                if isinstance(exc, ChunkError) or (isinstance(exc, FileError) and exc.copy_gone):
                    await self.store.files.remove_replica(user_id, chunk_id, device_id)
        if not holders:
            raise ChunkGone(f"chunk {chunk_id[:12]} has no replica left")
        if not online:
            raise FileUnavailable(f"chunk {chunk_id[:12]}: all {len(holders)} devices holding it are offline")
        raise FileUnavailable(f"chunk {chunk_id[:12]}: no device returned it intact ({'; '.join(errors)})")

    def _free(self, device_id: str) -> int:
        space = self.space.get(device_id)
        return space.free if space else 0

    # --- placement ---------------------------------------------------------------------

    async def views(self, user_id: str, fresh: bool = False) -> list[DeviceView]:
        """The user's devices that offer storage, as the fleet sees them now (online state, forecast; the
        list of devices is cached for `VIEW_TTL`). ``fresh``: list them again and forecast them as of now."""
        cached = self._views.get(user_id)
        if cached and not fresh and self._monotonic() - cached[0] < VIEW_TTL and cached[1] == self._offers:
            devices = cached[2]
        else:
            offers = self._offers
            devices = [(d.id, d.name, d.profile) for d in await self.store.devices.list_devices(user_id)
                       if d.id in self.space and self.space[d.id].quota > 0]
            if fresh:
                await self.forecasts.refresh([d for d, _, _ in devices])
            self._views[user_id] = (self._monotonic(), offers, devices)
        return [self._view(*d) for d in devices]

    def _view(self, device_id: str, name: str, profile: object) -> DeviceView:
        """Placement's view of one device from the fleet's; persistence (as it is now) without a forecast."""
        host = self.fleet.view(device_id, name, profile)
        p_online = host.p_online or (1.0 if host.online else 0.0,) * len(HORIZONS)
        return DeviceView(device_id, host.online, p_online, self._free(device_id))

    def _lock(self, user_id: str, chunk_id: str) -> asyncio.Lock:
        lock = self._chunk_locks.get((user_id, chunk_id))
        if lock is None:
            lock = self._chunk_locks[(user_id, chunk_id)] = asyncio.Lock()
        return lock

    async def _holders_and_views(self, user_id: str, chunk_id: str) -> tuple[list[str], list[DeviceView]]:
        """A chunk being uploaded (under its lock): who holds it already (those records touched, so no
        orphan collection takes them now) and the user's devices that offer storage."""
        holders = (await self.store.files.replicas_of(user_id, [chunk_id])).get(chunk_id, [])
        if holders and not await self.store.files.touch_replicas(user_id, chunk_id):
            holders = []  # collected as an orphan just now: store it anew
        views = await self.views(user_id)
        if not views:
            raise NoStorage("none of your devices offers storage: start an agent with --storage (e.g. 20G)")
        return holders, views

    def _place(self, chunk_id: str, size: int, replicas: int, holders: list[str], views: list[DeviceView],
               exclude: set[str], refusals: list[str]) -> list[str]:
        """Devices to add (none when enough hold it, or when no more can and some do); `FileError`
        (507) when nobody holds it and nobody can take it."""
        if len(holders) >= replicas:
            return []
        try:
            return place(size, replicas, views, holders=holders, exclude=exclude,
                         free={v.device_id: self._free(v.device_id) for v in views})
        except PlacementError as exc:
            if holders:
                return []  # fewer replicas than asked for now; repair adds the rest later
            why = "; ".join(refusals) if refusals else str(exc)
            raise StorageFull(f"cannot store chunk {chunk_id[:12]}: {why}") from None

    async def plan_upload(self, user_id: str, chunk_id: str, size: int, replicas: int,
                          exclude: list[str]) -> tuple[list[str], list[str]]:
        """For a device uploading a chunk itself: its holders now, and the devices to send it to."""
        async with self._lock(user_id, chunk_id):
            holders, views = await self._holders_and_views(user_id, chunk_id)
            return holders, self._place(chunk_id, size, replicas, holders, views, set(exclude), [])

    async def record_upload(self, user_id: str, chunk_id: str, size: int, devices: list[str]) -> list[str]:
        """A device uploading a chunk itself reports where it is now: record those of the user's devices
        that offer storage (placement chose among them); the devices recorded."""
        mine = {v.device_id for v in await self.views(user_id)}
        recorded = [d for d in dict.fromkeys(devices) if d in mine]
        async with self._lock(user_id, chunk_id):
            await self.store.files.add_replicas(user_id, chunk_id, size, recorded)
        return recorded

    async def put_chunk(self, user_id: str, chunk_id: str, data: bytes, replicas: int) -> dict[str, Any]:
        """Store a chunk on up to ``replicas`` of the user's devices (kept once per user); its holders."""
        verify(chunk_id, data)
        async with self._lock(user_id, chunk_id):
            holders, views = await self._holders_and_views(user_id, chunk_id)
            tried: set[str] = set()
            refusals: list[str] = []
            while len(holders) < replicas:
                chosen = self._place(chunk_id, len(data), replicas, holders, views, tried, refusals)
                if not chosen:
                    break
                source = next((h for h in holders if self.fleet.online(h)), None)
                if source is None:  # the bytes go to one device; it copies them on to the others
                    chosen = chosen[:1]
                    results = [await self._put_on(user_id, chosen[0], chunk_id, data)]
                else:
                    results = await asyncio.gather(*(self._copy_or_put(user_id, source, d, chunk_id, data)
                                                     for d in chosen))
                tried.update(chosen)
                refusals += [error for error in results if error is not None]
                if len(refusals) == 0:
                    holders += chosen
                else:  # a failed copy may have shown that its source lost the chunk: ask the records
                    holders = (await self.store.files.replicas_of(user_id, [chunk_id])).get(chunk_id, [])
        # Fewer holders than asked when no more devices can take it now (the repair loop adds the rest).
        return {"chunk": chunk_id, "holders": holders, "replicas": replicas}

    async def delete_replicas(self, freed: dict[str, list[str]], grace: float = 0.0) -> None:
        """Tell online devices to drop chunks (offline ones are told on their return); ``grace``: see
        `ChunkDelete`."""
        for device_id, chunks in freed.items():
            conn = self.fleet.connection(device_id)
            for batch in m.chunk_batches(chunks) if conn is not None and chunks else ():
                conn.send(m.ChunkDelete(chunks=batch, grace=grace))

    # --- reports -------------------------------------------------------------------------

    def replication_view(self, chunks: list[str], holders: dict[str, list[str]], wanted: int) -> dict[str, Any]:
        """What a file's chunks have against its replica target, and how often repair looks at the rest."""
        r = replication(chunks, holders, wanted)
        return {"replicas_now": r.now, "chunks_short": r.short, "repair_interval": self.repair_interval}

    async def file_availability(self, user_id: str, holders: dict[str, list[str]], chunks: list[str]) -> float:
        """P(every chunk has a holder online) averaged over the next 24 h's horizons (independent devices)."""
        views = {v.device_id: v for v in await self.views(user_id)}
        p = 1.0
        for chunk in set(chunks):
            held = [views[d] for d in holders.get(chunk, []) if d in views]
            p *= availability(held)
        return p

    # --- repair and migration --------------------------------------------------------------

    async def maintain(self) -> None:
        """Background loop owned by the app: repair and migrate every user's chunks, a round at a time."""
        while True:
            try:  # a round every repair_interval, or sooner when asked (`repair_soon`)
                await asyncio.wait_for(self._repair_wanted.wait(), self.repair_interval)
            except asyncio.TimeoutError:
                pass
            self._repair_wanted.clear()
            try:
                await self.repair_round()
            except Exception:
                log.exception("file repair round failed")

    async def repair_round(self) -> int:
        """One round over every user's chunks; returns the copies made."""
        copies = 0
        for user_id in await self.store.files.users_with_storage():
            await self._collect_orphans(user_id)
            copies += await self._repair_user(user_id)
        return copies

    async def _collect_orphans(self, user_id: str) -> None:
        """Delete chunks uploaded more than `orphan_after` ago that no file uses (an upload that never
        finished); devices offline now drop them when they return."""
        freed = await self.store.files.remove_orphans(user_id, self._clock() - self.orphan_after)
        if freed:
            log.info("files of %s: %d chunks of unfinished uploads deleted", user_id,
                     len({c for chunks in freed.values() for c in chunks}))
            # An orphan was written at least orphan_after ago; a copy newer than that is a re-upload.
            await self.delete_replicas(freed, grace=min(STALE_GRACE, self.orphan_after / 2))

    async def _repair_user(self, user_id: str) -> int:
        views = await self.views(user_id, fresh=True)
        if not views:
            return 0
        chunks = [ChunkState(c, size, tuple(h), replicas=k) for c, size, k, h in await self.store.files.stored_chunks(user_id)]
        lost = await self._lost_devices(user_id, {h for c in chunks for h in c.holders})
        copies = 0
        for move in plan_moves(chunks, views, self.bytes_per_round, lost=lost):
            async with self._lock(user_id, move.chunk):
                if await self._copy(user_id, move.source, move.target, move.chunk, move.size) is None:
                    copies += 1
                    if move.drop is not None:
                        await self.store.files.remove_replica(user_id, move.chunk, move.drop)
                        await self.delete_replicas({move.drop: [move.chunk]})
        if copies:
            log.info("files of %s: %d chunk copies made (repair and migration)", user_id, copies)
        return copies

    async def _lost_devices(self, user_id: str, holders: set[str]) -> set[str]:
        """Holders whose replicas should be replaced: deleted, or offline longer than `lost_after`."""
        now = self._clock()
        devices = {d.id: d for d in await self.store.devices.list_devices(user_id)}
        lost = set()
        for holder in holders:
            d = devices.get(holder)
            if d is None or (not self.fleet.online(holder) and now - (d.last_seen or d.created_at) > self.lost_after):
                lost.add(holder)
        return lost
