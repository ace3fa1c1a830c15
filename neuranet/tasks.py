"""Task ownership for server, agent and net: every background task has an owner that awaits it and sees its failure.

Two shapes, after trio's nurseries:

- ``task_scope(name)``: an ``async with`` scope built on ``asyncio.TaskGroup``, for work whose lifetime is
  a block (a connection's tasks, the app lifespan's background loops). The scope does not end until every
  task in it has; a task that fails is logged with its traceback, cancels its siblings and the error
  propagates out of the block (an ``ExceptionGroup``), exactly as ``TaskGroup`` does.
- ``OwnedTasks``: an owner for long-lived components that start work on the side
  (``spawn(coro, name=..., on_error=...)``). A task that fails (not one that is cancelled) is logged with
  its traceback under its name and ``on_error(exc)`` is called once, so the work it belonged to records
  the failure — e.g. ``tasks.spawn(recover(run), name=f"recover-{run.id}", on_error=lambda exc:
  run.fail(f"recovery failed: {exc}"))``. ``close()`` cancels and awaits every task, so none outlives its
  owner, and no exception is ever left unretrieved. An optional ``limit`` bounds how many run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
OnError = Callable[[BaseException], object]


class TooManyTasks(RuntimeError):
    """``spawn`` on an owner already running its ``limit`` of tasks."""


class OwnerClosed(RuntimeError):
    """``spawn`` on an owner whose ``close()`` has begun."""


def _report(owner: str, task: asyncio.Task[Any], on_error: OnError | None,
            expected: tuple[type[BaseException], ...] = ()) -> None:
    """Log a failed task with its traceback and tell its ``on_error``; a cancelled task is no failure.
    A failure of an ``expected`` type is logged at INFO in one line, without the traceback."""
    if task.cancelled():
        return
    exc = task.exception()  # retrieved here, so asyncio never warns "exception was never retrieved"
    if exc is None:
        return
    if isinstance(exc, expected):
        log.info("%s: task %s ended: %s", owner, task.get_name(), exc or type(exc).__name__)
    else:
        log.error("%s: task %s failed", owner, task.get_name(), exc_info=exc)
    if on_error is not None:
        try:
            on_error(exc)
        except Exception:  # the reporter must not fail in a done callback, where nobody would see it
            log.exception("%s: on_error of task %s failed", owner, task.get_name())


class OwnedTasks:
    """Tasks that belong to one owner: each failure is logged and reported, none outlives ``close()``.

    ``name`` prefixes the log lines. ``limit`` (optional) bounds the tasks running at once: ``spawn``
    raises ``TooManyTasks`` past it; check ``full`` first to refuse work cleanly instead. Failures of
    an ``expected`` type (say, "not connected" for an agent's sends) are logged at INFO without the
    traceback; they still reach ``on_error``. Iterating gives a snapshot of the tasks running now.
    """

    def __init__(self, name: str = "tasks", *, limit: int | None = None,
                 expected: tuple[type[BaseException], ...] = ()) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.name = name
        self.limit = limit
        self.expected = expected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None,
              on_error: OnError | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this owner.

        If it fails (raises anything but ``CancelledError``), the failure is logged with its traceback
        under ``name`` and ``on_error(exc)`` is called once, from the event loop, so the caller can mark
        the work it belonged to as failed with the reason. The returned task may be awaited or
        cancelled as usual.
        """
        if self._closed:
            coro.close()
            raise OwnerClosed(f"{self.name} is closed: cannot start {name or 'a task'}")
        if self.full:
            coro.close()
            raise TooManyTasks(f"{self.name} already runs {self.limit} tasks")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            _report(self.name, t, on_error, self.expected)

        task.add_done_callback(done)
        return task

    @property
    def full(self) -> bool:
        """True when a ``limit`` is set and that many tasks run now."""
        return self.limit is not None and len(self._tasks) >= self.limit

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        """The tasks running now (a snapshot: spawning or ending meanwhile does not disturb it)."""
        return iter(list(self._tasks))

    def cancel(self) -> None:
        """Cancel every task now, without waiting (except the calling task, if it is one of them)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        """Refuse new tasks, cancel every running one and wait until all have ended; idempotent.

        Called from one of its own tasks, it waits for all the others."""
        self._closed = True
        current = asyncio.current_task()
        while others := [t for t in self._tasks if t is not current]:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    async def join(self) -> None:
        """Wait until every task has ended, without cancelling any (new ones spawned meanwhile too)."""
        current = asyncio.current_task()
        while others := [t for t in self._tasks if t is not current]:
            await asyncio.gather(*others, return_exceptions=True)


class TaskScope:
    """The tasks of one ``task_scope`` block; see ``task_scope``."""

    def __init__(self, name: str, group: asyncio.TaskGroup) -> None:
        self.name = name
        self._group = group

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None,
              on_error: OnError | None = None) -> asyncio.Task[T]:
        """Start ``coro`` in the scope. A failure is logged, passed to ``on_error``, cancels the scope's
        other tasks and propagates out of the ``async with`` (``TaskGroup`` semantics)."""
        task = self._group.create_task(coro, name=name)
        task.add_done_callback(lambda t: _report(self.name, t, on_error))
        return task


@contextlib.asynccontextmanager
async def task_scope(name: str = "scope") -> AsyncIterator[TaskScope]:
    """``async with task_scope("conn") as scope: scope.spawn(...)`` — the block ends only when every task
    spawned in it has; leaving the block by an error (or a failed task) cancels the rest."""
    async with asyncio.TaskGroup() as group:
        yield TaskScope(name, group)
