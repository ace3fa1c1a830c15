"""The relay hub: live agent connections, their bounded send queues, and link authorisation.

The hub owns one :class:`AgentConnection` per online device. Frames addressed to
another device are forwarded byte-for-byte after the header is checked; each
destination queue counts bytes per source, so one flooding peer is cut off
alone while everyone else keeps being served.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from neuranet.config import Limits, ServerConfig
from neuranet.net.addresses import same_host, usable_by_peer
from neuranet.net.tls import certificate_key
from neuranet.protocol import messages as m
from neuranet.protocol.device_profile import DeviceProfile
from neuranet.protocol.envelope import Envelope, encode_frame
from neuranet.protocol.errors import (
    MAX_ERROR_CHARS, AuthenticationFailed, InvalidMessage, PeerUnavailable, ProtocolError, QueueLimitExceeded,
    UnexpectedMessage, shown,
)
from neuranet.protocol.liveness import Liveness
from neuranet.protocol.messages import MAX_ID_CHARS
from neuranet.server.fleet import Fleet
from neuranet.server.store import Store, StoreError
from neuranet.server.telemetry import PRUNE_BATCH, TelemetryIntake, TokenBucket
from neuranet.tasks import OwnedTasks

log = logging.getLogger("neuranet.hub")

MAX_LINKTESTS = 1000
CLOSE_TIMEOUT = 5.0  # seconds a socket close may wait for the agent to take the close frame
RELAYED_TYPES = frozenset({"link_data", "link_ack", "link_close", "ping", "pong"})
# Channels whose links join only devices of one owner (a shared run is not enough): a device
# accepts file chunks on them from any peer, which is safe only because the peer is its owner's.
OWNER_CHANNELS = frozenset({"chunks"})

SendBytes = Callable[[bytes], Awaitable[None]]
CloseFn = Callable[[int, str], Awaitable[None]]
# What the hub calls with each message an agent sends to the server: (its connection, the message, its payload).
Handler = Callable[["AgentConnection", Any, bytes], Union[None, Awaitable[None]]]


class AgentConnection:
    """One agent's WebSocket as the hub sees it: identity, liveness and an outbound queue.

    Everything waiting for the agent is bounded twice: per source (a relaying peer, or the agent
    itself for the server's replies to it) by ``max_queued``, and in total, the server's own frames
    included, by ``max_total``. A peer past its share is refused alone; a connection whose own
    traffic overflows (it sends and does not read) is closed, its queue dropped at once.
    """

    def __init__(self, device_id: str, user_id: str, send_bytes: SendBytes, close: CloseFn, max_queued: int,
                 stall_timeout: float = 10.0, max_total: int = Limits.max_queued_bytes_per_connection) -> None:
        self.device_id = device_id
        self.user_id = user_id
        self.profile: dict[str, Any] = {}
        self.remote_ip = ""  # the address the agent connects from (tells which peers share a host)
        self.public_key = b""  # its enrolled key (set once authenticated)
        self.tls_cert = b""  # its direct-link certificate, once it reported one carrying that key
        self.connected_at = time.time()
        self.last_seen = self.connected_at
        self._send_bytes = send_bytes
        self._close = close
        self._max_queued = max_queued
        self._max_total = max_total
        self._stall_timeout = stall_timeout
        self._written = asyncio.Condition()  # notified as the writer drains, for paused sources
        self._queue: collections.deque[tuple[bytes, str]] = collections.deque()
        self._queued_from: collections.Counter[str] = collections.Counter()
        self._queued_total = 0
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.closed = False
        self.closing: asyncio.Task[None] | None = None  # the socket close after an overflow (awaited by close)
        self._tasks = OwnedTasks(f"agent {device_id}")  # owns `closing`
        self.liveness = Liveness(timeout=math.inf, probe_after=math.inf, heard_at=0.0)  # set by Hub.register
        self.telemetry_budget = TokenBucket.full(0.0, 0, 0.0)  # likewise
        self.telemetry_dropped = 0  # samples over the rate, dropped
        self._next_id = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued_total

    def _no_room(self, source: str, size: int) -> str:
        """Why a frame of ``size`` bytes from ``source`` does not fit now; "" when it does."""
        if source and self._queued_from[source] + size > self._max_queued:
            return (f"{self._queued_from[source]} bytes from {source} already wait for {self.device_id}; "
                    f"limit is {self._max_queued}")
        if self._queued_total + size > self._max_total:
            return f"{self._queued_total} bytes already wait for {self.device_id}; limit is {self._max_total}"
        return ""

    def enqueue(self, frame: bytes, source: str = "") -> None:
        """Queue a frame for this agent. Raises QueueLimitExceeded if another device, ``source``, has too
        much waiting; when the agent's own traffic (``source`` empty or the agent itself) does not fit,
        the connection is closed instead: the agent is not reading what it asks for."""
        if self.closed:
            return
        why = self._no_room(source, len(frame))
        if why and source and source != self.device_id:
            raise QueueLimitExceeded(why)
        if why:
            self._overflow(why)
            return
        self._queued_from[source] += len(frame)
        self._queued_total += len(frame)
        self._queue.append((frame, source))
        self._empty.clear()
        self._ready.set()

    def _overflow(self, why: str) -> None:
        """Drop everything queued and close the socket (in a task this connection owns: enqueue is called
        from synchronous code, and the writer may be blocked on the very socket that does not drain)."""
        log.warning("closing agent %s: %s", self.device_id, why)
        self._queue.clear()
        self._queued_from.clear()
        self._queued_total = 0
        self.closed = True
        self._ready.set()
        self.closing = self._tasks.spawn(self._shut(4002, f"{QueueLimitExceeded.code}: {why}"), name="overflow-close")

    def _release(self, source: str, size: int) -> None:
        left = self._queued_from.get(source, 0) - size
        if left > 0:
            self._queued_from[source] = left
        else:
            self._queued_from.pop(source, None)  # no empty counters left behind (or: dropped by an overflow)
        self._queued_total = max(0, self._queued_total - size)

    async def relay_from(self, source: str, frame: bytes) -> None:
        """Queue a relayed frame, first pausing the source (its reader waits here) while too many of
        its bytes (or of everyone's) wait for this agent. A source still over the limit after
        ``stall_timeout`` gets QueueLimitExceeded: the destination is not reading, and memory stays
        bounded either way."""
        if self._no_room(source, len(frame)) and not self.closed:
            def room() -> bool:
                return self.closed or not self._no_room(source, len(frame))

            try:
                async with self._written:
                    await asyncio.wait_for(self._written.wait_for(room), self._stall_timeout)
            except asyncio.TimeoutError:
                raise QueueLimitExceeded(
                    f"{self._no_room(source, len(frame))}; waited {self._stall_timeout:.0f}s for "
                    f"{self.device_id}, which is not reading"
                ) from None
        self.enqueue(frame, source)

    def send(self, msg: m.Message, *, payload: bytes = b"", source: str = "") -> None:
        """Queue a message from the server; ``source`` counts it against that source's limit (the agent's
        own id for a reply to it, so that what it asks for is bounded by what it reads)."""
        self._next_id += 1
        env = msg.envelope(id=self._next_id, src="server", dst=self.device_id, payload=payload)
        self.enqueue(encode_frame(env), source)

    def reply(self, msg: m.Message, *, payload: bytes = b"") -> None:
        """Queue an answer to something the agent sent, counted against the agent's own allowance."""
        self.send(msg, payload=payload, source=self.device_id)

    def send_error(self, exc: ProtocolError, ref: int | None = None) -> None:
        self.reply(m.Error(code=exc.code, message=str(exc)[:MAX_ERROR_CHARS], ref=ref))

    async def writer(self) -> None:
        """Drain the queue into the socket until the connection closes."""
        while not self.closed:
            if not self._queue:
                self._empty.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            frame, source = self._queue.popleft()
            try:
                await self._send_bytes(frame)
            except Exception:
                # The socket is gone: stop queueing for it and release sources paused behind it, which
                # would otherwise wait out relay_stall_timeout and be cut off for the destination's fault.
                await self.close(1011, "send failed")
                raise
            finally:
                self._release(source, len(frame))
                if source:
                    async with self._written:
                        self._written.notify_all()
        self._empty.set()

    async def drained(self, timeout: float) -> None:
        """Wait (bounded) until everything queued so far has been written."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self._ready.set()
            await self._shut(code, reason)
        elif self.closing is not None:
            await asyncio.gather(self.closing, return_exceptions=True)

    async def _shut(self, code: int, reason: str) -> None:
        async with self._written:
            self._written.notify_all()  # paused sources see the close
        try:
            # Bounded: closing waits for the socket to take the close frame, which an agent that does
            # not read never lets it do.
            await asyncio.wait_for(self._close(code, _close_reason(reason)), CLOSE_TIMEOUT)
        except Exception:  # the socket may already be gone
            pass


def _close_reason(reason: str) -> str:
    """A WebSocket close reason fits 123 bytes of UTF-8."""
    return reason.encode()[:120].decode(errors="ignore")


@dataclass
class LinkTestState:
    test_id: str
    user_id: str
    src: str
    dst: str
    total_bytes: int
    message_bytes: int
    started: float = field(default_factory=time.time)
    sent_bytes: int = 0
    path: str = ""
    done: bool = False
    result: dict[str, Any] = field(default_factory=dict)


class Hub:
    """Registry of online agents; authorises links and relays frames between them.

    The hub knows no feature: runs, serving and files see devices through :attr:`fleet` (online
    state, profiles, sending, lost/back events) and take their messages through :meth:`on`; the
    composition root (`server/coordinator.py`) wires them.
    """

    def __init__(self, config: ServerConfig, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self._clock = clock  # for liveness (presence records use wall time)
        self.conns: dict[str, AgentConnection] = {}
        self._per_user: collections.Counter[str] = collections.Counter()  # len(conns) by user_id
        # device -> devices it may exchange relayed frames with (granted links); dropped when it goes offline
        self._peers: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self.linktests: dict[str, LinkTestState] = {}
        self.fleet = Fleet(self.conns)
        self._handlers: dict[str, Handler] = {}
        self._dirty_seen: dict[str, float] = {}
        self.telemetry = TelemetryIntake(config.limits.telemetry_samples_per_second, config.limits.telemetry_burst)
        self._next_prune = -math.inf
        self.on(m.Heartbeat, lambda conn, msg, _: conn.reply(m.HeartbeatAck(seq=msg.seq)))
        self.on(m.HeartbeatAck, lambda *_: None)  # the answer to the probe (`sweep`): hearing anything was the point
        self.on(m.Telemetry, lambda conn, msg, _: self.add_telemetry(conn, msg.samples))
        self.on(m.Profile, self._profile)
        # Counted against the agent's own bytes: an agent that sends echoes and never reads them is cut
        # off with queue_limit instead of growing the server's memory without bound.
        self.on(m.Echo, lambda conn, _, payload: conn.reply(m.Echo(reply=True), payload=payload))
        self.on(m.LinkOpen, self.open_link)
        self.on(m.LinkTestProgress, self.linktest_update)
        self.on(m.LinkTestDone, self.linktest_update)

    # --- messages to the server ---------------------------------------------------

    def on(self, msg_type: type[m.Message], handler: Handler) -> None:
        """Have ``handler`` take every ``msg_type`` message agents send to the server (one handler per type)."""
        if msg_type.TYPE in self._handlers:
            raise ValueError(f"{msg_type.TYPE} already has a handler")
        self._handlers[msg_type.TYPE] = handler

    def handles(self, handlers: dict[type[m.Message], Handler]) -> None:
        for msg_type, handler in handlers.items():
            self.on(msg_type, handler)

    async def dispatch(self, conn: AgentConnection, env: Envelope) -> None:
        """Hand a message addressed to the server to its handler; a type no one takes is refused."""
        msg = m.parse(env)
        handler = self._handlers.get(msg.TYPE)
        if handler is None:
            raise UnexpectedMessage(f"{env.type} is not accepted from agents")
        done = handler(conn, msg, bytes(env.payload))
        if done is not None:
            await done

    async def _profile(self, conn: AgentConnection, msg: m.Profile, _: bytes) -> None:
        conn.profile = msg.profile
        try:  # before the write: a link granted meanwhile already pins the certificate
            if msg.tls_cert and msg.tls_cert != conn.tls_cert:
                self.set_direct_cert(conn, msg.tls_cert)
        finally:
            await self.store.devices.set_profile(conn.device_id, msg.profile)

    # --- membership -----------------------------------------------------------

    def connections_of(self, user_id: str) -> int:
        # O(1): scanning every connection here made each handshake O(N) and a ramp of N agents O(N^2).
        return self._per_user[user_id]

    async def register(self, conn: AgentConnection) -> None:
        conn.liveness = Liveness(timeout=self.config.offline_after, probe_after=self.config.heartbeat_interval,
                                 heard_at=self._clock())
        conn.telemetry_budget = self.telemetry.bucket(self._clock())
        old = self.conns.get(conn.device_id)
        self.conns[conn.device_id] = conn
        self._per_user[conn.user_id] += 1
        if old is not None:
            self._user_left(old.user_id)
            self.fleet.replaced(old)
            await old.close(4000, "replaced by a newer connection")
        await self.store.presence.open_presence(conn.device_id, conn.connected_at)
        self.fleet.back(conn.device_id)

    async def unregister(self, conn: AgentConnection) -> None:
        if self.conns.get(conn.device_id) is not conn:
            return  # a newer connection took over; its presence stays open
        del self.conns[conn.device_id]
        self._user_left(conn.user_id)
        await self.store.presence.close_presence(conn.device_id, conn.last_seen)
        # Peers stop relaying to it now; when it returns it re-opens its links and they are granted anew.
        for other in self._peers.pop(conn.device_id, set()):
            self._peers[other].discard(conn.device_id)
            if other in self.conns:
                self.conns[other].send(m.PeerDown(peer=conn.device_id))
        self.fleet.lost(conn.device_id)

    # --- revocation ---------------------------------------------------------------

    async def disconnect_device(self, device_id: str, reason: str) -> None:
        """A device was removed: close its connection now and drop what is pending for it."""
        self.telemetry.forget(device_id)
        self._dirty_seen.pop(device_id, None)
        self.fleet.removed(device_id)
        conn = self.conns.get(device_id)
        if conn is not None:
            await self._refuse(conn, reason)

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        """A user was disabled: close every connection of its devices now."""
        await asyncio.gather(*(self._refuse(c, reason) for c in list(self.conns.values()) if c.user_id == user_id))

    async def login_revoked(self, conn: AgentConnection) -> bool:
        """Was this device removed, or its owner disabled, while it was shaking hands? Then close it."""
        try:
            await self.store.identity.device_for_login(conn.device_id)
        except StoreError as exc:
            await self._refuse(conn, str(exc))
            return True
        return False

    async def _refuse(self, conn: AgentConnection, reason: str) -> None:
        try:
            conn.send(m.Error(code=AuthenticationFailed.code, message=reason[:MAX_ERROR_CHARS]))
            await conn.drained(timeout=1.0)  # let the agent read why
        except ProtocolError:  # its queue is full: close without the explanation
            pass
        await conn.close(4003, reason)
        await self.unregister(conn)

    def _user_left(self, user_id: str) -> None:
        self._per_user[user_id] -= 1
        if self._per_user[user_id] <= 0:
            del self._per_user[user_id]

    async def shutdown(self) -> None:
        """Server stopping: end every presence in one transaction, then drop the connections (the books
        were closed first, by the coordinator)."""
        conns = list(self.conns.values())
        self.conns.clear()  # in place: the fleet reads this mapping
        self._per_user.clear()
        self._peers.clear()
        await self.store.presence.close_presences({c.device_id: c.last_seen for c in conns})
        for conn in conns:
            await conn.close(1001, "server shutting down")
        await self.flush()

    def seen(self, conn: AgentConnection) -> None:
        conn.liveness.heard(self._clock())
        conn.last_seen = time.time()
        self._dirty_seen[conn.device_id] = conn.last_seen

    # --- links ----------------------------------------------------------------

    async def open_link(self, conn: AgentConnection, req: m.LinkOpen, _: bytes = b"") -> None:
        if req.peer == conn.device_id or not await self.store.devices.may_link(conn.device_id, req.peer):
            conn.reply(m.LinkRefusedMsg(link_id=req.link_id, peer=req.peer, code="forbidden", reason="the device is not yours and shares no run with you"))
            return
        peer = self.conns.get(req.peer)
        if peer is None:
            conn.reply(m.LinkRefusedMsg(link_id=req.link_id, peer=req.peer, code="offline", reason="the peer is not connected"))
            return
        if req.channel in OWNER_CHANNELS and peer.user_id != conn.user_id:
            conn.reply(m.LinkRefusedMsg(link_id=req.link_id, peer=req.peer,
                                       code="forbidden", reason=f"channel {req.channel!r} links only one user's devices"))
            return
        if req.peer not in self._peers[conn.device_id]:
            limit = self.config.limits.max_peers_per_device
            if len(self._peers[conn.device_id]) >= limit or len(self._peers[req.peer]) >= limit:
                conn.reply(m.LinkRefusedMsg(link_id=req.link_id, peer=req.peer,
                                           code="limit", reason=f"a device may link with at most {limit} peers at once"))
                return
            self._peers[conn.device_id].add(req.peer)
            self._peers[req.peer].add(conn.device_id)
        secret = secrets.token_bytes(32)
        mine, theirs = DeviceProfile.of(conn.profile), DeviceProfile.of(peer.profile)
        near = same_host(conn.remote_ip, mine.machine_id, peer.remote_ip, theirs.machine_id)
        conn.reply(m.LinkGrant(link_id=req.link_id, peer=peer.device_id, channel=req.channel, initiator=True,
                               peer_addrs=usable_by_peer(list(theirs.listen_addrs), near), secret=secret,
                               peer_key=peer.public_key, peer_cert=peer.tls_cert))
        peer.send(m.LinkGrant(link_id=req.link_id, peer=conn.device_id, channel=req.channel, initiator=False,
                              peer_addrs=usable_by_peer(list(mine.listen_addrs), near), secret=secret,
                              peer_key=conn.public_key, peer_cert=conn.tls_cert))

    def set_direct_cert(self, conn: AgentConnection, cert: bytes) -> None:
        """Accept the direct-link certificate a device reports if it carries the device's enrolled key;
        its link peers then accept only this certificate on a direct path."""
        try:
            key = certificate_key(cert)
        except AuthenticationFailed as exc:
            raise InvalidMessage(f"profile: tls_cert: {exc}") from None
        if not conn.public_key or key != conn.public_key:
            raise InvalidMessage("profile: tls_cert does not carry this device's enrolled key; its links stay relayed")
        conn.tls_cert = cert

    async def relay(self, conn: AgentConnection, env: Envelope, frame: bytes) -> None:
        """Forward a frame unchanged to its destination device."""
        if env.type not in RELAYED_TYPES:
            raise ProtocolError(f"message type {shown(env.type)} cannot be relayed")
        peer = self.conns.get(env.dst)
        if peer is None:
            if len(env.dst) > MAX_ID_CHARS:  # no device has such an id: do not echo it whole
                raise PeerUnavailable(f"no device {shown(env.dst)}")
            conn.reply(m.PeerDown(peer=env.dst))
            return
        if env.dst not in self._peers.get(conn.device_id, ()):
            # Also what a live link sees for a moment after its peer reconnected and before the link is
            # renewed; PeerLink waits for the renewal then, since the link was granted before.
            conn.reply(m.LinkRefusedMsg(link_id=str(env.body.get("link", ""))[:MAX_ID_CHARS], peer=env.dst,
                                       code="ungranted", reason="no link was granted to that device"))
            return
        await peer.relay_from(conn.device_id, frame)

    # --- link tests -------------------------------------------------------------

    def start_linktest(self, user_id: str, src: str, dst: str, total_bytes: int, message_bytes: int) -> LinkTestState:
        conn = self.conns.get(src)
        if conn is None:
            raise LookupError(f"device {src} is not online")
        test = LinkTestState(secrets.token_hex(8), user_id, src, dst, total_bytes, message_bytes)
        if len(self.linktests) >= MAX_LINKTESTS:  # results are kept for a while, not forever
            oldest = min(self.linktests.values(), key=lambda t: (not t.done, t.started))
            del self.linktests[oldest.test_id]
        self.linktests[test.test_id] = test
        conn.send(m.LinkTestStart(test_id=test.test_id, peer=dst, total_bytes=total_bytes, message_bytes=message_bytes))
        return test

    def linktest_update(self, conn: AgentConnection, msg: m.LinkTestProgress | m.LinkTestDone, _: bytes = b"") -> None:
        test = self.linktests.get(msg.test_id)
        if test is None or test.src != conn.device_id:
            return
        if isinstance(msg, m.LinkTestProgress):
            test.sent_bytes, test.path = msg.sent_bytes, msg.path
        else:
            test.done, test.result = True, msg.model_dump()
            test.sent_bytes, test.path = msg.bytes, msg.path

    # --- batched persistence ----------------------------------------------------

    def add_telemetry(self, conn: AgentConnection, samples: list[m.TelemetrySample]) -> None:
        """Keep the samples the device's rate allows (`TelemetryIntake`); the rest are dropped, counted."""
        dropped = self.telemetry.add(conn.device_id, conn.telemetry_budget, samples, self._clock(), time.time())
        if dropped and not conn.telemetry_dropped:
            limits = self.config.limits
            log.warning("device %s sends telemetry faster than %g samples/s (burst %d): dropping the excess",
                        conn.device_id, limits.telemetry_samples_per_second, limits.telemetry_burst)
        conn.telemetry_dropped += dropped

    async def flush(self) -> None:
        seen, self._dirty_seen = self._dirty_seen, {}
        await self.store.devices.touch_devices(seen)
        await self.store.telemetry.add_telemetry(self.telemetry.take_rows())

    async def prune(self, batch: int = PRUNE_BATCH) -> int:
        """Delete telemetry older than the retention, a bounded batch at a time: rounds go on while
        batches come back full, else one a minute. Returns the rows deleted."""
        now = self._clock()
        if now < self._next_prune:
            return 0
        before = time.time() - self.config.telemetry_retention
        deleted = await self.store.telemetry.prune_telemetry(before, batch)
        self._next_prune = now if deleted >= batch else now + 60.0
        return deleted

    async def sweep(self) -> None:
        """Probe agents that missed a heartbeat; disconnect those that left a probe unanswered for
        offline_after (their links then fail over). See `Liveness`: silence alone is no proof, since
        after a stall of the server itself every agent looks silent."""
        now = self._clock()
        for conn in list(self.conns.values()):
            live = conn.liveness
            if live.gone(now):
                log.info("device %s left a probe unanswered for %.1fs, marking offline", conn.device_id,
                         now - (live.probe_sent_at or now))
                await conn.close(4001, "silent past the liveness deadline")
                await self.unregister(conn)
            elif live.probe_due(now):
                live.probed(now)
                conn.send(m.Heartbeat(seq=0))

    async def maintain(self) -> None:
        """Background loop owned by the app lifespan: flush history, sweep dead agents."""
        while True:
            await asyncio.sleep(self.config.telemetry_flush_interval)
            try:
                await self.sweep()
                await self.flush()
                await self.prune()
            except Exception:  # keep serving; the next round retries
                log.exception("hub maintenance failed")
