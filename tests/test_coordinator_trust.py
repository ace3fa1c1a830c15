"""Agents trust only the coordinator they enrolled with; the coordinator does not serve in the clear.

A fake coordinator (a real WebSocket server on loopback that speaks the protocol but lacks the
coordinator's key, or presents another certificate) must not get an enrolled agent to run anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.server import ServerConnection, serve
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed

from fabric_helpers import async_wait_for, free_port, wait_for
from neuranet.agent import stage_worker
from neuranet.agent.coordinator_trust import verify_coordinator
from neuranet.agent.identity import Identity
from neuranet.agent.runtime import Agent
from neuranet.cli import app
from neuranet.config import AgentConfig, ServerConfig
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m
from neuranet.protocol.auth import coordinator_payload, fingerprint, parse_fingerprint
from neuranet.protocol.envelope import decode_frame, encode_frame
from neuranet.protocol.errors import CoordinatorUnverified
from neuranet.server.app import StartupError
from neuranet.server.identity import self_signed_certificate
from neuranet.server.run import check_exposure

# --- pure parts ----------------------------------------------------------------------


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signed_challenge(key: Ed25519PrivateKey, agent_nonce: bytes, signed_nonce: bytes | None = None) -> m.Challenge:
    nonce = secrets.token_bytes(32)
    sig = key.sign(coordinator_payload(signed_nonce or agent_nonce, nonce, "dev-1"))
    return m.Challenge(nonce=nonce, device_id="dev-1", server_key=raw(key), server_signature=sig)


def test_the_pinned_coordinator_key_is_required_and_must_sign_this_nonce() -> None:
    real, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    nonce = secrets.token_bytes(32)
    assert verify_coordinator("u", signed_challenge(real, nonce), nonce, raw(real), None) == raw(real)
    assert verify_coordinator("u", signed_challenge(impostor, nonce), nonce, None, None) == raw(impostor)  # enrolling
    mismatch = f"{fingerprint(raw(impostor))}, but this device pinned {fingerprint(raw(real))}"
    with pytest.raises(CoordinatorUnverified, match=re.escape(mismatch)):
        verify_coordinator("u", signed_challenge(impostor, nonce), nonce, raw(real), None)
    with pytest.raises(CoordinatorUnverified, match="without a valid signature"):  # a replayed proof
        replayed = signed_challenge(real, nonce, signed_nonce=secrets.token_bytes(32))
        verify_coordinator("u", replayed, nonce, raw(real), None)
    with pytest.raises(CoordinatorUnverified, match="did not prove"):
        verify_coordinator("u", m.Challenge(nonce=nonce, device_id="dev-1"), nonce, None, None)
    with pytest.raises(CoordinatorUnverified, match="--server-fingerprint"):
        verify_coordinator("u", signed_challenge(impostor, nonce), nonce, None, fingerprint(raw(real)))


def test_fingerprints_parse_as_printed_or_as_openssl_shows_them() -> None:
    digest = bytes(range(32))
    printed = fingerprint(b"x")
    assert parse_fingerprint(printed) == printed
    hex_colons = ":".join(f"{b:02X}" for b in digest)
    assert parse_fingerprint(f"sha256 Fingerprint={hex_colons}") == parse_fingerprint(digest.hex())
    for bad in ("", "SHA256:abc", "zz" * 32, "SHA256:" + "A" * 60):
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            parse_fingerprint(bad)


def test_plain_http_is_refused_where_other_hosts_can_reach_it(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.7", "coord.example"):
        with pytest.raises(StartupError, match="--tls-cert FILE --tls-key FILE.*--self-signed.*--insecure"):
            check_exposure(ServerConfig(data_dir=tmp_path, host=host))
        check_exposure(ServerConfig(data_dir=tmp_path, host=host, insecure=True))
        check_exposure(ServerConfig(data_dir=tmp_path, host=host, tls_cert=tmp_path / "c", tls_key=tmp_path / "k"))
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        check_exposure(ServerConfig(data_dir=tmp_path, host=host))


def test_the_server_command_refuses_0_0_0_0_without_tls(tmp_path: Path) -> None:
    # A subprocess with a timeout: code without the check would serve on 0.0.0.0 until killed.
    cmd = [sys.executable, "-m", "neuranet", "server", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    out = " ".join((done.stdout + done.stderr).split())
    assert "refusing to serve plain HTTP on 0.0.0.0" in out and "--self-signed" in out and "--insecure" in out
    assert not (tmp_path / "server.json").exists()


def test_the_self_signed_certificate_is_made_once_and_reused(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path, "0.0.0.0")
    assert key.stat().st_mode & 0o077 == 0
    first = cert.read_bytes()
    assert self_signed_certificate(tmp_path, "0.0.0.0") == (cert, key) and cert.read_bytes() == first
    ctx = ssl.create_default_context(cafile=str(cert))  # usable as the CLI's --ca-cert
    assert ctx.cert_store_stats()["x509_ca"] == 1


# --- a fake coordinator ----------------------------------------------------------------

OWNER_CODE = """
from pathlib import Path
Path({marker!r}).write_text("ran")
def build(seed):
    raise RuntimeError("never mind the model")
