"""PeerLink: an ordered, bounded message channel between two agents, direct or relayed.

A link has one pump task that puts frames on the best path available: the
direct TCP path when one is attached, else the relay through the server. When a
path appears or fails the pump rewinds to the oldest unacknowledged frame
(see :mod:`neuranet.net.window`), so switching never loses or reorders
messages. ``send`` blocks while the peer has ``window`` bytes unconsumed, which
is the link's backpressure.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import torch

from neuranet.net.direct import DirectPath
from neuranet.net.tls import PeerPin
from neuranet.net.window import Delivered, ReceiveWindow, SendWindow, WindowError
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import Buffer, Envelope, encode_frame
from neuranet.protocol.errors import LinkError, LinkRefused, PeerUnreachable, ProtocolError
from neuranet.protocol.tensors import decode_tensor, encode_tensor
from neuranet.tasks import OwnedTasks

if TYPE_CHECKING:
    from neuranet.net.links import LinkManager

log = logging.getLogger("neuranet.peerlink")


class LinkClosed(LinkError):
    """The link was closed by either end; nothing more will arrive."""


class RelayUnavailable(LinkError, ConnectionError):
    """The agent is not connected to the server right now."""


class PathChanged(LinkError, ConnectionError):
    """The path a frame was written to failed; the window was rewound for the next one."""


ACK_DELAY = 0.002  # seconds an ack may wait for more consumption (cf. TCP's delayed ack)


@dataclass(slots=True)
class LinkMessage:
    """One received message; ``payload`` is read-only bytes-like (bytes or a memoryview)."""

    meta: dict[str, Any]
    payload: bytes | memoryview

    def tensor(self) -> torch.Tensor:
        return decode_tensor(self.meta.get("tensor"), self.payload)


class PeerLink:
    def __init__(self, manager: "LinkManager", link_id: str, peer: str, channel: str, initiator: bool) -> None:
        cfg = manager.config
        self.manager = manager
        self.link_id = link_id
        self.peer = peer
        self.channel = channel
        self.initiator = initiator
        self.frame_bytes = cfg.frame_bytes
        self.max_message_bytes = cfg.link_window_bytes
        self._tx = SendWindow(cfg.link_window_bytes)
        self._rx = ReceiveWindow(cfg.link_window_bytes)
        self._inbox: collections.deque[Delivered] = collections.deque()
        self._changed = asyncio.Event()  # credit, inbox, path or state changed
        self._send_lock = asyncio.Lock()
        self.direct: DirectPath | None = None
        self.relay_ready = False
        self.granted = asyncio.Event()
        self.secret = b""
        self.peer_addrs: list[tuple[str, int]] = []
        self.peer_pin = PeerPin(b"", b"")  # whom a direct path must reach (from the grant)
        self.paths_used: set[str] = set()
        self.error: BaseException | None = None
        self.closed = False
        self.peer_down_since: float | None = None
        self.last_rx = self.manager.clock()
        self._ack_due = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._epoch = 0
        self._tasks = OwnedTasks(f"link {link_id}")  # cancelled when the link ends

    # --- public API -------------------------------------------------------------

    @property
    def path(self) -> str:
        if self.direct is not None:
            return "direct"
        return "relay" if self.relay_ready else "none"

    async def send(self, payload: Buffer, meta: dict[str, Any] | None = None) -> None:
        """Queue one message (split into frames); returns once it fits the window."""
        view = memoryview(payload).cast("B")
        if len(view) > self.max_message_bytes:
            raise ValueError(f"message of {len(view)} bytes exceeds the link's limit of {self.max_message_bytes}")
        async with self._send_lock:
            first, pos = True, 0
            while first or pos < len(view):
                chunk = view[pos : pos + self.frame_bytes]
                pos += len(chunk)
                await self._wait(lambda: self._tx.can_push(len(chunk)))
                body = m.LinkData.body(self.link_id, self._tx.next_seq, self._tx.next_off, pos >= len(view),
                                       (meta or {}) if first else None)
                frame = encode_frame(Envelope("link_data", body, 0, self.manager.me, self.peer, chunk))
                self._tx.push(len(chunk), frame)
                self._changed.set()
                first = False

    async def send_tensor(self, t: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
        header, data = encode_tensor(t)
        await self.send(data, {**(meta or {}), "tensor": header})

    async def recv(self) -> LinkMessage:
        """Next message in order; raises LinkClosed / PeerUnreachable when the link ends."""
        await self._wait(lambda: bool(self._inbox), allow_closed=True)
        if not self._inbox:
            raise self.error or LinkClosed(f"link {self.link_id} to {self.peer} is closed")
        msg = self._inbox.popleft()
        self._rx.consume(msg)
        if self._rx.should_ack(not self._inbox):
            if self._rx.ack_is_urgent():
                self._request_ack()
            elif self._ack_timer is None:  # delayed ack: one per burst of small messages, not one each
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._request_ack)
        return LinkMessage(msg.meta or {}, msg.payload)

    def _request_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._ack_due = True
        self._changed.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the peer's application has consumed everything sent so far."""
        await asyncio.wait_for(self._wait(lambda: self._tx.unacked == 0), timeout)

    async def close(self, flush_timeout: float = 10.0) -> None:
        """Deliver what is queued (bounded wait), then tell the peer the link is done."""
        if not self.closed:
            try:
                await self.flush(flush_timeout)
            except (asyncio.TimeoutError, LinkError, ProtocolError):
                pass
            try:
                await self._write(encode_frame(m.LinkClose(link=self.link_id).envelope(src=self.manager.me, dst=self.peer)))
            except (ConnectionError, OSError):
                pass
            self._shutdown(None)

    def abort(self, error: BaseException | None = None) -> None:
        """End the link at once, without flushing or telling the peer."""
        self._shutdown(error)

    async def wait_stopped(self) -> None:
        """After the link ended: wait until its own tasks have finished."""
        await self._tasks.join()

    # --- driven by the manager ----------------------------------------------------

    def start(self) -> None:
        self._spawn(self._pump(), f"pump-{self.link_id}")
        self._spawn(self._watchdog(), f"watch-{self.link_id}")

    def on_grant(self, grant: m.LinkGrant) -> None:
        """The server (re)authorised the link: relay works, and direct may be tried."""
        self.secret, self.peer_addrs = grant.secret, list(grant.peer_addrs)
        self.peer_pin = PeerPin(grant.peer_key, grant.peer_cert)
        self.relay_ready = True
        self.peer_down_since = None
        self._rewind()
        renewal = self.granted.is_set()
        self.granted.set()
        if renewal and self.initiator and self.direct is None:
            self.manager.try_direct(self)  # the first attempt is made by LinkManager.open

    def on_refused(self, code: m.LinkRefusalCode, reason: str) -> None:
        """The server would not relay: wait for the peer if it is away (or the link is being
        renewed after a reconnect), give up if the link is not allowed at all, or if it was never
        granted and the peer is offline (nothing would grant it later: the opener hears at once)."""
        granted = self.granted.is_set()
        if code == "offline" and not granted:
            self._shutdown(PeerUnreachable(f"link to {self.peer} refused ({code}): {reason}"))
        elif code == "offline" or (code == "ungranted" and granted):
            self.peer_down_since = self.peer_down_since or self.manager.clock()
            self.relay_ready = False
        else:
            self._shutdown(LinkRefused(f"link to {self.peer} refused ({code}): {reason}"))

    def on_relay_lost(self) -> None:
        self.relay_ready = False
        self._changed.set()

    def on_peer_down(self) -> None:
        self.peer_down_since = self.peer_down_since or self.manager.clock()
        self.relay_ready = False
        self._changed.set()

    async def attach_direct(self, path: DirectPath) -> None:
        if self.closed:
            path.close()
            return
        if self.direct is not None:
            self.direct.close()
        self.direct = path
        self._rewind()
        self._spawn(self._read_direct(path), f"direct-{self.link_id}")

    def on_frame(self, env: Envelope) -> None:
        """Handle a frame that arrived on any path."""
        self.last_rx = self.manager.clock()
        try:
            if env.type == "link_data":
                got = self._rx.accept(*m.LinkData.read(env.body), env.payload)
                if got is False:
                    self._ack_due = True  # a duplicate: our last ack may have been lost
                elif got is not None:
                    self._inbox.append(got)
                self._changed.set()
            elif env.type == "link_ack":
                self._tx.on_ack(*m.LinkAck.read(env.body))
                self._changed.set()
            elif env.type == "link_close":
                self._shutdown(None)
            elif env.type == "ping" and self.direct is not None:
                self._spawn_write(encode_frame(m.Pong(link=self.link_id).envelope(src=self.manager.me, dst=self.peer)))
        except (ProtocolError, WindowError) as exc:
            log.warning("link %s: bad frame from %s: %s", self.link_id, self.peer, exc)
            self._shutdown(ProtocolError(f"peer {self.peer} broke the link protocol: {exc}"))

    # --- internals ------------------------------------------------------------------

    def _rewind(self) -> None:
        """A path appeared or failed: resend from the oldest unacked frame, and re-send our ack."""
        self._epoch += 1
        self._tx.rewind()
        self._ack_due = True
        self._changed.set()

    async def _wait(self, ready: Any, allow_closed: bool = False) -> None:
        while not ready():
            if self.closed:
                if allow_closed:
                    return
                raise self.error or LinkClosed(f"link {self.link_id} to {self.peer} is closed")
            self._changed.clear()
            await self._changed.wait()
        if self.closed and not allow_closed:
            raise self.error or LinkClosed(f"link {self.link_id} to {self.peer} is closed")

    async def _write(self, frame: bytes) -> str:
        """Put one frame on the best path; returns the path's name."""
        direct = self.direct
        if direct is not None:
            try:
                await direct.write(frame)
                return "direct"
            except (ConnectionError, OSError):
                self._drop_direct(direct)
                raise PathChanged("direct path failed") from None
        if not self.relay_ready:
            raise RelayUnavailable("no path to the peer right now")
        await self.manager.relay_send(frame)
        return "relay"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # The tasks handle every expected failure themselves; anything else (logged by the owner) would
        # leave the link hanging with no pump, so end it and let send/recv raise the error instead.
        self._tasks.spawn(coro, name=name, on_error=self._shutdown)

    def _spawn_write(self, frame: bytes) -> None:
        """Send a control frame (pong, ping) without waiting; losing one is harmless."""
        async def write() -> None:
            try:
                await self._write(frame)
            except (ConnectionError, OSError):
                pass

        self._spawn(write(), f"ctl-{self.link_id}")

    async def _pump(self) -> None:
        """The only task that puts data frames on a path, so their order is the window's."""
        while not self.closed:
            try:
                if self._ack_due:
                    self._ack_due = False
                    seq, consumed = self._rx.ack()
                    await self._write(encode_frame(m.LinkAck(link=self.link_id, seq=seq, consumed=consumed)
                                                   .envelope(src=self.manager.me, dst=self.peer)))
                sent = self._tx.next_to_transmit()
                if sent is None:
                    if not self._ack_due:
                        self._changed.clear()
                        await self._changed.wait()
                    continue
                epoch = self._epoch
                self.paths_used.add(await self._write(sent.frame))
                if epoch == self._epoch:  # else a path change rewound the cursor meanwhile
                    self._tx.advance()
            except PathChanged:
                continue
            except RelayUnavailable:
                self._rewind()
                self._changed.clear()
                await self._changed.wait()  # a grant or a direct path wakes us
            except (ConnectionError, OSError):
                self.relay_ready = False
                self._rewind()

    async def _read_direct(self, path: DirectPath) -> None:
        try:
            while not path.closed:
                env = await path.read()
                if env.src != self.peer or env.body.get("link") not in (None, self.link_id):
                    raise ProtocolError("frame for another link on a direct path")
                self.on_frame(env)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ProtocolError):
            pass
        finally:
            self._drop_direct(path)

    def _drop_direct(self, path: DirectPath) -> None:
        path.close()
        if self.direct is path:
            log.info("link %s: direct path to %s lost, falling back to relay", self.link_id, self.peer)
            self.direct = None
            self._rewind()
            if self.initiator and not self.closed:
                self.manager.try_direct(self, delay=self.manager.config.direct_retry_interval)

    async def _watchdog(self) -> None:
        """Ping an idle direct path, drop a silent one, and give up on a peer gone too long."""
        cfg = self.manager.config
        while not self.closed:
            await asyncio.sleep(min(cfg.link_idle_ping, 1.0))
            now = self.manager.clock()
            if self.direct is not None:
                if now - self.last_rx > cfg.link_dead_after:
                    self._drop_direct(self.direct)
                elif now - self.last_rx > cfg.link_idle_ping:
                    self._spawn_write(encode_frame(m.Ping(link=self.link_id).envelope(src=self.manager.me, dst=self.peer)))
            if self.peer_down_since is not None and now - self.peer_down_since > self.manager.peer_timeout:
                self._shutdown(PeerUnreachable(f"peer {self.peer} has been unreachable for over {self.manager.peer_timeout:.0f}s"))

    def _shutdown(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        direct, self.direct = self.direct, None  # closed with the link, not lost: `_drop_direct` stays quiet
        if direct is not None:
            direct.close()
        self._changed.set()
        self.granted.set()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self.manager.forget(self)
        self._tasks.cancel()
