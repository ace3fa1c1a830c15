"""A background task that fails in the agent or net layer is logged with its traceback, under its owner's
and its own name, never lost (nor left as "exception was never retrieved"); tasks.OwnedTasks owns them all."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from neuranet.net.peerlink import PeerLink, RelayUnavailable
from neuranet.tasks import OwnedTasks


class Broken(Exception):
    pass


async def broken(message: str) -> None:
    raise Broken(message)


def agent_config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(server_url="http://127.0.0.1:1", data_dir=tmp_path / "agent", join_token="jt", measure=False,
                       listen_host="127.0.0.1", storage_bytes=1 << 30)


def failure_records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    """Records that carry the failure ``message`` as their exception (so the traceback is logged)."""
    return [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == message]


async def settle(tasks: OwnedTasks) -> None:
    """Wait until every task of ``tasks`` has ended and its done callbacks have run."""
    await tasks.join()
    await asyncio.sleep(0)


async def test_a_failing_agent_task_is_logged_with_its_traceback(tmp_path: Path, caplog) -> None:
    agent = Agent(agent_config(tmp_path))
    agent.spawn(broken("handler broke"), name="on-something")
    await settle(agent._tasks)
    [record] = failure_records(caplog, "handler broke")
    assert record.levelno == logging.ERROR and "on-something" in record.getMessage()
    assert record.exc_info and record.exc_info[2] is not None  # the traceback, not just the message
    assert "broken" in caplog.text  # the frame that raised is in the logged traceback
    assert not list(agent._tasks)


async def test_a_send_for_a_lost_connection_is_one_info_line_not_a_failure(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    agent = Agent(agent_config(tmp_path))

    async def send() -> None:
        raise RelayUnavailable("not connected")

    agent.spawn(send(), name="heartbeat-ack")
    await settle(agent._tasks)
    [record] = [r for r in caplog.records if "not connected" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None


async def test_a_failing_link_manager_task_is_logged_with_its_traceback(tmp_path: Path, caplog) -> None:
    agent = Agent(agent_config(tmp_path))
    agent.links._spawn(broken("dial broke"), name="dial-x")
    await settle(agent.links._tasks)
    [record] = failure_records(caplog, "dial broke")
    assert record.levelno == logging.ERROR and "dial-x" in record.getMessage()


async def test_a_failing_peerlink_task_is_logged_and_ends_the_link_with_its_error(tmp_path: Path, caplog) -> None:
    agent = Agent(agent_config(tmp_path))
    link = PeerLink(agent.links, "link-1", "peer", "default", initiator=True)
    link._spawn(broken("pump broke"), "pump-link-1")
    await settle(link._tasks)
    [record] = failure_records(caplog, "pump broke")
    assert "link link-1" in record.getMessage() and "pump-link-1" in record.getMessage()
    assert link.closed and isinstance(link.error, Broken)  # send/recv now raise why, rather than hang
    with pytest.raises(Broken, match="pump broke"):
        await link.recv()


async def test_a_failing_chunk_request_server_ends_its_scope_logged(tmp_path: Path, caplog) -> None:
    """`serve_link`'s requests run in a task_scope: one that fails is logged and ends the scope."""
    from neuranet.agent.chunk_store import ChunkStore
    from neuranet.agent.file_worker import FileWorker
    from neuranet.net.peerlink import LinkMessage

    class OneRequest:
        peer = "peer"

        def __init__(self) -> None:
            self.sent = False

        async def recv(self) -> LinkMessage:
            if self.sent:
                await asyncio.Event().wait()  # no more requests; the scope's failure cancels this
            self.sent = True
            return LinkMessage({"op": "get", "chunk": "c", "rid": 1}, b"")

    agent = Agent(agent_config(tmp_path))
    worker = FileWorker(agent, ChunkStore(tmp_path / "chunks", 1 << 20))

    async def serve_one(link: object, msg: object, slots: asyncio.Semaphore) -> None:
        raise Broken("serving broke")

    worker._serve_one = serve_one  # type: ignore[method-assign]
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(worker.serve_link(OneRequest()), 30)  # type: ignore[arg-type]
    assert raised.group_contains(Broken)
    [record] = failure_records(caplog, "serving broke")
    assert "chunks from peer" in record.getMessage()


async def test_owned_tasks_can_be_listed_live(caplog) -> None:
    tasks = OwnedTasks("t")
    release = asyncio.Event()
    task = tasks.spawn(release.wait(), name="waiting")
    assert list(tasks) == [task] and task in tasks and len(tasks) == 1
    release.set()
    await settle(tasks)
    assert list(tasks) == [] and not tasks