"""


class FakeCoordinator:
    """Answers every hello with a challenge it cannot prove, then at once a welcome and a stage
    carrying model source, without waiting for the agent: it ignores whatever the agent checks."""

    def __init__(self, port: int, marker: Path, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port, self.marker, self.ssl_context = port, marker, ssl_context
        self.key = Ed25519PrivateKey.generate()
        self.received: list[str] = []
        self.closed = 0

    async def handle(self, ws: ServerConnection) -> None:
        try:
            hello = m.parse(decode_frame(await ws.recv()))
            self.received.append(hello.TYPE)
            device_id = getattr(hello, "device_id", None) or "dev"
            forged = secrets.token_bytes(64)  # no key of the real coordinator to sign the agent's nonce with
            for msg in (
                m.Challenge(nonce=secrets.token_bytes(32), device_id=device_id, server_key=raw(self.key),
                            server_signature=forged),
                m.Welcome(device_id=device_id, user_id="u", heartbeat_interval=30, offline_after=120,
                          max_message_bytes=1 << 22, max_queued_bytes=1 << 24),
                m.StageAssign(run_id="r" * 32, stage=0, num_stages=1, model="owned", seed=0, start=0, stop=1,
                              steps=1, batch_size=1, model_source=OWNER_CODE.format(marker=str(self.marker))),
            ):
                await ws.send(encode_frame(msg.envelope(src="server")))
            async for data in ws:
                self.received.append(decode_frame(data).type)
        except ConnectionClosed:
            pass
        finally:
            self.closed += 1

    async def __aenter__(self) -> "FakeCoordinator":
        self.server = await serve(self.handle, "127.0.0.1", self.port, ssl=self.ssl_context, compression=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_an_enrolled_agent_runs_nothing_from_a_coordinator_without_its_key(tmp_path: Path, caplog) -> None:
    port = free_port()
    marker = tmp_path / "owner-code-ran"
    with LocalFabric(tmp_path / "fabric") as fabric:
        fabric.start_server(timeout=90, port=port)
        with fabric.client() as c:
            jt, other_jt = (c.create_join_token()["join_token"] for _ in range(2))
        key_fp = server_fingerprint(fabric)  # over plain HTTP: the coordinator's identity key
        # The owner allowed model files on this device: only the coordinator check stands in the way.
        cfg = AgentConfig(server_url=fabric.url, data_dir=tmp_path / "agent", join_token=jt, measure=False,
                          listen_host="127.0.0.1", user_models=True, backoff_base=0.05, backoff_cap=0.2,
                          server_fingerprint=key_fp)
        async with Agent(cfg) as enrolled:
            await enrolled.wait_connected(timeout=60)
        assert fingerprint(enrolled.identity.server_key) == key_fp
        # A record from before coordinators had a key pins it on the next connection (once).
        record_path = cfg.data_dir / "device.json"
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({"device_id": record["device_id"], "server_url": record["server_url"]}))
        async with Agent(dataclasses.replace(cfg, join_token=None, server_fingerprint=None)) as legacy:
            await legacy.wait_connected(timeout=60)
        assert json.loads(record_path.read_text())["server_key"] == record["server_key"]
        wrong = fingerprint(b"another coordinator")
        caplog.set_level(logging.WARNING, logger="neuranet.agent")
        async with Agent(dataclasses.replace(cfg, data_dir=tmp_path / "other", join_token=other_jt, name="other",
                                             server_fingerprint=wrong)) as other:
            await async_wait_for(lambda: f"but --server-fingerprint is {wrong}" in caplog.text, timeout=60,
                                 what="an agent given another fingerprint to refuse the coordinator")
            assert not other.connected.is_set()
        fabric.stop_server()
    # The real coordinator is gone; something else answers at its address.
    agent = Agent(dataclasses.replace(cfg, join_token=None, server_fingerprint=None))  # the pin alone
    stage_worker.install(agent)
    async with FakeCoordinator(port, marker) as fake, agent:
        await async_wait_for(lambda: fake.closed >= 2 or marker.exists(), timeout=60,
                             what="the agent to refuse the fake coordinator twice")
        assert not marker.exists(), "the fake coordinator's code ran on the agent"
        assert set(fake.received) == {"hello"}  # the agent sent no auth and answered nothing
        assert not agent.connected.is_set()
    pinned = fingerprint(agent.identity.server_key)
    assert f"presented coordinator key {fingerprint(raw(fake.key))}, but this device pinned {pinned}" in caplog.text


# --- TLS with the coordinator's own certificate ----------------------------------------------


def server_fingerprint(fabric: LocalFabric) -> str:
    return json.loads((fabric.server_dir / "server.json").read_text())["fingerprint"]


def presented_fingerprint(port: int) -> str:
    """What the server at ``port`` really presents, read independently of the code under test."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, ctx.wrap_socket(sock) as tls:
        return fingerprint(tls.getpeercert(binary_form=True))


