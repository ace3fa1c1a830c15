"""Payloads sent in parts: one splitter and one reassembler for all of them.

A payload too big for one message (a stage's state, a served stage's weights, a request's batch)
travels as parts ``0 .. parts - 1``, each naming its index and the count. ``split`` cuts bytes;
``Reassembler`` puts parts back together per key (a run, a request), pure and bounded:

- parts arrive in order: a part other than the next one expected is refused;
- the count stays what the first part (or ``expect``) announced: a changed count is refused;
- at most ``max_parts`` parts and ``max_bytes`` bytes per payload, ``max_pending`` payloads at once.

A refusal raises ``PartsRefused`` (an InvalidMessage: it fails that payload, not the connection)
saying what was wrong, and forgets what had arrived for that key, so nothing half-joined is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from neuranet.protocol.errors import InvalidMessage

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class PartsRefused(InvalidMessage):
    """A part that does not fit the payload it belongs to (out of order, count changed, over a limit)."""


def split(blob: bytes | bytearray | memoryview, size: int) -> list[bytes]:
    """``blob`` cut into parts of at most ``size`` bytes; at least one (an empty payload is one empty part)."""
    if size < 1:
        raise ValueError(f"a part must hold at least one byte, not {size}")
    view = memoryview(blob).cast("B")
    return [bytes(view[i : i + size]) for i in range(0, len(view), size)] or [b""]


def join_bytes(pieces: Sequence[bytes]) -> bytes:
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


@dataclass
class _Partial(Generic[T]):
    parts: int
    pieces: list[T] = field(default_factory=list)
    size: int = 0


class Reassembler(Generic[K, T, R]):
    """Joins each key's parts with ``join`` once the last is in (see the module's docstring).

    ``size(piece)`` measures a part against ``max_bytes`` (``len`` by default). ``what`` names the
    payloads in errors ("stage state", "request").
    """

    def __init__(self, join: Callable[[list[T]], R], *, max_parts: int, max_bytes: int, max_pending: int = 64,
                 size: Callable[[T], int] = len,  # type: ignore[assignment]
                 what: str = "payload") -> None:
        if min(max_parts, max_bytes, max_pending) < 1:
            raise ValueError("max_parts, max_bytes and max_pending must be at least 1")
        self._join = join
        self.max_parts = max_parts
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self._size = size
        self.what = what
        self._partial: dict[K, _Partial[T]] = {}

    def expect(self, key: K, parts: int) -> None:
        """Announce ``key``'s count ahead of its parts (say, from an assignment): a part naming another
        count is then refused. Forgets anything that had arrived for ``key``."""
        self._check_count(key, parts)
        self._partial.pop(key, None)
        self._room_for(key)
        self._partial[key] = _Partial(parts)

    def add(self, key: K, part: int, parts: int, piece: T) -> R | None:
        """Part ``part`` of ``parts`` of ``key``'s payload: the joined payload once it was the last, else
        None. Raises PartsRefused (and forgets ``key``) when the part does not fit."""
        partial = self._partial.get(key)
        try:
            if partial is None:
                self._check_count(key, parts)
                if part != 0:
                    raise PartsRefused(f"{self.what} {key}: part {part} of {parts} arrived before part 0")
                self._room_for(key)
                partial = self._partial[key] = _Partial(parts)
            if parts != partial.parts:
                raise PartsRefused(f"{self.what} {key}: part {part} says {parts} parts, "
                                   f"but {partial.parts} were announced")
            if part != len(partial.pieces):
                raise PartsRefused(f"{self.what} {key}: part {part} of {parts} arrived after "
                                   f"{len(partial.pieces)} parts (expected part {len(partial.pieces)})")
            partial.size += self._size(piece)
            if partial.size > self.max_bytes:
                raise PartsRefused(f"{self.what} {key}: {partial.size} bytes after part {part}, "
                                   f"over the limit of {self.max_bytes}")
        except PartsRefused:
            self._partial.pop(key, None)
            raise
        partial.pieces.append(piece)
        if len(partial.pieces) < partial.parts:
            return None
        del self._partial[key]
        return self._join(partial.pieces)

    def drop(self, key: K) -> None:
        """Forget what arrived for ``key`` (its request failed or ended)."""
        self._partial.pop(key, None)

    def clear(self) -> None:
        self._partial.clear()

    def __len__(self) -> int:
        """Payloads begun and not yet complete."""
        return len(self._partial)

    def __contains__(self, key: object) -> bool:
        return key in self._partial

    def _check_count(self, key: K, parts: int) -> None:
        if not 1 <= parts <= self.max_parts:
            raise PartsRefused(f"{self.what} {key}: {parts} parts announced; "
                               f"between 1 and {self.max_parts} are accepted")

    def _room_for(self, key: K) -> None:
        if len(self._partial) >= self.max_pending:
            raise PartsRefused(f"{self.what} {key}: {len(self._partial)} payloads are already being received; "
                               f"the limit is {self.max_pending}")
