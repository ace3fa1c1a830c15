"""`build_agent`: the agent `neuranet agent` runs, assembled without a network and without running it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuranet.agent.build import InvalidArgument, agent_config, build_agent
from neuranet.agent.runtime import Agent
from neuranet.errors import Invalid
from neuranet.protocol import messages as m

PIN = "SHA256:" + "A" * 43


def test_builds_with_defaults_into_the_data_dir(tmp_path: Path) -> None:
    agent = build_agent("http://127.0.0.1:1", tmp_path / "agent")
    assert isinstance(agent, Agent) and agent.config.data_dir == tmp_path / "agent"
    assert (tmp_path / "agent").is_dir() and agent.device_id is None  # a key made, not enrolled yet
    assert agent.config.storage_bytes == 0 and agent.config.advertise is None and not agent.config.user_models
    # every worker installed: link tests, training stages, serving, file chunks
    for msg in (m.LinkTestStart, m.StageAssign, m.ServeAssign, m.ChunkPut):
        assert msg in agent._handlers, msg.__name__
    assert "chunk" in agent.local.ops
    assert agent._runner is None  # not running


def test_the_same_data_dir_keeps_its_key(tmp_path: Path) -> None:
    first = build_agent("http://127.0.0.1:1", tmp_path)
    again = build_agent("https://coordinator.example:8420", tmp_path, name="laptop", direct=False,
                        storage_bytes=1 << 20, allow_owner_code=True, server_fingerprint=PIN)
    assert again.identity.public_key == first.identity.public_key
    cfg = again.config
    assert (cfg.name, cfg.advertise, cfg.storage_bytes, cfg.user_models) == ("laptop", (), 1 << 20, True)
    assert cfg.server_fingerprint == PIN and cfg.ws_url == "wss://coordinator.example:8420/agent"


def test_the_data_dir_defaults_to_neuranet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURANET_HOME", str(tmp_path))
    assert agent_config("http://127.0.0.1:1").data_dir == tmp_path / "agent"


@pytest.mark.parametrize("kwargs, argument, message", [
    (dict(server_url="ftp://host"), "server_url", "server URL must start with http:// or https://"),
    (dict(name=""), "name", "name '': a device name is 1 to"),
    (dict(name="tab\there"), "name", "without control characters"),
    (dict(server_fingerprint="SHA256:nope"), "server_fingerprint", "server_fingerprint: 'SHA256:nope' is not a SHA-256"),
    (dict(listen_port=70000), "listen_port", "a port is 0 (any) to 65535"),
    (dict(storage_bytes=-1), "storage_bytes", "cannot be negative"),
])
def test_refuses_bad_settings_naming_them(tmp_path: Path, kwargs: dict, argument: str, message: str) -> None:
    args = {"server_url": "http://127.0.0.1:1", **kwargs}
    with pytest.raises(InvalidArgument, match=re.escape(message)) as caught:
        build_agent(data_dir=tmp_path, **args)
    assert caught.value.argument == argument and isinstance(caught.value, Invalid)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_damaged_enrolment_record_is_refused_in_the_users_terms(tmp_path: Path) -> None:
    build_agent("http://127.0.0.1:1", tmp_path)
    (tmp_path / "device.json").write_text("{not json")
    with pytest.raises(Invalid, match="is not a valid enrolment record.*enrol again with --join-token"):
        build_agent("http://127.0.0.1:1", tmp_path)
