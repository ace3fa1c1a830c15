"""Direct TCP paths between agents: mutual TLS 1.3 pinned to the granted devices, then length-prefixed frames.

The handshake (dialer D, listener L); only its first frame each way travels in the clear:

    D -> L  direct_start_tls{link}      which link, so that L knows whose certificate to require
    L -> D  direct_start_tls{link}      L holds that link's grant; both switch to TLS 1.3, L requiring a
                                        client certificate; each side trusts only the granted peer's
                                        certificate and checks the key it proved (neuranet.net.tls)
    D -> L  direct_hello{link, proof}   HMAC of the link secret: binds the path to this grant
    L -> D  direct_ok{link}

Nothing of the link is written before both sides have checked the other, so an impostor at an
advertised address (or one dialing in with a stolen link id and secret) gets no data.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

from neuranet.net.framing import FrameProtocol
from neuranet.net.tls import DeviceCredentials, PeerPin, check_peer, link_context
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import Envelope, decode_frame, encode_frame
from neuranet.protocol.errors import AuthenticationFailed, ProtocolError
from neuranet.tasks import OwnedTasks

log = logging.getLogger("neuranet.direct")

HANDSHAKE_TIMEOUT = 3.0
# Before the peer is authenticated a frame may be no larger than this (each handshake frame is far
# smaller), so a stranger cannot make us allocate a link-sized receive buffer by sending a length.
HANDSHAKE_MAX_FRAME = 4096
MAX_PENDING_HANDSHAKES = 64  # connections not yet authenticated, beyond which new ones are closed at once
# ... and from any one address: one stranger reconnecting as fast as it is timed out would otherwise
# hold every slot, and no peer could ever set up a direct path to this device.
MAX_PENDING_PER_ADDRESS = 16  # a NAT or a host of several agents dials from one; handshakes take milliseconds


def link_proof(secret: bytes, link_id: str, dialer: str) -> bytes:
    return hmac.new(secret, b"neuranet-direct-v1\x00" + link_id.encode() + b"\x00" + dialer.encode(), hashlib.sha256).digest()


class DirectPath:
    """One established connection carrying a single link's frames."""

    kind = "direct"

    def __init__(self, protocol: FrameProtocol) -> None:
        assert protocol.transport is not None
        self.protocol = protocol
        self.closed = False
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = protocol.transport.get_extra_info("peername")

    @property
    def transport(self) -> asyncio.Transport:
        assert self.protocol.transport is not None
        return self.protocol.transport  # the TLS transport once the handshake switched to it

    async def start_tls(self, context: ssl.SSLContext, peer: PeerPin, server_side: bool, max_frame: int,
                        first: bytes = b"", timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Switch to TLS and check that the other end is the granted peer; frames up to ``max_frame``
        are accepted from then on."""
        await self.protocol.start_tls(context, server_side, timeout, first)
        check_peer(self.transport.get_extra_info("ssl_object"), peer)
        self.protocol.max_frame = max_frame

    async def write(self, frame: bytes) -> None:
        if self.closed:
            raise ConnectionError("direct path is closed")
        await self.protocol.write_frame(frame)

    async def read(self, timeout: float | None = None) -> Envelope:
        return decode_frame(await asyncio.wait_for(self.protocol.read_frame(), timeout))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


@dataclass(frozen=True)
class DirectGrant:
    """What a listener needs to accept a link's direct path: whom it must reach, and where it goes."""

    peer: str  # the device id the dialer must be
    secret: bytes
    pin: PeerPin
    attach: Callable[[DirectPath], Awaitable[None]]


async def dial(addrs: list[tuple[str, int]], link_id: str, me: str, secret: bytes, pin: PeerPin,
               own: DeviceCredentials, max_frame: int, timeout: float = HANDSHAKE_TIMEOUT) -> DirectPath | None:
    """Try each advertised address in turn; return the first path whose handshake succeeds."""
    if not pin.usable:
        return None  # the grant names no certificate for the peer: relay only
    loop = asyncio.get_running_loop()
    for host, port in addrs:
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: FrameProtocol(HANDSHAKE_MAX_FRAME), host, port), timeout)
        # A peer advertises these addresses itself: a bad host or port is one more address that fails.
        except (OSError, ValueError, OverflowError, asyncio.TimeoutError):
            continue
        path = DirectPath(protocol)  # type: ignore[arg-type]
        try:
            await _dialer_handshake(path, link_id, me, secret, pin, own, max_frame, timeout)
            return path
        except (OSError, asyncio.TimeoutError, ProtocolError) as exc:  # ssl.SSLError is an OSError
            log.info("direct path to %s:%s for link %s failed: %s", host, port, link_id, exc or type(exc).__name__)
        except BaseException:  # cancelled (the link or agent is closing): do not leak the socket
            path.close()
            raise
        path.close()
    return None


