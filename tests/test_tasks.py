"""neuranet.tasks: owned background tasks log and report failures, never outlive their owner; scopes follow TaskGroup."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from neuranet.tasks import OwnedTasks, OwnerClosed, TooManyTasks, task_scope


def run(coro):
    return asyncio.run(coro)


class Boom(Exception):
    pass


async def fail(msg: str = "boom") -> None:
    raise Boom(msg)


async def block_until(event: asyncio.Event) -> None:
    await event.wait()


async def settle() -> None:
    """Let done callbacks (scheduled with call_soon) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_failure_is_logged_with_traceback_and_name(caplog):
    async def main():
        tasks = OwnedTasks("files")
        task = tasks.spawn(fail("disk gone"), name="reconcile-dev1")
        await asyncio.gather(task, return_exceptions=True)
        await settle()
        await tasks.close()

    with caplog.at_level(logging.ERROR, logger="neuranet.tasks"):
        run(main())
    [record] = [r for r in caplog.records if r.name == "neuranet.tasks"]
    assert "files" in record.getMessage() and "reconcile-dev1" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], Boom)
    assert "disk gone" in caplog.text and "Traceback" in caplog.text


def test_on_error_called_once_with_the_exception():
    seen: list[BaseException] = []

    async def main():
        tasks = OwnedTasks()
        tasks.spawn(fail("why"), name="t", on_error=seen.append)
        await settle()
        await tasks.close()
        await tasks.close()

    run(main())
    assert len(seen) == 1 and isinstance(seen[0], Boom) and str(seen[0]) == "why"


def test_success_and_cancel_do_not_call_on_error(caplog):
    seen: list[BaseException] = []

    async def main():
        tasks = OwnedTasks()
        gate = asyncio.Event()
        ok = tasks.spawn(asyncio.sleep(0, result=7), name="ok", on_error=seen.append)
        tasks.spawn(block_until(gate), name="blocked", on_error=seen.append)
        assert await ok == 7
        await tasks.close()

    with caplog.at_level(logging.ERROR, logger="neuranet.tasks"):
        run(main())
    assert seen == [] and not caplog.records


def test_on_error_that_raises_is_logged_not_lost(caplog):
    def bad(exc: BaseException) -> None:
        raise RuntimeError("reporter broke")

    async def main():
        tasks = OwnedTasks("o")
        tasks.spawn(fail(), name="t", on_error=bad)
        await settle()
        await tasks.close()

    with caplog.at_level(logging.ERROR, logger="neuranet.tasks"):
        run(main())
    assert "on_error of task t failed" in caplog.text and "reporter broke" in caplog.text


def test_close_cancels_and_awaits_all_and_is_idempotent():
    async def main():
        tasks = OwnedTasks()
        gate = asyncio.Event()
        cancelled = []

        async def worker(i):
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise

        spawned = [tasks.spawn(worker(i), name=f"w{i}") for i in range(3)]
        await asyncio.sleep(0)
        assert len(tasks) == 3
        await tasks.close()
        assert all(t.done() for t in spawned) and sorted(cancelled) == [0, 1, 2]
        assert len(tasks) == 0 and tasks.closed
        await tasks.close()  # a second close is a no-op
        with pytest.raises(OwnerClosed):
            tasks.spawn(asyncio.sleep(0), name="late")

    run(main())


def test_close_waits_for_a_task_that_cleans_up_after_cancel():
    async def main():
        tasks = OwnedTasks()
        cleaned = asyncio.Event()
        started = asyncio.Event()

        async def worker():
            try:
                started.set()
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0)  # cleanup that itself awaits
                cleaned.set()

        tasks.spawn(worker(), name="w")
        await started.wait()
        await tasks.close()
        assert cleaned.is_set()

    run(main())


def test_close_from_one_of_its_own_tasks_waits_for_the_others():
    async def main():
        tasks = OwnedTasks()
        gate = asyncio.Event()
        other = tasks.spawn(block_until(gate), name="other")
        closer = tasks.spawn(tasks.close(), name="closer")
        await closer
        assert other.cancelled()

    run(main())


def test_cancel_without_waiting_spares_the_caller():
    async def main():
        tasks = OwnedTasks()
        gate = asyncio.Event()
        other = tasks.spawn(block_until(gate), name="other")

        async def shut():
            tasks.cancel()
            await asyncio.sleep(0)
            return "survived"

        me = tasks.spawn(shut(), name="me")
        assert await me == "survived"
        await asyncio.gather(other, return_exceptions=True)
        assert other.cancelled()

    run(main())


