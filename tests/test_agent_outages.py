"""The agent across lost connections: questions asked on a dead connection are asked again at once on
the next one, and reports made while disconnected are delivered when it is back.

The coordinator is scripted (`scripted_coordinator`) so that it drops the connection at the exact
moment under test; the agent is the real one, with its real local socket and chunk store.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cuttable_proxy import cuttable_proxy
from fabric_helpers import async_wait_for
from neuranet.agent import file_worker, stage_worker
from neuranet.agent.chunk_store import ChunkStore
from neuranet.net.local_api import LocalAgent
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from neuranet.protocol import messages as m
from scripted_coordinator import DEVICE, GatedClock, Session, SteppedClock, scripted_coordinator

JOIN_TOKEN = "jt-not-checked-by-this-server"


def agent_config(tmp_path: Path, url: str) -> AgentConfig:
    return AgentConfig(server_url=url, data_dir=tmp_path / "agent", join_token=JOIN_TOKEN, measure=False,
                       listen_host="127.0.0.1", storage_bytes=1 << 30)


async def test_an_upload_question_pending_when_the_connection_drops_is_asked_again_at_once(tmp_path: Path) -> None:
    asked: list[tuple[int, m.ChunkPlace]] = []

    async def drop_the_first_question(session: Session) -> None:
        place = await session.next_of(m.ChunkPlace)
        assert isinstance(place, m.ChunkPlace)
        asked.append((session.number, place))
        if session.number == 1:
            return  # the connection goes, the question unanswered
        await session.send(m.ChunkPlaced(request=place.request, chunk=place.chunk, holders=[DEVICE]))
        await session.ws.wait_closed()

    data = b"chunk bytes " * 1000
    chunk = hashlib.sha256(data).hexdigest()
    async with scripted_coordinator(drop_the_first_question) as url:
        agent = Agent(agent_config(tmp_path, url), clock=SteppedClock())
        file_worker.install(agent, ChunkStore(tmp_path / "agent" / "chunks", 1 << 30))
        async with agent:
            await agent.wait_connected()
            local = LocalAgent(tmp_path / "agent", timeout=60)
            # Far below the 60 s a question waits for its answer on a live connection.
            answer, _ = await asyncio.wait_for(
                asyncio.to_thread(local.request, {"op": "put", "chunk": chunk, "replicas": 1}, data), 20)
    assert answer["holders"] == [DEVICE]
    assert [number for number, _ in asked] == [1, 2]
    assert asked[0][1].chunk == asked[1][1].chunk == chunk and asked[0][1].request != asked[1][1].request


async def test_the_agent_notices_a_server_gone_silent_within_offline_after(tmp_path: Path) -> None:
    async def answer_heartbeats(session: Session) -> None:
        await session.next_of(m.ChunkPlace)  # never comes: answers heartbeats until the agent is gone

    offline_after = 2.0
    async with scripted_coordinator(answer_heartbeats, heartbeat=0.5, offline_after=offline_after) as url, \
            cuttable_proxy(int(url.rsplit(":", 1)[1])) as proxy:
        agent = Agent(agent_config(tmp_path, f"http://127.0.0.1:{proxy.port}"), clock=GatedClock())
        lost = asyncio.Event()
        agent.on_disconnected(lost.set)
        async with agent:
            await agent.wait_connected()
            cut_at = time.monotonic()
            proxy.cut = True  # the WAN link dies: no reset, no FIN, nothing
            await asyncio.wait_for(lost.wait(), 60)
            noticed = time.monotonic() - cut_at
    # At most a heartbeat interval to the next probe, offline_after for its answer, and no wait for a
    # close handshake the server will never answer (that wait alone was 10 s).
    assert noticed < offline_after + 0.5 + 3.0, noticed


async def test_a_stage_failure_while_disconnected_is_reported_when_the_agent_is_back(tmp_path: Path) -> None:
    reports: list[tuple[int, m.Message]] = []

    async def drop_then_listen(session: Session) -> None:
        if session.number == 1:
            return  # dropped: the agent waits (gated) before it dials again
        reports.append((session.number, await session.next_of(m.StageDone)))

    clock = GatedClock()
    async with scripted_coordinator(drop_then_listen) as url:
        agent = Agent(agent_config(tmp_path, url), clock=clock)
        stage_worker.install(agent)
        async with agent:
            await agent.wait_connected()
            await asyncio.wait_for(clock.waiting.wait(), 30)  # disconnected, waiting to redial
            assert not agent.connected.is_set()
            assign = m.StageAssign(run_id="r1", stage=0, num_stages=1, attempt=0, model="no-such-model", seed=0,
                                   start=0, stop=1, steps=1, batch_size=1)
            await stage_worker.run_stage(agent, assign)  # fails (no such model) while disconnected
            clock.gate.set()
            await async_wait_for(lambda: reports, 30, "the stage's report")
    (number, done), = reports
    assert number == 2 and isinstance(done, m.StageDone)
    assert done.run_id == "r1" and not done.ok and "no-such-model" in done.error


async def _unretrieved_after(spawn: Callable[[Awaitable[None]], object], tasks: set, message: str) -> list[dict]:
    """Spawn a task that fails with ``message`` and wait for it; what the loop reported as never retrieved."""
    unretrieved: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))

    async def boom() -> None:
        raise ValueError(message)

    spawn(boom())
    await asyncio.wait(set(tasks))
    await asyncio.sleep(0)  # one turn of the loop: the task's done callbacks run
    gc.collect()
    loop.set_exception_handler(None)
    return unretrieved


async def test_a_failing_agent_task_is_logged_not_left_unretrieved(tmp_path: Path, caplog) -> None:
    agent = Agent(agent_config(tmp_path, "http://127.0.0.1:1"))
    assert await _unretrieved_after(agent.spawn, agent._tasks, "boom") == []
    assert "boom" in caplog.text and not agent._tasks


async def test_a_failing_link_task_is_logged_not_left_unretrieved(tmp_path: Path, caplog) -> None:
    agent = Agent(agent_config(tmp_path, "http://127.0.0.1:1"))
    assert await _unretrieved_after(agent.links._spawn, agent.links._tasks, "link boom") == []
    assert "link boom" in caplog.text and not agent.links._tasks
