"""Direct TCP paths between agents: length-prefixed frames, a secret-proving handshake."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from typing import Awaitable, Callable

import psutil

from neuranet.protocol import messages as m
from neuranet.protocol.envelope import Envelope, decode_frame, encode_frame
from neuranet.net.framing import FrameProtocol
from neuranet.protocol.errors import AuthenticationFailed, ProtocolError

HANDSHAKE_TIMEOUT = 3.0


def link_proof(secret: bytes, link_id: str, dialer: str) -> bytes:
    return hmac.new(secret, b"neuranet-direct-v1\x00" + link_id.encode() + b"\x00" + dialer.encode(), hashlib.sha256).digest()


class DirectPath:
    """One established TCP connection carrying a single link's frames."""

    kind = "direct"

    def __init__(self, transport: asyncio.Transport, protocol: FrameProtocol) -> None:
        self.transport = transport
        self.protocol = protocol
        self.closed = False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = transport.get_extra_info("peername")

    async def write(self, frame: bytes) -> None:
        if self.closed:
            raise ConnectionError("direct path is closed")
        await self.protocol.write_frame(frame)

    async def read(self) -> Envelope:
        return decode_frame(await self.protocol.read_frame())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


async def dial(addrs: list[tuple[str, int]], link_id: str, me: str, secret: bytes, max_frame: int,
               timeout: float = HANDSHAKE_TIMEOUT) -> DirectPath | None:
    """Try each advertised address in turn; return the first path whose handshake succeeds."""
    loop = asyncio.get_running_loop()
    hello = encode_frame(m.DirectHello(link=link_id, proof=link_proof(secret, link_id, me)).envelope(src=me))
    for host, port in addrs:
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: FrameProtocol(max_frame), host, port), timeout)
        # A peer advertises these addresses itself: a bad host or port is one more address that fails.
        except (OSError, ValueError, OverflowError, asyncio.TimeoutError):
            continue
        path = DirectPath(transport, protocol)  # type: ignore[arg-type]
        try:
            await path.write(hello)
            env = await asyncio.wait_for(path.read(), 2 * timeout)
            if env.type == "direct_ok" and env.body.get("link") == link_id:
                return path
        except (OSError, asyncio.TimeoutError, ProtocolError):
            pass
        except BaseException:  # cancelled (the link or agent is closing): do not leak the socket
            path.close()
            raise
        path.close()
    return None


class DirectListener:
    """Accepts direct connections and hands each authenticated one to its link."""

    def __init__(self, lookup: Callable[[str], Awaitable["tuple[str, bytes, Callable[[DirectPath], Awaitable[None]]] | None"]],
                 max_frame: int) -> None:
        self._lookup = lookup  # link id -> (peer device id, secret, attach callback)
        self._max_frame = max_frame
        self._server: asyncio.AbstractServer | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _protocol(self) -> FrameProtocol:
        return FrameProtocol(self._max_frame, on_connected=self._accepted)

    def _accepted(self, proto: FrameProtocol) -> None:
        task = asyncio.ensure_future(self._handshake(proto))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, proto: FrameProtocol) -> None:
        assert proto.transport is not None
        path = DirectPath(proto.transport, proto)
        try:
            env = await asyncio.wait_for(path.read(), HANDSHAKE_TIMEOUT)
            hello = m.parse(env)
            if not isinstance(hello, m.DirectHello):
                raise AuthenticationFailed("direct connection must start with direct_hello")
            found = await self._lookup(hello.link)
            if found is None:
                raise AuthenticationFailed(f"no link {hello.link}")
            peer, secret, attach = found
            if env.src != peer or not hmac.compare_digest(hello.proof, link_proof(secret, hello.link, peer)):
                raise AuthenticationFailed("bad direct-link proof")
            await path.write(encode_frame(m.DirectOk(link=hello.link).envelope()))
        except (OSError, asyncio.TimeoutError, ProtocolError):
            path.close()
            return
        except BaseException:  # the listener is closing: do not leak the accepted socket
            path.close()
            raise
        await attach(path)


def local_addresses(port: int, listen_host: str) -> list[tuple[str, int]]:
    """Addresses a peer might reach this listener on, most specific first."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return [(listen_host, port)]
    out: list[tuple[str, int]] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append((a.address, port))
    out.append(("127.0.0.1", port))
    return out[:16]
