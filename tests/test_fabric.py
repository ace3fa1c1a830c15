"""Integration: a real coordinator process and three real agent processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from typer.testing import CliRunner

from fabric_helpers import device_by_name, free_port, run_linktest, wait_for
from neuranet.cli import app
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric

pytestmark = pytest.mark.slow
AGENTS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    with LocalFabric(tmp_path_factory.mktemp("fabric"), server_args=["--offline-after", "3", "--heartbeat", "1"]) as f:
        f.start_server(port=port)
        f.port = port
        f.start_agent("alpha", extra=["--listen-host", "127.0.0.1", "-v"])
        f.start_agent("beta", extra=["--listen-host", "127.0.0.1", "-v"])
        f.start_agent("gamma", extra=["--listen-host", "127.0.0.1", "--no-direct", "--no-measure"])
        f.wait_online(AGENTS)
        yield f


def test_devices_enrol_and_report_profiles(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        devices = {d["name"]: d for d in c.devices()}
    assert set(AGENTS) <= set(devices)
    alpha = devices["alpha"]["profile"]
    for key in ("os", "cpu_model", "cpu_cores", "ram_bytes", "disk_free_bytes", "gpus", "listen_addrs"):
        assert key in alpha, key
    assert alpha["cpu_gflops"] > 0
    wait_for(lambda: device_by_name(fabric.client(), "alpha")["profile"].get("server_bandwidth_bps"), what="bandwidth")
    assert devices["gamma"]["profile"]["listen_addrs"] == []  # --no-direct advertises nothing
    key = fabric.root / "agents" / "alpha" / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_cli_devices_lists_the_agents(fabric: LocalFabric) -> None:
    result = CliRunner().invoke(app, ["devices", "--json", "--server", fabric.url, "--token", fabric.token])
    assert result.exit_code == 0, result.output
    names = {d["name"] for d in json.loads(result.output)}
    assert set(AGENTS) <= names


def test_telemetry_and_history_are_stored(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        alpha = device_by_name(c, "alpha")
        rows = wait_for(lambda: c.request("GET", f"/api/v1/devices/{alpha['id']}/telemetry"), what="telemetry")
        history = c.request("GET", f"/api/v1/devices/{alpha['id']}/history")
    assert {"cpu_percent", "mem_percent", "net_sent", "net_recv"} <= set(rows[0])
    assert history["intervals"] and history["intervals"][-1]["end"] is None  # online now


def test_peerlink_goes_direct_between_reachable_agents(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        a, b = device_by_name(c, "alpha"), device_by_name(c, "beta")
        result = run_linktest(c, a["id"], b["id"], total=16 << 20)
    assert result["ok"], result
    assert result["path"] == "direct"
    assert result["bytes"] == 16 << 20


def test_peerlink_relays_when_the_peer_offers_no_direct_path(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        a, g = device_by_name(c, "alpha"), device_by_name(c, "gamma")
        result = run_linktest(c, a["id"], g["id"], total=8 << 20, msg=256 << 10)
    assert result["ok"], result
    assert result["path"] == "relay" and result["paths_used"] == ["relay"]


def test_another_users_device_is_refused(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        other = c.create_user("mallory")
        a = device_by_name(c, "alpha")
    with fabric.client(other["token"]) as c2:
        assert c2.devices() == []
        with pytest.raises(ClientError, match="404"):
            c2.start_linktest(a["id"], a["id"], 1 << 20, 1 << 20)
        with pytest.raises(ClientError, match="403"):
            c2.create_user("eve")


def test_bad_token_is_refused(fabric: LocalFabric) -> None:
    with pytest.raises(ClientError, match="401"):
        fabric.client("nn_not-a-token").devices()


def test_silent_agent_is_marked_offline_then_resumes(fabric: LocalFabric) -> None:
    proc = fabric.agents["beta"]
    os.kill(proc.pid, signal.SIGSTOP)  # frozen: its socket stays open but it says nothing
    try:
        with fabric.client() as c:
            wait_for(lambda: not device_by_name(c, "beta")["online"], timeout=20, what="beta offline")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    with fabric.client() as c:
        wait_for(lambda: device_by_name(c, "beta")["online"], timeout=30, what="beta back online")
        beta = device_by_name(c, "beta")
        history = c.request("GET", f"/api/v1/devices/{beta['id']}/history")["intervals"]
    assert len(history) >= 2 and history[-2]["end"] is not None


def test_server_restart_loses_nothing_and_agents_return(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        before = {d["id"]: d["name"] for d in c.devices()}
        alpha = device_by_name(c, "alpha")
        intervals_before = len(c.request("GET", f"/api/v1/devices/{alpha['id']}/history")["intervals"])
    fabric.stop_server()
    time.sleep(0.5)
    fabric.start_server(port=fabric.port)
    fabric.wait_online(AGENTS, timeout=60)  # they reconnect on their own, same identities
    with fabric.client() as c:
        after = {d["id"]: d["name"] for d in c.devices()}
        history = c.request("GET", f"/api/v1/devices/{alpha['id']}/history")["intervals"]
        a, b = device_by_name(c, "alpha"), device_by_name(c, "beta")
        result = run_linktest(c, a["id"], b["id"])
    assert after == before
    assert len(history) == intervals_before + 1
    assert all(i["end"] is not None for i in history[:-1])
    assert result["ok"], result


def test_killed_agent_goes_offline(fabric: LocalFabric) -> None:
    fabric.kill_agent("gamma", signal.SIGKILL)
    with fabric.client() as c:
        wait_for(lambda: not device_by_name(c, "gamma")["online"], timeout=20, what="gamma offline")
        with pytest.raises(ClientError, match="offline"):
            alpha, gamma = device_by_name(c, "alpha"), device_by_name(c, "gamma")
            c.start_linktest(alpha["id"], gamma["id"], 1 << 20, 1 << 20)


def test_server_refuses_a_bad_database_url_clearly(tmp_path) -> None:
    result = CliRunner().invoke(app, ["server", "--port", "0", "--data-dir", str(tmp_path), "--db-url", "nosuchdb://x"])
    assert result.exit_code == 1
    assert "cannot use the database URL" in result.output
