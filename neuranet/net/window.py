"""Sequencing and flow control of one PeerLink, as pure state (no I/O, no clocks).

The sender numbers every frame and keeps it until the receiver says it was
consumed; a path change rewinds the transmit cursor to the oldest unacked frame
(go-back-N), and the receiver accepts only the next expected sequence number, so
moving between direct and relayed paths never loses, duplicates or reorders a
message. Credit is in bytes: the sender never has more than ``window`` bytes
outstanding beyond what the receiver's application has consumed, which bounds
memory on both ends and on the relay.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


class WindowError(Exception):
    """A frame or ack that no correct peer would send."""


@dataclass(slots=True)
class SentFrame:
    seq: int
    off: int  # byte offset of this frame's payload in the link's stream
    size: int
    frame: bytes  # the encoded frame, resent unchanged on any path


class SendWindow:
    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.next_seq = 0
        self.next_off = 0
        self.peer_consumed = 0  # bytes the receiver's application has taken
        self.cursor = 0  # next seq to put on the current path
        self._frames: collections.deque[SentFrame] = collections.deque()

    def credit(self) -> int:
        return self.window - (self.next_off - self.peer_consumed)

    def can_push(self, size: int) -> bool:
        return size <= self.credit()

    def push(self, size: int, frame: bytes) -> SentFrame:
        if not self.can_push(size):
            raise WindowError(f"frame of {size} bytes exceeds the credit of {self.credit()}")
        sent = SentFrame(self.next_seq, self.next_off, size, frame)
        self._frames.append(sent)
        self.next_seq += 1
        self.next_off += size
        return sent

    def next_to_transmit(self) -> SentFrame | None:
        """The frame at the cursor, or None when everything pushed is on the wire."""
        if not self._frames or self.cursor >= self.next_seq:
            return None
        first = self._frames[0].seq
        if self.cursor < first:
            self.cursor = first
        return self._frames[self.cursor - first]

    def advance(self) -> None:
        self.cursor += 1

    def rewind(self) -> None:
        """A new path: retransmit everything not yet acknowledged."""
        self.cursor = self._frames[0].seq if self._frames else self.next_seq

    def on_ack(self, seq: int, consumed: int) -> None:
        if seq >= self.next_seq or consumed > self.next_off:
            raise WindowError(f"ack for seq {seq} / offset {consumed} beyond what was sent ({self.next_seq}, {self.next_off})")
        while self._frames and self._frames[0].seq <= seq:
            self._frames.popleft()
        self.peer_consumed = max(self.peer_consumed, consumed)

    @property
    def unacked(self) -> int:
        return len(self._frames)

    @property
    def unacked_bytes(self) -> int:
        return sum(f.size for f in self._frames)


@dataclass(slots=True)
class Delivered:
    """A whole message put together from its frames."""

    meta: dict[str, Any] | None
    payload: bytes | memoryview  # read-only
    last_seq: int
    end_off: int


@dataclass
class ReceiveWindow:
    window: int
    expected: int = 0
    consumed_seq: int = -1
    consumed_off: int = 0
    acked_off: int = 0
    acked_seq: int = -1
    _parts: list[bytes | memoryview] = field(default_factory=list)
    _meta: dict[str, Any] | None = None
    _buffered: int = 0

    def accept(self, seq: int, off: int, end: bool, meta: dict[str, Any] | None, payload: bytes | memoryview) -> Delivered | None | bool:
        """Take a frame. Returns a Delivered message when one completes, None when
        the frame was taken but the message is incomplete, False when the frame was
        a duplicate or out of order and was dropped."""
        if seq != self.expected:
            return False
        if self._buffered + len(payload) > self.window:
            raise WindowError(f"peer sent past its credit ({self._buffered + len(payload)} > {self.window} bytes)")
        if not self._parts:
            self._meta = meta
        self._parts.append(payload)  # a view into the received frame; joined once below
        self._buffered += len(payload)
        self.expected += 1
        if not end:
            return None
        # One frame: hand out the view into the (immutable) received frame, no copy.
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        return Delivered(self._meta, data, seq, off + len(payload))

    def consume(self, msg: Delivered) -> None:
        """The application took ``msg``: its bytes become credit for the sender."""
        self.consumed_seq = msg.last_seq
        self._buffered -= len(msg.payload)
        self.consumed_off = msg.end_off

    def should_ack(self, inbox_empty: bool) -> bool:
        # Count messages as well as bytes: an empty message frees no credit but the
        # sender still holds its frame (and ``flush`` waits) until it is acked.
        if self.consumed_seq <= self.acked_seq:
            return False
        pending = self.consumed_off - self.acked_off
        return inbox_empty or (pending > 0 and pending >= self.window // 4)

    def ack_is_urgent(self) -> bool:
        """A quarter of the window is waiting to be credited back: ack now, not after a delay."""
        return self.consumed_off - self.acked_off >= self.window // 4

    def ack(self) -> tuple[int, int]:
        self.acked_off = self.consumed_off
        self.acked_seq = self.consumed_seq
        return self.consumed_seq, self.consumed_off
