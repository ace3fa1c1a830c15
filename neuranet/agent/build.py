"""`build_agent`: a device's whole agent assembled from explicit settings, ready to run.

What `neuranet agent` runs, as a library call: the settings are checked (in the user's terms, as
`Invalid`), the identity key is loaded or made in the data dir, and every worker is installed (link
tests, training stages, serving, the owner's file chunks). Nothing connects until the agent runs
(``await agent.serve_until(stop)``, or ``async with agent``).
"""

from __future__ import annotations

from pathlib import Path

from neuranet.agent import file_worker, linktest, serve_worker, stage_worker
from neuranet.agent.chunk_store import ChunkStore
from neuranet.agent.reconnect import Clock
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig, default_home
from neuranet.errors import Invalid
from neuranet.protocol.auth import parse_fingerprint
from neuranet.protocol.messages import DEVICE_NAME_MAX


class InvalidArgument(Invalid):
    """`build_agent` refuses one of its arguments. ``argument`` is its name; a message that starts with
    it names it there, so a command line can show its own flag instead (``--server-fingerprint``)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def check_device_name(name: str) -> None:
    """Refuse a device name the coordinator would refuse (it names the device in every listing)."""
    if not 1 <= len(name) <= DEVICE_NAME_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidArgument("name", f"name {name!r}: a device name is 1 to {DEVICE_NAME_MAX} characters, "
                              "without control characters")


def agent_config(
    server_url: str,
    data_dir: Path | None = None,
    *,
    name: str | None = None,
    join_token: str | None = None,
    ca_cert: Path | None = None,
    server_fingerprint: str | None = None,
    listen_host: str = "0.0.0.0",
    listen_port: int = 0,
    measure: bool = True,
    direct: bool = True,
    allow_owner_code: bool = False,
    storage_bytes: int = 0,
) -> AgentConfig:
    """The agent's settings from `build_agent`'s arguments, checked (pure: nothing is read or written)."""
    if name is not None:
        check_device_name(name)
    if server_fingerprint is not None:
        try:
            server_fingerprint = parse_fingerprint(server_fingerprint)
        except ValueError as exc:
            raise InvalidArgument("server_fingerprint", f"server_fingerprint: {exc}") from None
    if not 0 <= listen_port <= 65535:
        raise InvalidArgument("listen_port", f"listen_port {listen_port}: a port is 0 (any) to 65535")
    if storage_bytes < 0:
        raise InvalidArgument("storage_bytes", "the storage quota cannot be negative")
    cfg = AgentConfig(server_url=server_url, data_dir=data_dir or default_home() / "agent", name=name,
                      join_token=join_token, ca_cert=ca_cert, server_fingerprint=server_fingerprint,
                      listen_host=listen_host, listen_port=listen_port, measure=measure,
                      advertise=None if direct else (), user_models=allow_owner_code, storage_bytes=storage_bytes)
    try:
        cfg.ws_url
    except ValueError as exc:
        raise InvalidArgument("server_url", str(exc)) from None
    return cfg


def build_agent(
    server_url: str,
    data_dir: Path | None = None,
    *,
    name: str | None = None,
    join_token: str | None = None,
    ca_cert: Path | None = None,
    server_fingerprint: str | None = None,
    listen_host: str = "0.0.0.0",
    listen_port: int = 0,
    measure: bool = True,
    direct: bool = True,
    allow_owner_code: bool = False,
    storage_bytes: int = 0,
    clock: Clock | None = None,
) -> Agent:
    """This device's agent with every worker installed, not yet running.

    ``server_url``: the coordinator (http:// or https://). ``data_dir``: key and state (default
    ``~/.neuranet/agent``). ``name``: the device's name (default: its hostname). ``join_token``: enrols
    the device on its first run. ``ca_cert`` / ``server_fingerprint``: trust for the coordinator (see
    `AgentConfig`). ``listen_host``/``listen_port``: where direct peer links are accepted; ``direct=False``
    offers none (always relay). ``measure``: benchmark speed and bandwidth on connect.
    ``allow_owner_code``: run the owner's model files. ``storage_bytes``: disk offered to the owner's
    files. ``clock``: paces reconnects (tests pass one that does not wait).

    Raises `Invalid` (`InvalidArgument` naming the argument) for settings the agent cannot run with,
    and for a data dir it cannot use.
    """
    cfg = agent_config(server_url, data_dir, name=name, join_token=join_token, ca_cert=ca_cert,
                       server_fingerprint=server_fingerprint, listen_host=listen_host, listen_port=listen_port,
                       measure=measure, direct=direct, allow_owner_code=allow_owner_code,
                       storage_bytes=storage_bytes)
    try:
        agent = Agent(cfg, clock=clock)
        chunks = ChunkStore(cfg.data_dir / "chunks", cfg.storage_bytes)
    except (ValueError, OSError) as exc:  # a damaged enrolment record, a data dir it may not write
        raise Invalid(str(exc)) from exc
    linktest.install(agent)
    stage_worker.install(agent)
    serve_worker.install(agent)
    file_worker.install(agent, chunks)
    return agent
