"""Requests matched to their answers by id: one correlator for every "send, then wait for the reply".

``new()`` gives a fresh id and the future its answer resolves; the receiving side calls
``resolve(id, value)`` or ``fail(id, exc)``; when the way to the other side goes, ``fail_all(exc)``
(optionally only the requests whose tag matches, say those sent on one connection) ends every wait
at once rather than letting each run out its timeout. The caller bounds the wait
(``asyncio.wait_for(future, timeout)``) and forgets the id when done (``discard``, or the
``pending()`` context manager, which does both ends). At most ``limit`` requests wait at once.

Answers for unknown ids (a request that timed out, or was never made, or an id that is no int at
all) are ignored: ``resolve`` returns False, so a late or forged reply changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from neuranet.errors import Unavailable

T = TypeVar("T")


class TooManyPending(Unavailable):
    """``new`` on a correlator already waiting for its ``limit`` of answers."""


class Correlator(Generic[T]):
    """Futures of requests in flight, by id (ints from 1); see the module's docstring."""

    def __init__(self, name: str = "requests", *, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.name = name
        self.limit = limit
        self._pending: dict[int, tuple[asyncio.Future[T], Any]] = {}
        self._last = 0

    def next_id(self) -> int:
        """A fresh id, for a caller that must name it in the request before ``new(id=...)``."""
        self._last += 1
        return self._last

    def new(self, tag: Any = None, *, id: int | None = None) -> tuple[int, asyncio.Future[T]]:
        """Start waiting for an answer: its id (fresh unless given) and the future it will resolve.
        ``tag`` (say, the connection the request goes out on) is what ``fail_all(where=...)`` sees."""
        if self.limit is not None and len(self._pending) >= self.limit:
            raise TooManyPending(f"{self.name}: {len(self._pending)} requests already wait for answers; "
                                 f"the limit is {self.limit}")
        if id is None:
            id = self.next_id()
        elif id in self._pending:
            raise ValueError(f"{self.name}: request {id} is already waiting for its answer")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[id] = (future, tag)
        return id, future

    @contextlib.contextmanager
    def pending(self, tag: Any = None, *, id: int | None = None) -> Iterator[tuple[int, asyncio.Future[T]]]:
        """``with c.pending() as (id, answer):`` — ``new``, and ``discard`` when the block ends."""
        id, future = self.new(tag, id=id)
        try:
            yield id, future
        finally:
            self.discard(id)

    def resolve(self, id: object, value: T) -> bool:
        """Answer request ``id``; False (and nothing happens) when no such request waits."""
        entry = self._entry(id)
        if entry is None or entry[0].done():
            return False
        entry[0].set_result(value)
        return True

    def fail(self, id: object, exc: BaseException) -> bool:
        """Fail request ``id`` with ``exc``; False when no such request waits."""
        entry = self._entry(id)
        if entry is None or entry[0].done():
            return False
        entry[0].set_exception(exc)
        return True

    def fail_all(self, exc: BaseException | Callable[[], BaseException],
                 where: Callable[[Any], bool] | None = None) -> int:
        """Fail every request waiting (only those whose tag ``where`` accepts, if given) with ``exc``
        (an exception, or a function making one per request); how many were failed."""
        failed = 0
        for future, tag in list(self._pending.values()):
            if future.done() or (where is not None and not where(tag)):
                continue
            future.set_exception(exc() if callable(exc) and not isinstance(exc, BaseException) else exc)
            failed += 1
        return failed

    def waiting(self, id: object) -> bool:
        """True while request ``id`` is pending and not yet answered (nor failed)."""
        entry = self._entry(id)
        return entry is not None and not entry[0].done()

    def tag(self, id: object) -> Any:
        """The tag request ``id`` was made with (None when no such request waits)."""
        entry = self._entry(id)
        return None if entry is None else entry[1]

    def discard(self, id: object) -> None:
        """Stop waiting for request ``id`` (its caller is done with it); a later answer is ignored."""
        if type(id) is int:
            self._pending.pop(id, None)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, id: object) -> bool:
        return self._entry(id) is not None

    def _entry(self, id: object) -> tuple[asyncio.Future[T], Any] | None:
        """The request ``id`` names; None for anything else (an id off the wire may be any JSON value)."""
        return self._pending.get(id) if type(id) is int else None
