"""A coordinator that follows a test's script on a real loopback WebSocket, and a clock that never waits.

For agent behaviour that needs the server to do something at an exact moment (drop a connection
just after the handshake, or while a question is unanswered), which the real coordinator would do
only by chance. It speaks the real protocol with the real message classes; it accepts any key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import AsyncIterator

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.server import ServerConnection, serve

from neuranet.protocol import messages as m
from neuranet.protocol.auth import coordinator_payload
from neuranet.protocol.envelope import decode_frame, encode_frame

DEVICE = "d1"


class SteppedClock:
    """Time that moves only when the agent waits: a wait returns at once, with the clock moved on."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


class GatedClock(SteppedClock):
    """A stepped clock whose waits last until the test opens ``gate`` (``waiting`` is set meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.waiting.set()
        await self.gate.wait()
        self.waiting.clear()
        await super().sleep(seconds)


class Session:
    """One agent connection, after the handshake."""

    def __init__(self, ws: ServerConnection, number: int) -> None:
        self.ws = ws
        self.number = number  # 1 for the first connection

    async def send(self, msg: m.Message) -> None:
        await self.ws.send(encode_frame(msg.envelope(src="server")))

    async def recv(self) -> m.Message:
        return m.parse(decode_frame(await self.ws.recv()))

    async def next_of(self, kind: type[m.Message]) -> m.Message:
        """The next message of one type (the agent's others: heartbeats, profile, inventory, skipped)."""
        while True:
            msg = await self.recv()
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, m.Heartbeat):
                await self.send(m.HeartbeatAck(seq=msg.seq))


Script = Callable[[Session], Awaitable[None]]


KEY = Ed25519PrivateKey.generate()  # this coordinator's identity (the agent pins it at enrolment)
PUBLIC_KEY = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


async def welcome(ws: ServerConnection, heartbeat: float = 3.0, offline_after: float = 12.0) -> None:
    """The server's side of the handshake: proves its key, accepts whatever the agent signs."""
    hello = m.parse(decode_frame(await ws.recv()))
    assert isinstance(hello, m.Hello) and hello.server_nonce, hello
    nonce = b"n" * 32
    proof = KEY.sign(coordinator_payload(hello.server_nonce, nonce, DEVICE))
    await ws.send(encode_frame(m.Challenge(nonce=nonce, device_id=DEVICE, server_key=PUBLIC_KEY,
                                           server_signature=proof).envelope(src="server")))
    await ws.recv()  # the signature
    await ws.send(encode_frame(m.Welcome(device_id=DEVICE, user_id="u1", heartbeat_interval=heartbeat,
                                         offline_after=offline_after, max_message_bytes=1 << 22,
                                         max_queued_bytes=1 << 24).envelope(src="server")))


@asynccontextmanager
async def scripted_coordinator(script: Script, heartbeat: float = 3.0,
                               offline_after: float = 12.0) -> AsyncIterator[str]:
    """Serve ``script(session)`` for every agent connection after the handshake (returning ends the
    connection); yields the server's http:// URL."""
    count = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        session = Session(ws, count)
        await welcome(ws, heartbeat, offline_after)
        await script(session)

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
