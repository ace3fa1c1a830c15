"""The agent's reconnect policy: backoff that survives flapping connections, and the answers it stops on.

The policy is pure (tested with numbers); the agent is tested against real servers on loopback: one
that completes the handshake and drops every connection, and plain HTTP servers answering 404 / 503.
Time in those tests is a clock that moves only when the agent waits, so nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from neuranet.agent.reconnect import EnrolmentError, ReconnectBackoff, ServerRefused, final_refusal
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from scripted_coordinator import Session, SteppedClock, scripted_coordinator
from neuranet.protocol.errors import AuthenticationFailed, ProtocolError, VersionMismatch

URL = "http://127.0.0.1:1"
JOIN_TOKEN = "jt-not-checked-by-these-servers"

# --- the policy ---------------------------------------------------------------------------------


def test_a_connection_lost_right_after_its_handshake_keeps_backing_off() -> None:
    backoff = ReconnectBackoff(base=0.5, cap=30.0, healthy_after=30.0, rng=random.Random(1))
    now = 0.0
    for attempt in range(8):
        backoff.connected(now)
        now += 0.01  # dropped at once
        assert backoff.attempt == attempt
        now += backoff.next_delay(now)
    assert backoff.attempt == 8


def test_the_backoff_starts_over_after_a_healthy_connection() -> None:
    backoff = ReconnectBackoff(base=0.5, cap=30.0, healthy_after=30.0, rng=random.Random(2))
    for _ in range(5):
        backoff.next_delay(0.0)  # five failed dials
    backoff.connected(100.0)
    backoff.next_delay(129.0)  # up 29 s: not yet healthy
    assert backoff.attempt == 6
    backoff.connected(200.0)
    delay = backoff.next_delay(230.0)  # up 30 s: the next wait is a first one again
    assert backoff.attempt == 1 and delay <= 0.5


@given(ups=st.lists(st.one_of(st.none(), st.floats(0.0, 100.0)), max_size=50), seed=st.integers(0, 2**32))
def test_the_attempt_count_resets_exactly_after_healthy_connections(ups: list[float | None], seed: int) -> None:
    """``ups``: per attempt, None for a failed dial, else how long the connection stayed up."""
    backoff = ReconnectBackoff(base=0.5, cap=30.0, healthy_after=30.0, rng=random.Random(seed))
    now, expected = 1000.0, 0
    for up in ups:
        if up is not None:
            backoff.connected(now)
            now += up
            if up >= 30.0:
                expected = 0
        delay = backoff.next_delay(now)
        assert 0.0 <= delay <= min(30.0, 0.5 * 2 ** expected)
        expected += 1
        assert backoff.attempt == expected
        now += delay


def _status(code: int, reason: str = "") -> InvalidStatus:
    return InvalidStatus(Response(code, reason, Headers(), b""))


@pytest.mark.parametrize("code", [400, 401, 403, 404, 405, 410])
def test_client_errors_on_the_upgrade_are_final(code: int) -> None:
    refusal = final_refusal(_status(code, "Nope"), URL)
    assert isinstance(refusal, ServerRefused)
    assert f"HTTP {code} Nope" in str(refusal) and URL in str(refusal) and "--server" in str(refusal)
    assert "\n" not in str(refusal)


@pytest.mark.parametrize("exc", [_status(500), _status(502), _status(503), _status(408), _status(429),
                                 ConnectionRefusedError(111, "refused"), asyncio.TimeoutError(),
                                 ProtocolError("bad frame"), OSError("no route")])
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert final_refusal(exc, URL) is None


def test_refused_enrolment_and_other_versions_are_final() -> None:
    refused = final_refusal(AuthenticationFailed("unknown device d1; enrol again with a join token"), URL)
    assert isinstance(refused, EnrolmentError) and "unknown device d1" in str(refused)
    version = final_refusal(VersionMismatch("agent speaks protocol 1, server speaks 2"), URL)
    assert isinstance(version, ServerRefused) and "server speaks 2" in str(version) and URL in str(version)


# --- the agent against real servers --------------------------------------------------------------


def agent_config(tmp_path: Path, url: str) -> AgentConfig:
    return AgentConfig(server_url=url, data_dir=tmp_path / "agent", join_token=JOIN_TOKEN, measure=False,
                       listen_host="127.0.0.1", backoff_base=0.5, backoff_cap=30.0, backoff_reset_after=30.0)


async def test_a_server_that_drops_every_connection_sees_spaced_out_reconnects(tmp_path: Path) -> None:
    clock = SteppedClock()
    arrivals: list[float] = []
    enough = asyncio.Event()

    async def drop_at_once(session: Session) -> None:  # welcomed, then dropped
        arrivals.append(clock.now())
        if clock.now() > 60.0 or len(arrivals) >= 40:
            enough.set()

    async with scripted_coordinator(drop_at_once) as url:
        agent = Agent(agent_config(tmp_path, url), clock=clock)
        agent.backoff.rng = random.Random(5)
        async with agent:
            await asyncio.wait_for(enough.wait(), 60)
    in_a_minute = [t for t in arrivals if t <= 60.0]
    assert agent.connections >= 2  # every one of them got through the handshake
    # Reset after each handshake, waits stay under 0.5 s: 120+ connections a minute. Backing off
    # (0.5, 1, 2, ... 30 s, full jitter), about nine.
    assert len(in_a_minute) <= 15, in_a_minute
    assert agent.backoff.attempt >= 6


async def _http_server(status: str, requests: list[bytes]) -> asyncio.Server:
    """A plain HTTP server on loopback that answers every request with ``status``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            requests.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            body = status.encode()
            writer.write(b"HTTP/1.1 " + body + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_an_agent_pointed_at_a_page_that_is_not_there_stops_at_once(tmp_path: Path) -> None:
    requests: list[bytes] = []
    server = await _http_server("404 Not Found", requests)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        agent = Agent(agent_config(tmp_path, url), clock=SteppedClock())
        with pytest.raises(ServerRefused, match="HTTP 404 Not Found") as refused:
            await asyncio.wait_for(agent.run(), 30)
    assert len(requests) == 1 and requests[0].startswith(b"GET /agent ")
    assert url in str(refused.value)


async def test_an_agent_keeps_retrying_a_server_that_is_unavailable(tmp_path: Path) -> None:
    requests: list[bytes] = []
    server = await _http_server("503 Service Unavailable", requests)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        clock = SteppedClock()
        agent = Agent(agent_config(tmp_path, url), clock=clock)
        async with agent:
            for _ in range(600):  # bounded: about a few hundred ms of real time
                if len(requests) >= 4:
                    break
                await asyncio.sleep(0.05)
            assert agent._runner is not None and not agent._runner.done()  # still trying
    assert len(requests) >= 4 and agent.connections == 0 and clock.t > 0


async def _agent_command(url: str, tmp_path: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """``neuranet agent`` as a user starts it, pointed at ``url``, its output captured."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuranet", "agent", "--server", url, "--data-dir", str(tmp_path / "agent"),
        "--join-token", JOIN_TOKEN, "--no-measure", "--listen-host", "127.0.0.1",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


async def test_the_agent_command_exits_with_one_line_on_a_wrong_url(tmp_path: Path) -> None:
    requests: list[bytes] = []
    server = await _http_server("403 Forbidden", requests)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proc = await _agent_command(url, tmp_path, env={**os.environ, "COLUMNS": "60"})
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HTTP 403 Forbidden" in lines[0], lines
    assert len(requests) == 1


async def test_a_malformed_join_token_stops_the_agent_with_a_clear_error(tmp_path: Path) -> None:
    async def answer_nothing(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(answer_nothing, "127.0.0.1", 0) as server:
        cfg = agent_config(tmp_path, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        agent = Agent(AgentConfig(**{**cfg.__dict__, "join_token": "short"}), clock=SteppedClock())
        with pytest.raises(EnrolmentError, match="not a join token"):
            await asyncio.wait_for(agent.run(), 30)


async def test_the_agent_command_stops_cleanly_on_sigterm_while_retrying(tmp_path: Path) -> None:
    requests: list[bytes] = []
    server = await _http_server("503 Service Unavailable", requests)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proc = await _agent_command(url, tmp_path)
        for _ in range(1200):  # bounded: the agent is up and retrying once the server saw a request
            if requests or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert requests, "the agent never reached the server"
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    assert b"Traceback" not in err, err