def test_no_unretrieved_exception_warning():
    contexts: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: contexts.append(ctx))
        tasks = OwnedTasks()
        tasks.spawn(fail(), name="t")
        await settle()
        await tasks.close()
        gc.collect()

    run(main())
    gc.collect()
    assert not [c for c in contexts if "never retrieved" in c.get("message", "")]


def test_bound_is_respected_and_frees_a_slot_when_a_task_ends():
    async def main():
        tasks = OwnedTasks("handshakes", limit=2)
        gates = [asyncio.Event() for _ in range(2)]
        first = tasks.spawn(block_until(gates[0]), name="a")
        tasks.spawn(block_until(gates[1]), name="b")
        assert tasks.full
        with pytest.raises(TooManyTasks):
            tasks.spawn(asyncio.sleep(0), name="c")
        gates[0].set()
        await first
        await settle()
        assert not tasks.full and len(tasks) == 1
        tasks.spawn(asyncio.sleep(0), name="c")
        await tasks.close()

    run(main())


def test_refused_spawn_closes_the_coroutine():
    async def main():
        tasks = OwnedTasks(limit=1)
        gate = asyncio.Event()
        tasks.spawn(block_until(gate), name="a")
        coro = asyncio.sleep(0)
        with pytest.raises(TooManyTasks):
            tasks.spawn(coro)
        assert coro.cr_frame is None  # closed: no "coroutine was never awaited" warning
        await tasks.close()

    run(main())


def test_bad_limit_is_refused():
    with pytest.raises(ValueError):
        OwnedTasks(limit=0)


def test_join_waits_without_cancelling():
    async def main():
        tasks = OwnedTasks()
        gate = asyncio.Event()
        t = tasks.spawn(block_until(gate), name="w")
        joiner = asyncio.ensure_future(tasks.join())
        await asyncio.sleep(0)
        assert not joiner.done()
        gate.set()
        await joiner
        assert t.done() and not t.cancelled()

    run(main())


def test_scope_waits_for_all_tasks():
    async def main():
        done = []
        async with task_scope("s") as scope:
            scope.spawn(asyncio.sleep(0, result=1), name="a").add_done_callback(lambda t: done.append(t.result()))
            scope.spawn(asyncio.sleep(0, result=2), name="b").add_done_callback(lambda t: done.append(t.result()))
        assert sorted(done) == [1, 2]

    run(main())


def test_scope_failure_is_logged_reported_cancels_siblings_and_propagates(caplog):
    seen: list[BaseException] = []

    async def main():
        gate = asyncio.Event()
        sibling = None
        with pytest.raises(ExceptionGroup) as info:
            async with task_scope("conn-7") as scope:
                sibling = scope.spawn(block_until(gate), name="pump")
                scope.spawn(fail("lost"), name="reader", on_error=seen.append)
        assert info.group_contains(Boom)
        assert sibling is not None and sibling.cancelled()

    with caplog.at_level(logging.ERROR, logger="neuranet.tasks"):
        run(main())
    assert len(seen) == 1 and str(seen[0]) == "lost"
    assert "conn-7: task reader failed" in caplog.text and "Traceback" in caplog.text


def test_scope_body_error_cancels_its_tasks():
    async def main():
        gate = asyncio.Event()
        task = None
        with pytest.raises(ExceptionGroup) as info:  # TaskGroup wraps the body's error too
            async with task_scope() as scope:
                task = scope.spawn(block_until(gate), name="w")
                await asyncio.sleep(0)
                raise Boom("body")
        assert info.group_contains(Boom)
        assert task is not None and task.cancelled()

    run(main())


def test_scope_cancelled_from_outside_cancels_its_tasks():
    async def main():
        inner: list[asyncio.Task] = []
        started = asyncio.Event()

        async def owner():
            async with task_scope() as scope:
                inner.append(scope.spawn(asyncio.Event().wait(), name="w"))
                started.set()

        outer = asyncio.ensure_future(owner())
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert inner[0].cancelled()

    run(main())


def test_an_expected_failure_is_one_info_line_and_still_reported(caplog):
    caplog.set_level(logging.INFO)
    seen: list[BaseException] = []

    async def main():
        tasks = OwnedTasks("agent", expected=(Boom,))
        task = tasks.spawn(fail("offline"), name="send", on_error=seen.append)
        await asyncio.gather(task, return_exceptions=True)
        await settle()

    run(main())
    [record] = [r for r in caplog.records if "offline" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert [str(e) for e in seen] == ["offline"]