async def test_self_signed_server_is_pinned_by_fingerprint_and_a_new_certificate_is_refused(tmp_path: Path,
                                                                                            caplog) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, logger="neuranet.agent")
    with LocalFabric(tmp_path, server_args=["--self-signed"]) as fabric:
        url = fabric.start_server(timeout=90, port=port)
        assert url.startswith("https://")
        fp = server_fingerprint(fabric)
        assert fp == presented_fingerprint(port)
        with fabric.client() as c:
            assert c.health()["fingerprint"] == fp
            jt, other_jt = (c.create_join_token()["join_token"] for _ in range(2))
        # The CLI elsewhere pins it too: exactly this certificate, checked at login.
        cli = CliRunner(env={"NEURANET_HOME": str(tmp_path / "cli")})
        login = ["login", "--server", url, "--token", fabric.token, "--server-fingerprint"]
        refused = cli.invoke(app, [*login, fingerprint(b"another")])
        assert refused.exit_code == 1 and f"presented TLS certificate {fp}" in " ".join(refused.output.split())
        assert cli.invoke(app, [*login, fp]).exit_code == 0
        assert cli.invoke(app, ["devices"]).exit_code == 0
        cfg = AgentConfig(server_url=url, data_dir=tmp_path / "pinned", join_token=jt, measure=False,
                          listen_host="127.0.0.1", backoff_base=0.05, backoff_cap=0.2, server_fingerprint=fp)
        async with Agent(cfg) as agent:
            await agent.wait_connected(timeout=60)
        again = dataclasses.replace(cfg, join_token=None, server_fingerprint=None)
        async with Agent(again) as agent:  # no fingerprint given now: the pin stored at enrolment is used
            await agent.wait_connected(timeout=60)
        # Without a fingerprint a self-signed certificate is not trusted on first use: the agent says
        # which fingerprint it saw and how to pin it.
        unpinned = dataclasses.replace(cfg, data_dir=tmp_path / "unpinned", join_token=other_jt,
                                       server_fingerprint=None)
        async with Agent(unpinned) as agent:
            await async_wait_for(lambda: f"pass --server-fingerprint {fp}" in caplog.text, timeout=60,
                                 what="the unpinned agent to explain the self-signed certificate")
            assert not agent.connected.is_set()
        # Another certificate at the same address (a restart alone reuses the file, see above): the
        # agent refuses it, naming both fingerprints.
        fabric.stop_server()
        shutil.rmtree(fabric.server_dir / "tls")
        fabric.start_server(timeout=90, port=port)
        new_fp = server_fingerprint(fabric)
        assert new_fp != fp and new_fp == presented_fingerprint(port)
        async with Agent(again) as agent:
            await async_wait_for(lambda: f"presented TLS certificate {new_fp}, but this device expects {fp} "
                                 "(pinned at enrolment)" in caplog.text, timeout=60,
                                 what="the pinned agent to refuse the new certificate")
            assert not agent.connected.is_set()
        with fabric.client() as c:
            names = {d["name"] for d in c.devices()}
        assert len(names) == 1  # the unpinned agent never enrolled
        assert cli.invoke(app, ["devices"]).exit_code != 0  # nor does the CLI trust the new certificate


