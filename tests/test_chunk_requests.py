"""The coordinator's chunk requests to devices, against a real server with hand-driven device sockets:
a request outstanding on a connection that was replaced is sent again on the new one at once."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect

from fabric_helpers import async_wait_for, free_port
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, decode_frame, encode_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("chunk-requests")) as f:
        f.start_server(port=free_port())
        yield f


class Device:
    """One enrolled device driven by hand: its key, id and current connection."""

    def __init__(self, fabric: LocalFabric) -> None:
        self.fabric = fabric
        self.key = Ed25519PrivateKey.generate()
        self.id = ""
        self.ws: ClientConnection | None = None

    async def connect(self, join_token: str | None = None) -> ClientConnection:
        ws = await connect(self.fabric.url.replace("http://", "ws://") + "/agent", max_size=None, compression=None)
        pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        hello = m.Hello(version=PROTOCOL_VERSION, device_id=self.id or None,
                        enrol=m.Enrolment(join_token=join_token, public_key=pub, name="hand") if join_token else None)
        await ws.send(encode_frame(hello.envelope()))
        challenge = await self.recv(ws)
        assert isinstance(challenge, m.Challenge), challenge
        await ws.send(encode_frame(m.Auth(signature=self.key.sign(auth_payload(challenge.nonce, challenge.device_id)))
                                   .envelope()))
        welcome = await self.recv(ws)
        assert isinstance(welcome, m.Welcome), welcome
        self.id, self.ws = welcome.device_id, ws
        return ws

    @staticmethod
    async def recv(ws: ClientConnection) -> m.Message:
        return m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 20)))

    async def send(self, msg: m.Message, payload: bytes = b"") -> None:
        assert self.ws is not None
        await self.ws.send(encode_frame(msg.envelope(src=self.id, dst="server", payload=payload)))

    async def next_of(self, ws: ClientConnection, kind: type[m.Message]) -> m.Message:
        while not isinstance(msg := await self.recv(ws), kind):
            pass
        return msg


async def test_a_put_outstanding_when_the_holder_reconnects_is_sent_again_at_once(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        jt = c.create_join_token()["join_token"]
    device = Device(fabric)
    first = await device.connect(jt)
    await device.send(m.ChunkInventory(quota_bytes=1 << 30, used_bytes=0, chunks=[], last=True))
    with fabric.client() as c:
        await async_wait_for(lambda: c.device_chunks(device.id)["quota_bytes"], 20, "the device's storage")
    data = b"one chunk " * 1000
    chunk = hashlib.sha256(data).hexdigest()

    def put() -> dict:
        with fabric.client() as c:
            return c.put_chunk(chunk, data, replicas=1)

    upload = asyncio.ensure_future(asyncio.to_thread(put))
    asked = await device.next_of(first, m.ChunkPut)
    # The device reconnects (its old connection died) before it answered: that answer will never come.
    second = await device.connect()
    again = await device.next_of(second, m.ChunkPut)  # within 20 s, not after the 60 s request timeout
    assert isinstance(asked, m.ChunkPut) and isinstance(again, m.ChunkPut) and again.chunk == asked.chunk == chunk
    await device.send(m.ChunkReply(request=again.request, chunk=chunk, ok=True, free_bytes=1 << 29))
    answer = await asyncio.wait_for(upload, 20)
    assert answer["holders"] == [device.id]
    await asyncio.gather(first.close(), second.close())
