"""The agent's local socket: requests and answers with bytes, bad requests, permissions."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from pathlib import Path

import pytest

from neuranet.net.local_api import MAX_PAYLOAD, SOCKET_NAME, LocalAgent, LocalApi, LocalRequestError


async def echo(request: dict, payload: bytes) -> tuple[dict, bytes]:
    if request.get("refuse"):
        raise LocalRequestError("refused as asked")
    if request.get("crash"):
        raise RuntimeError("boom")
    return {"got": len(payload)}, payload[::-1]


@pytest.fixture
async def api(tmp_path: Path):
    local = LocalApi(lambda: "device-1")
    local.register("echo", echo)
    await local.start(tmp_path)
    try:
        yield local
    finally:
        await local.close()


def raw(path: Path, data: bytes) -> list[bytes]:
    """Send raw bytes; the answer lines until the agent closes or a second passes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect(str(path))
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out.splitlines()


async def test_requests_with_bytes_both_ways(api: LocalApi, tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path)
    assert (await asyncio.to_thread(agent.request, {"op": "whoami"}))[0]["device"] == "device-1"
    answer, data = await asyncio.to_thread(agent.request, {"op": "echo"}, b"abc" * 1000)
    assert answer == {"ok": True, "got": 3000, "size": 3000} and data == (b"abc" * 1000)[::-1]
    assert await asyncio.to_thread(LocalAgent.find, tmp_path) is not None
    assert await asyncio.to_thread(LocalAgent.find, tmp_path / "elsewhere") is None
    # Only the agent's OS user may connect.
    assert stat.S_IMODE((tmp_path / SOCKET_NAME).stat().st_mode) == 0o600


async def test_bad_requests_get_clear_answers_and_the_door_stays_open(api: LocalApi, tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path)
    with pytest.raises(LocalRequestError, match="refused as asked"):
        await asyncio.to_thread(agent.request, {"op": "echo", "refuse": True})
    with pytest.raises(LocalRequestError, match="RuntimeError: boom"):
        await asyncio.to_thread(agent.request, {"op": "echo", "crash": True})
    with pytest.raises(LocalRequestError, match="unknown op 'nope'"):
        await asyncio.to_thread(agent.request, {"op": "nope"})
    path = tmp_path / SOCKET_NAME
    lines = await asyncio.to_thread(raw, path, b"not json\n[1]\n" + json.dumps({"op": "whoami"}).encode() + b"\n")
    answers = [json.loads(line) for line in lines]
    assert [a["ok"] for a in answers] == [False, False, True]  # a bad line does not end the connection
    assert "one JSON object per line" in answers[0]["error"]
    lines = await asyncio.to_thread(raw, path, json.dumps({"op": "echo", "size": MAX_PAYLOAD + 1}).encode() + b"\n")
    assert "size must be an integer" in json.loads(lines[0])["error"]
    lines = await asyncio.to_thread(raw, path, json.dumps({"op": "echo", "size": True}).encode() + b"\n")
    assert "size must be an integer" in json.loads(lines[0])["error"]
    lines = await asyncio.to_thread(raw, path, b"[" * 100_000 + b"\n")  # too deep for the JSON parser
    assert "one JSON object per line" in json.loads(lines[0])["error"]
    # Still serving after all that.
    assert (await asyncio.to_thread(agent.request, {"op": "echo"}, b"x"))[1] == b"x"


async def test_close_removes_the_socket(tmp_path: Path) -> None:
    local = LocalApi(lambda: None)
    local.register("echo", echo)
    (tmp_path / SOCKET_NAME).write_text("left by a crashed agent")
    await local.start(tmp_path)
    assert (tmp_path / SOCKET_NAME).is_socket()
    await local.close()
    assert not (tmp_path / SOCKET_NAME).exists()
