"""A real server facing misbehaving clients: each is refused alone, everyone else keeps being served."""

from __future__ import annotations

import asyncio
import struct
import uuid
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fabric_helpers import async_wait_for, free_port
from neuranet.agent.runtime import Agent, EnrolmentError
from neuranet.config import AgentConfig
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, decode_frame, encode_frame

pytestmark = pytest.mark.slow
MAX_MESSAGE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("hostile"), server_args=["--relay-stall-timeout", "2"]) as f:
        f.start_server(port=free_port())
        f.start_agent("honest", extra=["--listen-host", "127.0.0.1", "--no-measure"])
        f.wait_online(["honest"])
        yield f


def ws_url(fabric: LocalFabric) -> str:
    return fabric.url.replace("http://", "ws://") + "/agent"


async def recv_msg(ws) -> m.Message:
    return m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))


async def enrolled_socket(fabric: LocalFabric):
    """A hand-driven connection that completes the real handshake; returns (ws, device_id)."""
    ws, welcome = await handshake(fabric)
    assert isinstance(welcome, m.Welcome), welcome
    return ws, welcome.device_id


async def handshake(fabric: LocalFabric):
    """Enrol a fresh key by hand; returns the socket and the server's last answer."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    with fabric.client() as c:
        jt = c.create_join_token()["join_token"]
    ws = await connect(ws_url(fabric), max_size=None, compression=None)
    hello = m.Hello(version=PROTOCOL_VERSION, enrol=m.Enrolment(join_token=jt, public_key=pub, name=f"raw-{uuid.uuid4().hex[:12]}"))
    await ws.send(encode_frame(hello.envelope()))
    challenge = await recv_msg(ws)
    await ws.send(encode_frame(m.Auth(signature=key.sign(auth_payload(challenge.nonce, challenge.device_id))).envelope()))
    return ws, await recv_msg(ws)


async def expect_error_then_close(ws, code: str) -> None:
    err = await recv_msg(ws)
    assert isinstance(err, m.Error) and err.code == code, err
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)


def honest_still_served(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        assert any(d["name"] == "honest" and d["online"] for d in c.devices())


async def test_malformed_frame_closes_only_that_connection(fabric: LocalFabric) -> None:
    ws, _ = await enrolled_socket(fabric)
    await ws.send(b"\x01\x00\x00\x00\x05garbage")
    await expect_error_then_close(ws, "malformed_frame")
    honest_still_served(fabric)


async def test_text_frames_are_refused(fabric: LocalFabric) -> None:
    ws, _ = await enrolled_socket(fabric)
    await ws.send("hello?")
    await expect_error_then_close(ws, "malformed_frame")


async def test_wrong_protocol_version_is_refused(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    header = msgpack.packb(["heartbeat", 1, device_id, "server", {"seq": 1}])
    await ws.send(struct.pack(">BI", 99, len(header)) + header)
    await expect_error_then_close(ws, "version_mismatch")
    async with connect(ws_url(fabric)) as ws2:
        await ws2.send(encode_frame(m.Hello(version=99, device_id="x").envelope()))
        await expect_error_then_close(ws2, "version_mismatch")


async def test_unknown_type_gets_an_error_and_the_connection_lives(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    from neuranet.protocol.envelope import Envelope

    await ws.send(encode_frame(Envelope(type="teleport", body={}, src=device_id, dst="server")))
    err = await recv_msg(ws)
    assert isinstance(err, m.Error) and err.code == "unknown_type"
    await ws.send(encode_frame(m.Heartbeat(seq=7).envelope(src=device_id, dst="server")))
    while not isinstance(reply := await recv_msg(ws), m.HeartbeatAck):
        pass
    assert reply.seq == 7
    await ws.close()


async def test_invalid_body_gets_an_error_naming_the_field(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    from neuranet.protocol.envelope import Envelope

    await ws.send(encode_frame(Envelope(type="heartbeat", body={"seq": "soon"}, id=41, src=device_id, dst="server")))
    err = await recv_msg(ws)
    assert isinstance(err, m.Error) and err.code == "invalid_message" and "seq" in err.message
    assert err.ref == 41  # the reply names the message it refuses
    await ws.close()


async def test_oversized_message_is_refused(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    big = m.Echo().envelope(src=device_id, dst="server", payload=b"\0" * (MAX_MESSAGE + 1024))
    await ws.send(encode_frame(big))
    await expect_error_then_close(ws, "too_large")
    ws2, _ = await enrolled_socket(fabric)
    with pytest.raises(ConnectionClosed) as closed:  # far past the limit: the WebSocket layer cuts it
        await ws2.send(b"\0" * (3 * MAX_MESSAGE))
        await asyncio.wait_for(ws2.recv(), 10)
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    honest_still_served(fabric)


async def test_spoofed_source_is_refused(fabric: LocalFabric) -> None:
    ws, _ = await enrolled_socket(fabric)
    await ws.send(encode_frame(m.Heartbeat(seq=1).envelope(src="someone-else", dst="server")))
    await expect_error_then_close(ws, "auth_failed")


async def test_relay_without_a_granted_link_is_refused(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    with fabric.client() as c:
        honest = next(d for d in c.devices() if d["name"] == "honest")
    frame = m.LinkData(link="nope", seq=0, off=0, end=True).envelope(src=device_id, dst=honest["id"], payload=b"x")
    await ws.send(encode_frame(frame))
    refused = await recv_msg(ws)
    assert isinstance(refused, m.LinkRefusedMsg) and "no link was granted" in refused.reason
    await ws.close()


async def test_bad_signature_is_refused(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    await ws.close()
    async with connect(ws_url(fabric)) as ws2:
        await ws2.send(encode_frame(m.Hello(version=PROTOCOL_VERSION, device_id=device_id).envelope()))
        await recv_msg(ws2)
        forged = Ed25519PrivateKey.generate().sign(b"anything")
        await ws2.send(encode_frame(m.Auth(signature=forged).envelope()))
        await expect_error_then_close(ws2, "auth_failed")


async def test_used_join_token_gives_a_clear_enrolment_error(fabric: LocalFabric, tmp_path: Path) -> None:
    with fabric.client() as c:
        jt = c.create_join_token()["join_token"]
    first = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "one", join_token=jt, measure=False,
                              listen_host="127.0.0.1"))
    async with first:
        await first.wait_connected()
    second = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "two", join_token=jt, measure=False,
                               listen_host="127.0.0.1"))
    with pytest.raises(EnrolmentError, match="already used"):
        async with second:
            await second.wait_connected()
    missing = Agent(AgentConfig(server_url=fabric.url, data_dir=tmp_path / "three", measure=False))
    with pytest.raises(EnrolmentError, match="join-token"):
        async with missing:
            await missing.wait_connected()


async def test_flooding_a_stalled_peer_cuts_off_only_the_flooder(fabric: LocalFabric) -> None:
    flooder, flooder_id = await enrolled_socket(fabric)
    sleeper, sleeper_id = await enrolled_socket(fabric)  # never reads again: its queue on the hub fills
    await flooder.send(encode_frame(m.LinkOpen(link_id="flood", peer=sleeper_id).envelope(src=flooder_id, dst="server")))
    grant = await recv_msg(flooder)
    assert isinstance(grant, m.LinkGrant)
    chunk = b"\0" * (1 << 20)
    with pytest.raises(ConnectionClosed):
        for seq in range(256):  # 256 MiB: far past the 16 MiB the hub queues per source
            frame = m.LinkData(link="flood", seq=seq, off=seq << 20, end=True).envelope(
                src=flooder_id, dst=sleeper_id, payload=chunk)
            await asyncio.wait_for(flooder.send(encode_frame(frame)), 10)
        while True:
            msg = await recv_msg(flooder)
            if isinstance(msg, m.Error):
                assert msg.code == "queue_limit"
    honest_still_served(fabric)
    with fabric.client() as c:
        online = {d["id"] for d in c.devices() if d["online"]}
    assert sleeper_id in online and flooder_id not in online
    await sleeper.close()


async def test_connections_per_user_are_capped(tmp_path: Path) -> None:
    with LocalFabric(tmp_path, server_args=["--max-connections-per-user", "2"]) as small:
        await asyncio.to_thread(small.start_server, 30.0, free_port())
        first, _ = await enrolled_socket(small)
        second, _ = await enrolled_socket(small)
        refused, answer = await handshake(small)
        assert isinstance(answer, m.Error) and answer.code == "queue_limit" and "2 devices" in answer.message
        await refused.close()
        await first.close()
        third, _ = await enrolled_socket(small)  # room again once one has left
        await asyncio.gather(second.close(), third.close())


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_errors_to_a_device_that_does_not_read_stay_small(fabric: LocalFabric) -> None:
    from neuranet.protocol.envelope import Envelope

    ws, device_id = await enrolled_socket(fabric)
    before = peak_rss(fabric.server.pid)
    name = "x" * (64 << 10)  # an unknown type the error reply used to repeat whole
    for i in range(1500):  # ~96 MiB of error replies before, while the client reads nothing
        await asyncio.wait_for(ws.send(encode_frame(Envelope(type=name, id=i, src=device_id, dst="server"))), 10)
    await ws.send(encode_frame(m.Heartbeat(seq=1).envelope(src=device_id, dst="server")))
    errors = 0
    while not isinstance(msg := await recv_msg(ws), m.HeartbeatAck):  # now read: every frame was handled
        assert isinstance(msg, m.Error) and msg.code == "unknown_type" and len(msg.message) < 300, msg.message[:100]
        errors += 1
    assert errors == 1500
    grown = peak_rss(fabric.server.pid) - before
    assert grown < 24 << 20, f"the server grew by {grown >> 20} MiB"
    await ws.close()
    honest_still_served(fabric)


async def test_telemetry_floods_are_cut_to_the_devices_rate(fabric: LocalFabric) -> None:
    ws, device_id = await enrolled_socket(fabric)
    sample = m.TelemetrySample(ts=1.0, cpu_percent=1, mem_percent=1, mem_used=1, net_sent=1, net_recv=1)
    for i in range(5):  # 5,000 samples at once
        await ws.send(encode_frame(m.Telemetry(samples=[sample] * 1000).envelope(id=i, src=device_id, dst="server")))
    await ws.send(encode_frame(m.Heartbeat(seq=1).envelope(src=device_id, dst="server")))
    while not isinstance(await recv_msg(ws), m.HeartbeatAck):  # every frame before it was handled
        pass

    def stored() -> list:
        with fabric.client() as c:
            return c.request("GET", f"/api/v1/devices/{device_id}/telemetry", params={"limit": 10_000})

    rows = await async_wait_for(lambda: len(stored()) >= 10 and stored(), 30, "the first telemetry flush")
    assert len(rows) < 100  # the burst and a few seconds' worth, not 5,000
    await ws.close()
