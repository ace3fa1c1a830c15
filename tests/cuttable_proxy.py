"""A TCP proxy on loopback whose link can be cut like a WAN cable: bytes stop in both directions while
every socket stays open, so neither end hears a reset or a FIN (as behind a NAT when the uplink dies)."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from typing import AsyncIterator


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = False  # while True, whatever either end sends is dropped
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.cut:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.ensure_future(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@asynccontextmanager
async def cuttable_proxy(target_port: int) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(target_port)
    server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield proxy
    finally:
        for writer in proxy._writers:
            writer.close()
        for task in list(proxy._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*proxy._tasks, return_exceptions=True)