async def _dialer_handshake(path: DirectPath, link_id: str, me: str, secret: bytes, pin: PeerPin,
                            own: DeviceCredentials, max_frame: int, timeout: float) -> None:
    await path.write(encode_frame(m.DirectStartTls(link=link_id).envelope(src=me)))
    reply = m.parse(await path.read(2 * timeout))  # the listener may first wait for its copy of the grant
    if not isinstance(reply, m.DirectStartTls) or reply.link != link_id:
        raise AuthenticationFailed(f"the listener answered {reply.TYPE} for link {getattr(reply, 'link', '?')!r}")
    await path.start_tls(link_context(own, pin, server_side=False), pin, server_side=False, max_frame=max_frame,
                         timeout=timeout)
    await path.write(encode_frame(m.DirectHello(link=link_id, proof=link_proof(secret, link_id, me)).envelope(src=me)))
    ok = m.parse(await path.read(timeout))
    if not isinstance(ok, m.DirectOk) or ok.link != link_id:
        raise AuthenticationFailed(f"the peer answered {ok.TYPE} instead of direct_ok")


class DirectListener:
    """Accepts direct connections and hands each authenticated one to its link."""

    def __init__(self, lookup: Callable[[str], Awaitable[DirectGrant | None]], own: DeviceCredentials,
                 max_frame: int, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._lookup = lookup  # link id -> its grant, waiting (bounded) for the grant to arrive
        self._own = own
        self._max_frame = max_frame
        self._timeout = handshake_timeout  # for each step of the handshake
        self._server: asyncio.AbstractServer | None = None
        self._handshakes = OwnedTasks("direct listener")
        self._pending_from: collections.Counter[str] = collections.Counter()  # remote address -> handshakes
        self.port = 0

    @property
    def pending(self) -> int:
        """Connections accepted and not yet authenticated (nor refused)."""
        return len(self._handshakes)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._handshakes.cancel()
        await self._handshakes.join()

    def _protocol(self) -> FrameProtocol:
        return FrameProtocol(HANDSHAKE_MAX_FRAME, on_connected=self._accepted)

    def _accepted(self, proto: FrameProtocol) -> None:
        assert proto.transport is not None
        peer = proto.transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self.pending >= MAX_PENDING_HANDSHAKES or self._pending_from[source] >= MAX_PENDING_PER_ADDRESS:
            proto.transport.abort()  # a flood of connections that never authenticate: no task, no buffers
            return
        self._pending_from[source] += 1
        task = self._handshakes.spawn(self._handshake(proto), name=f"handshake-{source}")
        task.add_done_callback(lambda _: self._handshake_done(source))

    def _handshake_done(self, source: str) -> None:
        self._pending_from[source] -= 1
        if self._pending_from[source] <= 0:
            del self._pending_from[source]

    async def _handshake(self, proto: FrameProtocol) -> None:
        path = DirectPath(proto)
        try:
            grant = await self._authenticate(path)
        except (OSError, asyncio.TimeoutError, ProtocolError) as exc:  # ssl.SSLError is an OSError
            log.info("direct connection from %s refused: %s", path.peer, exc or type(exc).__name__)
            path.close()
            return
        except BaseException:  # the listener is closing: do not leak the accepted socket
            path.close()
            raise
        await grant.attach(path)

    async def _authenticate(self, path: DirectPath) -> DirectGrant:
        start = m.parse(await path.read(self._timeout))
        if not isinstance(start, m.DirectStartTls):
            raise AuthenticationFailed(f"a direct connection must start with direct_start_tls, not {start.TYPE}")
        grant = await self._lookup(start.link)
        if grant is None:
            raise AuthenticationFailed(f"no link {start.link!r}")
        if not grant.pin.usable:
            raise AuthenticationFailed(f"the grant of link {start.link!r} names no certificate for its peer")
        go = encode_frame(m.DirectStartTls(link=start.link).envelope())
        await path.start_tls(link_context(self._own, grant.pin, server_side=True), grant.pin, server_side=True,
                             max_frame=self._max_frame, first=go, timeout=self._timeout)
        env = await path.read(self._timeout)
        hello = m.parse(env)
        if not isinstance(hello, m.DirectHello) or hello.link != start.link:
            raise AuthenticationFailed("the first frame inside TLS must be direct_hello for the same link")
        if env.src != grant.peer or not hmac.compare_digest(hello.proof, link_proof(grant.secret, hello.link, grant.peer)):
            raise AuthenticationFailed("bad direct-link proof")
        await path.write(encode_frame(m.DirectOk(link=hello.link).envelope()))
        return grant
