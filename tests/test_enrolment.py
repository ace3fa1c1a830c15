"""Enrolment against a real server: nothing is written before the key is proven, one name per owner,
a bounded device id in the hello, and join tokens that need not be on a command line."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fabric_helpers import async_wait_for, free_port
from neuranet.agent.runtime import Agent, EnrolmentError
from neuranet.config import AgentConfig
from neuranet.fabric import LocalFabric
from neuranet.cli.agent import read_join_token
from neuranet.cli.identity import parse_duration
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("enrolment"), server_args=["-v"]) as f:  # logs refusals
        f.start_server(port=free_port())
        yield f


def ws_url(fabric: LocalFabric) -> str:
    return fabric.url.replace("http://", "ws://") + "/agent"


def new_key() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def join_token(fabric: LocalFabric) -> str:
    with fabric.client() as c:
        return c.create_join_token()["join_token"]


def device_names(fabric: LocalFabric) -> list[str]:
    with fabric.client() as c:
        return [d["name"] for d in c.devices()]


async def recv_msg(ws) -> m.Message:
    return m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))


async def hello(ws, jt: str, pub: bytes, name: str) -> m.Message:
    await ws.send(encode_frame(m.Hello(version=PROTOCOL_VERSION,
                                       enrol=m.Enrolment(join_token=jt, public_key=pub, name=name)).envelope()))
    return await recv_msg(ws)


async def enrol(fabric: LocalFabric, jt: str, name: str) -> m.Message:
    """A complete enrolment by hand; the server's last answer (welcome or error)."""
    key, pub = new_key()
    async with connect(ws_url(fabric)) as ws:
        challenge = await hello(ws, jt, pub, name)
        assert isinstance(challenge, m.Challenge), challenge
        await ws.send(encode_frame(m.Auth(signature=key.sign(auth_payload(challenge.nonce, challenge.device_id))).envelope()))
        return await recv_msg(ws)


async def test_a_hello_that_never_answers_the_challenge_leaves_no_device_and_keeps_the_token(fabric: LocalFabric) -> None:
    jt, name = join_token(fabric), f"silent-{uuid.uuid4().hex[:6]}"
    _, pub = new_key()
    async with connect(ws_url(fabric)) as ws:
        assert isinstance(await hello(ws, jt, pub, name), m.Challenge)
    # The old server had created the device and spent the token before it sent the challenge.
    assert name not in device_names(fabric)
    welcome = await enrol(fabric, jt, name)  # the token still works, and the name is still free
    assert isinstance(welcome, m.Welcome), welcome
    assert device_names(fabric).count(name) == 1


async def test_a_key_that_cannot_sign_creates_nothing(fabric: LocalFabric) -> None:
    jt, name = join_token(fabric), f"nokey-{uuid.uuid4().hex[:6]}"
    for bogus in (b"\xff" * 32, b"\x00" * 32):  # not keys anyone holds (the second is not even a point of order l)
        async with connect(ws_url(fabric)) as ws:
            challenge = await hello(ws, jt, bogus, name)
            assert isinstance(challenge, m.Challenge)
            await ws.send(encode_frame(m.Auth(signature=Ed25519PrivateKey.generate().sign(b"x")).envelope()))
            refused = await recv_msg(ws)
            assert isinstance(refused, m.Error) and refused.code == "auth_failed", refused
    assert name not in device_names(fabric)
    assert isinstance(await enrol(fabric, jt, name), m.Welcome)  # the token was never spent


async def test_a_second_device_of_the_same_name_is_refused_clearly(fabric: LocalFabric, tmp_path: Path) -> None:
    name = f"laptop-{uuid.uuid4().hex[:6]}"
    first = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "one", join_token=join_token(fabric),
                              name=name, measure=False, listen_host="127.0.0.1"))
    async with first:
        await first.wait_connected()
    # The same machine again with a fresh data dir (a new key): told to pick another name or remove the old.
    jt = join_token(fabric)
    again = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "two", join_token=jt, name=name,
                              measure=False, listen_host="127.0.0.1"))
    with pytest.raises(EnrolmentError, match=f"already have a device named '{name}'.*--name.*devices remove"):
        async with again:
            await again.wait_connected()
    assert device_names(fabric).count(name) == 1
    assert isinstance(await enrol(fabric, jt, name + "-b"), m.Welcome)  # the refused token is still good


