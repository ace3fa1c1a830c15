"""A real coordinator paused (SIGSTOP) for less than offline_after: nobody is dropped, nobody reconnects."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from fabric_helpers import free_port
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m

pytestmark = pytest.mark.slow
HEARTBEAT, OFFLINE_AFTER = 1.5, 4.0
STALL = 3.5  # seconds, 7/8 of offline_after (the issue saw a 10 s pause of 12 drop 4 agents in 6)


async def test_a_server_paused_for_less_than_offline_after_drops_nobody(tmp_path: Path) -> None:
    with LocalFabric(tmp_path, server_args=["--heartbeat", str(HEARTBEAT), "--offline-after", str(OFFLINE_AFTER)]) as fabric:
        await asyncio.to_thread(fabric.start_server, 30.0, free_port())
        assert fabric.server is not None
        with fabric.client() as c:
            jt = c.create_join_token()["join_token"]
        agent = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "agent", join_token=jt, measure=False,
                                  listen_host="127.0.0.1"))
        acks: asyncio.Queue[int] = asyncio.Queue()

        async def on_ack(_agent: Agent, msg: m.Message, _payload: bytes) -> None:
            assert isinstance(msg, m.HeartbeatAck)
            acks.put_nowait(msg.seq)

        agent.on(m.HeartbeatAck, on_ack)
        async with agent:
            await agent.wait_connected()
            await asyncio.wait_for(acks.get(), 10)  # heartbeats are answered: the connection is live
            # Pause just before the next heartbeat, the worst moment: the agent last heard from the server
            # almost a heartbeat before the pause, and the pause ends almost a heartbeat past its
            # offline_after from then (judged from the last message seen, it gave up at its 3rd heartbeat).
            await asyncio.sleep(0.9 * HEARTBEAT)
            os.kill(fabric.server.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STALL)  # the pause itself: its length is what is under test
            finally:
                os.kill(fabric.server.pid, signal.SIGCONT)
            while not acks.empty():
                acks.get_nowait()
            for _ in range(3):  # heartbeats sent after the pause are answered on the same connection
                await asyncio.wait_for(acks.get(), 10)
            assert agent.connections == 1
            with fabric.client() as c:
                history = c.request("GET", f"/api/v1/devices/{agent.device_id}/history")
            assert [i["end"] for i in history["intervals"]] == [None]  # one presence, still open
