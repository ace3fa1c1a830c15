"""Length-prefixed frames over a TCP transport, received with as few copies as possible.

A ``BufferedProtocol`` lets the kernel write straight into our buffers: small frames are cut out
of a 64 KiB scratch buffer (many per ``recv``), and a large frame is received directly into a
buffer of its own size, so a 1 MiB frame costs one copy from the socket and no re-slicing (a
StreamReader copies it twice more). Reading pauses while frames wait unread, which is the
path's backpressure; writing waits for the transport's high-water mark to clear.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import struct
from typing import Callable

from neuranet.protocol.errors import MalformedFrame, MessageTooLarge

LEN = struct.Struct(">I")
SCRATCH = 64 * 1024
MAX_UNREAD = 8  # frames held before reading from the socket pauses


class FrameProtocol(asyncio.BufferedProtocol):
    def __init__(self, max_frame: int, on_connected: "Callable[[FrameProtocol], None] | None" = None) -> None:
        self.max_frame = max_frame
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(SCRATCH)
        self._start = self._end = 0  # unparsed bytes in the scratch buffer
        self._big: bytearray | None = None  # a large frame being received in place
        self._big_got = 0
        self._frames: collections.deque[bytes | bytearray] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self.error: BaseException | None = None
        self.closed = asyncio.Event()

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_got :]
        if self._end == len(self._scratch):  # compact: move the partial frame to the front
            rest = self._end - self._start
            self._scratch[:rest] = self._scratch[self._start : self._end]
            self._start, self._end = 0, rest
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got == len(self._big):
                self._deliver(self._big)
                self._big = None
            return
        self._end += nbytes
        try:
            self._parse_scratch()
        except MessageTooLarge as exc:
            self._fail(exc)

    def _parse_scratch(self) -> None:
        while self._end - self._start >= LEN.size:
            (size,) = LEN.unpack_from(self._scratch, self._start)
            if size > self.max_frame:
                raise MessageTooLarge(f"direct frame of {size} bytes exceeds {self.max_frame}")
            body = self._start + LEN.size
            have = self._end - body
            if size > SCRATCH - LEN.size:  # too big for scratch: receive the rest in place
                self._big = bytearray(size)
                self._big[:have] = self._scratch[body : self._end]
                self._big_got = have
                self._start = self._end = 0
                if have == size:
                    self._deliver(self._big)
                    self._big = None
                return
            if have < size:
                return
            self._deliver(bytes(self._scratch[body : body + size]))
            self._start = body + size
        if self._start == self._end:
            self._start = self._end = 0

    def _deliver(self, frame: bytes | bytearray) -> None:
        self._frames.append(frame)
        self._readable.set()
        if len(self._frames) >= MAX_UNREAD and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _fail(self, exc: BaseException) -> None:
        self.error = self.error or exc
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.error = self.error or exc or ConnectionResetError("direct path closed")
        self._readable.set()
        self._writable.set()
        self.closed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- coroutine API -------------------------------------------------------------

    async def read_frame(self) -> bytes | bytearray:
        """Next whole frame; raises the connection's error once it is closed and drained."""
        while not self._frames:
            if self.closed.is_set():
                raise self.error if isinstance(self.error, Exception) else ConnectionResetError("closed")
            self._readable.clear()
            await self._readable.wait()
        frame = self._frames.popleft()
        if self._paused and len(self._frames) < MAX_UNREAD // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return frame

    async def start_tls(self, context: ssl.SSLContext, server_side: bool, timeout: float, first: bytes = b"") -> None:
        """Switch this connection to TLS: write ``first`` in the clear (the listener's go-ahead), then
        handshake; frames read and written from then on are encrypted. Bytes already received past
        the plaintext frames were sent before the peer could know we switch, so they refuse the switch."""
        if self.transport is None or self.closed.is_set():
            raise ConnectionResetError("direct path is closed")
        if self._frames or self._end > self._start or self._big is not None:
            raise MalformedFrame("data arrived before the TLS handshake")
        if first:
            # Written synchronously before start_tls pauses reading, so the peer's TLS hello (its answer
            # to these bytes) can only ever reach the TLS protocol.
            self.transport.writelines((LEN.pack(len(first)), first))
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, context, server_side=server_side,  # type: ignore[assignment]
                                              ssl_handshake_timeout=timeout)

    async def write_frame(self, frame: bytes) -> None:
        if self.transport is None or self.closed.is_set() or self.transport.is_closing():
            raise ConnectionResetError("direct path is closed")
        # One write for prefix and frame: with TCP_NODELAY two writes would send the 4-byte prefix as a
        # segment of its own and wake the peer for it (and cost a second system call here).
        self.transport.writelines((LEN.pack(len(frame)), frame))
        if not self._writable.is_set():
            await self._writable.wait()
            if self.closed.is_set():
                raise ConnectionResetError("direct path closed while writing")