async def test_hello_device_id_is_bounded_and_never_logged_raw(fabric: LocalFabric) -> None:
    forged = "FORGED-LOG-LINE agent 0 connected as admin"
    for device_id in ("x" * 200_000, "abc\n" + forged):  # under the header limit, past any id
        async with connect(ws_url(fabric), max_size=None) as ws:
            env = Envelope(type="hello", body={"version": PROTOCOL_VERSION, "device_id": device_id})
            await ws.send(encode_frame(env))
            refused = await recv_msg(ws)
            assert isinstance(refused, m.Error) and refused.code == "invalid_message", refused
            assert "device_id" in refused.message and len(refused.message) < 1000
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
    log = (fabric.root / "server.log").read_text(errors="replace")
    assert "x" * 1000 not in log
    assert not any(line.startswith(forged) for line in log.splitlines())


async def test_unknown_device_id_is_refused_and_logged_escaped(fabric: LocalFabric) -> None:
    async with connect(ws_url(fabric)) as ws:
        await ws.send(encode_frame(m.Hello(version=PROTOCOL_VERSION, device_id="nosuchdevice").envelope()))
        refused = await recv_msg(ws)
        assert isinstance(refused, m.Error) and refused.code == "auth_failed" and "unknown device" in refused.message
    log_path = fabric.root / "server.log"
    await async_wait_for(lambda: "'unknown device nosuchdevice" in log_path.read_text(errors="replace"), 10, "the refusal logged")


def test_agent_reads_the_join_token_from_stdin(fabric: LocalFabric) -> None:
    name = f"piped-{uuid.uuid4().hex[:6]}"
    data_dir = fabric.root / "agents" / name
    jt = join_token(fabric)
    proc = subprocess.Popen([sys.executable, "-m", "neuranet", "agent", "--server", fabric.url, "--data-dir",
                             str(data_dir), "--name", name, "--join-token", "-", "--no-measure",
                             "--listen-host", "127.0.0.1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=fabric.env, start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"{jt}\n".encode())
        proc.stdin.close()
        fabric.agents[name] = proc  # wait_online reports its log tail if it exits
        fabric.wait_online([name])
        # Nowhere on its command line (what `ps` shows):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert jt.encode() not in cmdline
    finally:
        fabric.kill_agent(name)


def test_read_join_token_sources(tmp_path: Path) -> None:
    assert read_join_token("nj_abc", None, io.StringIO()) == "nj_abc"
    assert read_join_token(None, None, io.StringIO("unused")) is None
    assert read_join_token("-", None, io.StringIO("  nj_from_stdin \n rest")) == "nj_from_stdin"
    f = tmp_path / "tok"
    f.write_text("nj_from_file\n")
    assert read_join_token(None, f, io.StringIO()) == "nj_from_file"
    with pytest.raises(ValueError, match="not both"):
        read_join_token("nj_abc", f, io.StringIO())
    with pytest.raises(ValueError, match="no join token in stdin"):
        read_join_token("-", None, io.StringIO("\n"))
    with pytest.raises(ValueError, match="cannot read"):
        read_join_token(None, tmp_path / "missing", io.StringIO())


def test_agent_refuses_a_device_name_the_coordinator_would_refuse(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    for bad in ("two\nlines", "x" * 101, ""):
        result = CliRunner().invoke(app, ["agent", "--server", "http://127.0.0.1:9", "--data-dir", str(tmp_path),
                                          "--name", bad])
        said = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code == 1 and "--name" in said and "without control characters" in said


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration(" 90m ") == 90 * 60
    assert parse_duration("3600") == 3600
    assert parse_duration("never") is None
    for bad in ("soon", "0d", "-5", "3x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
