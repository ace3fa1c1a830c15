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
                        enrol=m.Enrolment(join_token=join_token, public_key=pub, name=f"hand-{pub[:4].hex()}") if join_token else None)
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
    device, first = await offering_storage(fabric)
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


async def answer_ok(device: Device, ws: ClientConnection) -> None:
    """Play a holder that keeps (and copies on) every chunk it is asked to."""
    while True:
        msg = m.parse(decode_frame(await ws.recv()))
        if isinstance(msg, (m.ChunkPut, m.ChunkCopy)):
            await ws.send(encode_frame(m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=True, free_bytes=1 << 29)
                                       .envelope(src=device.id, dst="server")))


async def offering_storage(fabric: LocalFabric) -> tuple[Device, ClientConnection]:
    """A newly enrolled device that offers 1 GiB, once the coordinator has recorded the offer."""
    with fabric.client() as c:
        jt = c.create_join_token()["join_token"]
    device = Device(fabric)
    ws = await device.connect(jt)
    await device.send(m.ChunkInventory(quota_bytes=1 << 30, used_bytes=0, chunks=[], last=True))
    with fabric.client() as c:
        await async_wait_for(lambda: c.device_chunks(device.id)["quota_bytes"], 20, "the device's storage")
    return device, ws


async def storage_device(fabric: LocalFabric) -> tuple[Device, asyncio.Task[None]]:
    device, ws = await offering_storage(fabric)
    return device, asyncio.ensure_future(answer_ok(device, ws))


async def test_a_chunk_goes_to_a_device_that_offered_storage_just_now(tmp_path: Path) -> None:
    """The coordinator's view of who offers storage is cached; a chunk that comes short of its replicas
    looks again before it is acknowledged with fewer (a device that just reported, as after a restart)."""
    with LocalFabric(tmp_path) as fabric:  # its own user: no other test's devices
        await asyncio.to_thread(fabric.start_server, 30.0, free_port())

        def put(data: bytes) -> dict:
            with fabric.client() as c:
                return c.put_chunk(hashlib.sha256(data).hexdigest(), data, replicas=2)

        first, serving_first = await storage_device(fabric)
        assert (await asyncio.to_thread(put, b"first" * 100))["holders"] == [first.id]  # the only one yet
        second, serving_second = await storage_device(fabric)
        answer = await asyncio.wait_for(asyncio.to_thread(put, b"second" * 100), 30)
        assert sorted(answer["holders"]) == sorted([first.id, second.id]) and answer["replicas"] == 2
        for task in (serving_first, serving_second):
            task.cancel()
        await asyncio.gather(serving_first, serving_second, return_exceptions=True)