# --- a refusal no one proved -------------------------------------------------------------


class RefusingImpostor:
    """Answers every hello as the real coordinator answers a device it does not know: an error
    before any challenge, so with nothing the agent could check."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.hellos = 0

    async def handle(self, ws: ServerConnection) -> None:
        try:
            m.parse(decode_frame(await ws.recv()))
            self.hellos += 1
            refusal = m.Error(code="auth_failed", message="unknown device dev-1; enrol again with a join token")
            await ws.send(encode_frame(refusal.envelope(src="server")))
            await ws.close(4003, "auth_failed")
        except ConnectionClosed:
            pass

    async def __aenter__(self) -> "RefusingImpostor":
        self.server = await serve(self.handle, "127.0.0.1", self.port, compression=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_an_impostor_cannot_stop_an_enrolled_agent_with_an_unproven_refusal(tmp_path: Path, caplog) -> None:
    # Over plain HTTP whoever answers at the address could send this refusal; it proves nothing, so
    # the enrolled agent keeps retrying instead of stopping for good (the real coordinator may be back).
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    Identity.load_or_create(tmp_path / "agent").save_enrolment("dev-1", url, raw(Ed25519PrivateKey.generate()))
    caplog.set_level(logging.WARNING, logger="neuranet.agent")
    agent = Agent(AgentConfig(server_url=url, data_dir=tmp_path / "agent", measure=False, listen_host="127.0.0.1",
                              backoff_base=0.05, backoff_cap=0.2))
    async with RefusingImpostor(port) as fake, agent:
        assert agent._runner is not None
        await async_wait_for(lambda: fake.hellos >= 3 or agent._runner.done(), timeout=60,
                             what="the agent to ask again or stop")
        assert not agent._runner.done(), f"the agent stopped: {agent._runner.exception()!r}"
        assert "before proving it is the coordinator this device enrolled with" in caplog.text


def test_the_coordinator_proves_itself_before_refusing_a_device(tmp_path: Path) -> None:
    # So that an enrolled agent can believe the refusal (and stop) where an impostor's would not do.
    from api_app import api_app
    from neuranet.protocol.auth import coordinator_signature_valid
    from neuranet.protocol.envelope import PROTOCOL_VERSION

    nonce = secrets.token_bytes(32)
    with api_app(tmp_path) as c, c.websocket_connect("/agent") as ws:
        hello = m.Hello(version=PROTOCOL_VERSION, device_id="d" * 32, server_nonce=nonce)
        ws.send_bytes(encode_frame(hello.envelope()))
        challenge = m.parse(decode_frame(ws.receive_bytes()))
        assert isinstance(challenge, m.Challenge) and challenge.server_key and challenge.server_signature
        assert coordinator_signature_valid(challenge.server_key, challenge.server_signature,
                                           coordinator_payload(nonce, challenge.nonce, "d" * 32))
        ws.send_bytes(encode_frame(m.Auth(signature=b"\0" * 64).envelope()))
        refusal = m.parse(decode_frame(ws.receive_bytes()))
        assert isinstance(refusal, m.Error) and refusal.code == "auth_failed" and "unknown device" in refusal.message
