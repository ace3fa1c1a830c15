"""The agent's registry of PeerLinks: opening, accepting, routing frames, renewing after reconnects."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from neuranet.config import AgentConfig
from neuranet.net.direct import DirectGrant, dial
from neuranet.net.tls import DeviceCredentials
from neuranet.net.peerlink import PeerLink
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import Envelope
from neuranet.tasks import OwnedTasks

log = logging.getLogger("neuranet.links")

Handler = Callable[[PeerLink], Awaitable[None]]


class LinkManager:
    """Owns every link of one agent and the tasks that serve them."""

    def __init__(self, config: AgentConfig, credentials: DeviceCredentials, relay_send: Callable[[bytes], Awaitable[None]],
                 send_control: Callable[[m.Message], Awaitable[None]], peer_timeout: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # for the links' liveness: how long a path or a peer has been silent or away
        self.credentials = credentials  # what this device presents on direct paths
        self.me = ""
        self.relay_send = relay_send
        self._send_control = send_control
        self.peer_timeout = peer_timeout
        self.links: dict[str, PeerLink] = {}
        self._handlers: dict[str, Handler] = {}
        self._incoming: dict[str, asyncio.Queue[PeerLink]] = {}
        self._tasks = OwnedTasks("links")  # handlers, direct dials, closes; cancelled by close()
        self._awaited: dict[str, asyncio.Future[None]] = {}  # link ids a direct dialer is waiting on

    # --- public API -------------------------------------------------------------

    async def open(self, peer: str, channel: str = "default", timeout: float = 15.0) -> PeerLink:
        """Ask the server for a link to ``peer``; raises LinkRefused if it is not allowed."""
        link = PeerLink(self, f"{self.me[:8]}-{secrets.token_hex(6)}", peer, channel, initiator=True)
        self.links[link.link_id] = link
        link.start()
        try:
            await self._send_control(m.LinkOpen(link_id=link.link_id, peer=peer, channel=channel))
            await asyncio.wait_for(link.granted.wait(), timeout)
        except asyncio.TimeoutError:
            await link.close()
            raise TimeoutError(f"the server did not grant a link to {peer} within {timeout:.0f}s") from None
        except BaseException as exc:  # not connected, or cancelled: the caller never gets the link
            link.abort(exc if isinstance(exc, Exception) else None)
            raise
        if link.error is not None:
            raise link.error
        if not await self._dial(link):
            self.try_direct(link, delay=self.config.direct_retry_interval)
        return link

    def serve(self, channel: str, handler: Handler) -> None:
        """Run ``handler(link)`` for every link a peer opens on ``channel``."""
        self._handlers[channel] = handler

    async def accept(self, channel: str = "default") -> PeerLink:
        """Next link a peer opened on a channel that has no handler."""
        return await self._queue(channel).get()

    async def close(self) -> None:
        links = list(self.links.values())
        # Together, so shutdown waits at most one flush timeout rather than one per link.
        await asyncio.gather(*(link.close(flush_timeout=2.0) for link in links), return_exceptions=True)
        for link in links:
            await link.wait_stopped()
        self._tasks.cancel()  # not closed for good: the agent may run (and link) again
        await self._tasks.join()

    # --- driven by the agent's connection -------------------------------------------

    def on_control(self, msg: m.Message) -> None:
        if isinstance(msg, m.LinkGrant):
            link = self.links.get(msg.link_id)
            if link is None:
                if msg.initiator or msg.link_id.startswith(f"{self.me[:8]}-"):
                    # A late grant (or the peer's renewal) of a link this side opened and has since
                    # ended: not an incoming link.
                    return
                link = PeerLink(self, msg.link_id, msg.peer, msg.channel, initiator=False)
                self.links[link.link_id] = link
                link.start()
                link.on_grant(msg)
                self._deliver(link)
                waiter = self._awaited.pop(link.link_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif link.peer == msg.peer:
                link.on_grant(msg)
        elif isinstance(msg, m.LinkRefusedMsg):
            link = self.links.get(msg.link_id)
            if link is not None:
                link.on_refused(msg.code, msg.reason)
        elif isinstance(msg, m.PeerDown):
            for link in self.links.values():
                if link.peer == msg.peer:
                    link.on_peer_down()

    def on_relayed(self, env: Envelope) -> None:
        link = self.links.get(str(env.body.get("link", "")))
        if link is not None and env.src == link.peer:
            link.on_frame(env)

    async def on_connected(self) -> None:
        """After (re)connecting, ask the server to renew every live link."""
        for link in list(self.links.values()):
            await self._send_control(m.LinkOpen(link_id=link.link_id, peer=link.peer, channel=link.channel))

    def on_disconnected(self) -> None:
        for link in self.links.values():
            link.on_relay_lost()

    async def lookup(self, link_id: str, timeout: float = 3.0) -> DirectGrant | None:
        """The link a direct connection claims to be for. The dialer may be faster than
        our copy of the grant, so wait (bounded) for the grant to arrive."""
        link = self.links.get(link_id)
        if (link is None or not link.secret) and len(self._awaited) < 256:
            waiter = self._awaited.setdefault(link_id, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                self._awaited.pop(link_id, None)
            link = self.links.get(link_id)
        if link is None or not link.secret:
            return None
        return DirectGrant(link.peer, link.secret, link.peer_pin, link.attach_direct)

    async def _dial(self, link: PeerLink) -> bool:
        """One attempt at a direct path; True when the link now has one."""
        if link.closed or link.direct is not None:
            return not link.closed
        if not link.peer_addrs or not link.peer_pin.usable:
            return False
        path = await dial(link.peer_addrs, link.link_id, self.me, link.secret, link.peer_pin, self.credentials,
                          self.config.frame_bytes * 2)
        if path is not None:
            await link.attach_direct(path)
        return path is not None

    def try_direct(self, link: PeerLink, delay: float = 0.0) -> None:
        """Keep trying for a direct path in the background, every ``direct_retry_interval``."""
        async def attempt() -> None:
            await asyncio.sleep(delay)
            if not await self._dial(link) and not link.closed and link.peer_addrs and link.peer_pin.usable:
                self.try_direct(link, delay=self.config.direct_retry_interval)

        self._spawn(attempt())

    def forget(self, link: PeerLink) -> None:
        if self.links.get(link.link_id) is link:
            del self.links[link.link_id]

    # --- internals ------------------------------------------------------------------

    def _queue(self, channel: str) -> asyncio.Queue[PeerLink]:
        return self._incoming.setdefault(channel, asyncio.Queue(maxsize=64))

    def _deliver(self, link: PeerLink) -> None:
        handler = self._handlers.get(link.channel)
        if handler is not None:
            self._spawn(self._run_handler(handler, link))
            return
        try:
            self._queue(link.channel).put_nowait(link)
        except asyncio.QueueFull:
            log.warning("too many unaccepted links on channel %s; closing %s", link.channel, link.link_id)
            self._spawn(link.close())

    async def _run_handler(self, handler: Handler, link: PeerLink) -> None:
        try:
            await handler(link)
        except Exception:
            log.exception("handler for channel %s failed on link %s", link.channel, link.link_id)
        finally:
            await link.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        self._tasks.spawn(coro, name=name)  # a failure is logged with its traceback
