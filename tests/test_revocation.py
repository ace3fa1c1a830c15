"""Taking rights back, with a real server and real agent processes: a removed device is cut off and
refused and its chunks are copied elsewhere; revoked or expired tokens and disabled users are refused
from the next request, cached logins included."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner
from websockets.asyncio.client import connect

from fabric_helpers import free_port, wait_for
from neuranet.agent.identity import Identity
from neuranet.cli import app
from neuranet.client import Client, ClientError
from neuranet.config import ClientConfig
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, decode_frame, encode_frame
from neuranet.storage.transfer import download

pytestmark = pytest.mark.slow
AGENTS = ["r0", "r1", "r2"]
MiB = 2 ** 20


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("revocation"), server_args=["--file-repair", "1"]) as f:
        f.start_server(port=free_port())
        for name in AGENTS:
            f.start_agent(name, extra=["--no-measure", "--storage", "64M", "--listen-host", "127.0.0.1"])
        f.wait_online(AGENTS)
        yield f


def cli(fabric: LocalFabric, *args: str, token: str | None = None) -> str:
    result = CliRunner().invoke(app, [*args, "--server", fabric.url, "--token", token or fabric.token])
    assert result.exit_code == 0, result.output
    return result.output


def holders(c: Client, name: str) -> list[set[str]]:
    return [{h["name"] for h in ch["holders"]} for ch in c.file_info(name)["chunk_list"]]


def status_of(fabric: LocalFabric, token: str) -> int:
    with Client(ClientConfig(fabric.url, token)) as c:
        try:
            c.me()
            return 200
        except ClientError as exc:
            return int(str(exc).split(":")[0])


async def login_as(fabric: LocalFabric, data_dir: Path) -> m.Message:
    """Connect with a device's own key and id, by hand; the server's answer to the signed challenge."""
    ident = Identity.load_or_create(data_dir)
    async with connect(fabric.url.replace("http://", "ws://") + "/agent") as ws:
        await ws.send(encode_frame(m.Hello(version=PROTOCOL_VERSION, device_id=ident.device_id).envelope()))
        answer = m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))
        if not isinstance(answer, m.Challenge):
            return answer
        await ws.send(encode_frame(m.Auth(signature=ident.sign(auth_payload(answer.nonce, answer.device_id))).envelope()))
        return m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))


def test_removed_device_is_disconnected_refused_and_its_chunks_copied_elsewhere(fabric: LocalFabric,
                                                                                 tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "kept.bin"
    src.write_bytes(data)
    cli(fabric, "files", "put", str(src), "--replicas", "2")
    with fabric.client() as c:
        before = holders(c, "kept.bin")
        assert all(len(h) == 2 for h in before)
        victim = max(AGENTS, key=lambda a: sum(a in h for h in before))
        victim_dir = fabric.root / "agents" / victim
        proc = fabric.agents[victim]
        started = time.monotonic()
        out = cli(fabric, "devices", "remove", victim)
        assert f"removed device {victim}" in out
        # Gone at once: not listed, and its live connection was closed by the removal itself.
        assert victim not in {d["name"] for d in c.devices()}
        wait_for(lambda: proc.poll() is not None, 30, "the removed device's agent to stop")
        assert proc.returncode != 0
        log = (fabric.root / f"agent-{victim}.log").read_text(errors="replace")
        assert "removed" in log and "unknown device" in log  # told why, then refused on reconnecting
        # Its key no longer opens a connection, even signed correctly.
        refused = asyncio.run(login_as(fabric, victim_dir))
        assert isinstance(refused, m.Error) and refused.code == "auth_failed" and "unknown device" in refused.message
        # Repair copies every chunk it held onto the other devices (two replicas again, none on it).
        survivors = set(AGENTS) - {victim}
        wait_for(lambda: all(h == survivors for h in holders(c, "kept.bin")), 60, "repair to restore 2 replicas")
        elapsed = time.monotonic() - started
        back = tmp_path / "back.bin"
        download(c, "kept.bin", back)
        assert back.read_bytes() == data, elapsed
    fabric.agents.pop(victim, None)


def test_removing_the_only_holder_needs_force(fabric: LocalFabric, tmp_path: Path) -> None:
    with fabric.client() as c:
        online = [d["name"] for d in c.devices() if d["online"]]
        src = tmp_path / "single.bin"
        src.write_bytes(os.urandom(MiB // 2))
        cli(fabric, "files", "put", str(src), "--replicas", "1")
        (holder,) = holders(c, "single.bin")[0]
        assert holder in online
        refused = CliRunner().invoke(app, ["devices", "remove", holder, "--server", fabric.url, "--token", fabric.token])
        assert refused.exit_code == 1 and "only copy of 1 chunk" in refused.output and "--force" in refused.output
        assert holder in {d["name"] for d in c.devices() if d["online"]}  # still there, still connected
        c.delete_file("single.bin")


def test_token_ls_and_revoke(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        spare = c.create_token("spare", expires_in_seconds=3600)
    assert status_of(fabric, spare) == 200  # and now cached by the server
    listing = cli(fabric, "token", "ls", "--json")
    assert '"spare"' in listing and spare not in listing  # secrets are never shown again
    out = cli(fabric, "token", "revoke", "spare")
    assert "revoked token" in out
    assert status_of(fabric, spare) == 401  # the very next request, though the login was cached
    assert status_of(fabric, fabric.token) == 200
    refused = CliRunner().invoke(app, ["token", "revoke", "nosuch", "--server", fabric.url, "--token", fabric.token])
    assert refused.exit_code == 1 and "no token matches 'nosuch'" in refused.output


def test_expired_token_is_refused(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        brief = c.create_token("brief", expires_in_seconds=1)
        forever = c.create_token("forever", expires_in_seconds=None)
        rows = {t["name"]: t for t in c.tokens()}
    assert rows["forever"]["expires_at"] is None and rows["brief"]["expires_at"] is not None
    wait_for(lambda: status_of(fabric, brief) == 401, 20, "the 1 s token to expire")
    assert status_of(fabric, forever) == 200
    refused = CliRunner().invoke(app, ["token", "create", "--expires", "soon", "--server", fabric.url,
                                       "--token", fabric.token])
    assert refused.exit_code == 1 and "--expires" in refused.output


def test_disabled_user_is_refused_and_its_devices_cut_off(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        bob = c.create_user("bob")["token"]
    proc = fabric.start_agent("bobs", token=bob, extra=["--no-measure", "--listen-host", "127.0.0.1"])
    fabric.wait_online(["bobs"], token=bob)
    refused = CliRunner().invoke(app, ["users", "disable", "admin", "--server", fabric.url, "--token", bob])
    assert refused.exit_code == 1 and "only an admin" in refused.output
    assert status_of(fabric, bob) == 200  # cached from here on
    cli(fabric, "users", "disable", "bob")
    assert status_of(fabric, bob) == 401
    wait_for(lambda: proc.poll() is not None, 30, "the disabled user's agent to stop")
    log = (fabric.root / "agent-bobs.log").read_text(errors="replace")
    assert "disabled" in log
    assert "disabled" in cli(fabric, "users", "ls")
    fabric.agents.pop("bobs", None)
    cli(fabric, "users", "enable", "bob")
    assert status_of(fabric, bob) == 200
    assert isinstance(asyncio.run(login_as(fabric, fabric.root / "agents" / "bobs")), m.Welcome)
