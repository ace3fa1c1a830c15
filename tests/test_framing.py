"""Length-prefixed framing over real loopback TCP: sizes around the scratch buffer, limits, closing."""

from __future__ import annotations

import asyncio
import random

import pytest

from neuranet.net.framing import LEN, MAX_UNREAD, SCRATCH, FrameProtocol
from neuranet.protocol.errors import MessageTooLarge

MAX = 4 << 20


async def pair(max_frame: int = MAX) -> tuple[FrameProtocol, FrameProtocol, asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[FrameProtocol] = loop.create_future()
    server = await loop.create_server(lambda: FrameProtocol(max_frame, on_connected=accepted.set_result),
                                      "127.0.0.1", 0)
    _, client = await loop.create_connection(lambda: FrameProtocol(max_frame), "127.0.0.1",
                                             server.sockets[0].getsockname()[1])
    return client, await asyncio.wait_for(accepted, 5), server


@pytest.mark.parametrize("sizes", [
    [0, 1, 5, 100],
    [SCRATCH - LEN.size, SCRATCH - LEN.size + 1, SCRATCH, SCRATCH + 1],  # around the in-place threshold
    [3000] * 200,  # many small frames per recv, with frames split across scratch compaction
    [1 << 20, 7, 3 << 20, 12],
])
async def test_frames_arrive_whole_and_in_order(sizes: list[int]) -> None:
    client, server_side, server = await pair()
    rng = random.Random(len(sizes))
    frames = [rng.randbytes(n) for n in sizes]

    async def send() -> None:
        for f in frames:
            await client.write_frame(f)

    sender = asyncio.create_task(send())
    got = [bytes(await asyncio.wait_for(server_side.read_frame(), 10)) for _ in frames]
    await sender
    assert got == frames
    client.transport.close()
    server.close()


async def test_oversized_frame_closes_the_connection_with_a_typed_error() -> None:
    client, server_side, server = await pair(max_frame=1000)
    client.transport.write(LEN.pack(1001) + b"x" * 1001)
    with pytest.raises(MessageTooLarge):
        await asyncio.wait_for(server_side.read_frame(), 5)
    server.close()


async def test_reading_pauses_while_frames_wait_unread_and_resumes() -> None:
    client, server_side, server = await pair()
    count = MAX_UNREAD * 4
    for i in range(count):
        await client.write_frame(bytes([i]) * 100)
    for _ in range(200):  # bounded: until the receiver has queued enough to pause
        if len(server_side._frames) >= MAX_UNREAD:
            break
        await asyncio.sleep(0.01)
    assert not server_side.transport.is_reading()  # nobody reads: the socket is left alone
    got = [await asyncio.wait_for(server_side.read_frame(), 5) for _ in range(count)]
    assert [g[0] for g in got] == list(range(count))
    assert server_side.transport.is_reading()
    server.close()


async def test_read_after_close_raises_once_drained() -> None:
    client, server_side, server = await pair()
    await client.write_frame(b"last words")
    client.transport.close()
    assert bytes(await asyncio.wait_for(server_side.read_frame(), 5)) == b"last words"
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(server_side.read_frame(), 5)
    with pytest.raises(ConnectionError):
        await client.write_frame(b"too late")
    server.close()
