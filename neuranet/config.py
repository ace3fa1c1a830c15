"""Settings objects for the server, the agent and the CLI client, passed in explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def default_home() -> Path:
    """Where NeuraNet keeps state when no data dir is given (NEURANET_HOME overrides)."""
    return Path(os.environ.get("NEURANET_HOME") or Path.home() / ".neuranet")


@dataclass(frozen=True)
class Limits:
    """Bounds the server enforces on agent connections and REST requests."""

    max_message_bytes: int = 4 * MiB  # one WebSocket message; PeerLink frames are ~1 MiB
    # Relayed bytes from one source waiting for one destination. Past it the source is paused; still
    # past it after relay_stall_timeout, the source is cut off (its destination is not reading).
    max_queued_bytes_per_peer: int = 16 * MiB
    relay_stall_timeout: float = 10.0
    # Everything waiting for one agent, the server's own frames included (a model's weights go out at
    # once). An agent whose own traffic passes it (it sends and does not read) is disconnected.
    max_queued_bytes_per_connection: int = 256 * MiB
    # Chunk names one device's inventory may list (about 1 TB of 2 MiB chunks); the coordinator holds
    # them in memory until the last page comes.
    max_inventory_chunks: int = 500_000
    # Telemetry samples one device may send, sustained and saved up (agents send one every 5 s);
    # the excess is dropped and counted.
    telemetry_samples_per_second: float = 1.0
    telemetry_burst: int = 10
    max_connections_per_user: int = 256
    max_peers_per_device: int = 256  # distinct devices one device may hold links with
    # REST: a JSON request body (a manifest of MAX_FILE_CHUNKS chunks is ~6 MiB; parsing costs ~10x)
    max_json_body_bytes: int = 8 * MiB
    max_trace_devices_per_user: int = 2000  # simulated devices from imported traces, all imports together
    # GET /api/v1/events: streams one user may hold open, and events one stream may have waiting unread
    # (past it the client is too slow and is dropped)
    max_event_streams_per_user: int = 8
    max_queued_events_per_stream: int = 1024


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8420
    db_url: str | None = None  # default: SQLite in data_dir
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False  # allow plain HTTP on an address other hosts can reach
    heartbeat_interval: float = 3.0
    offline_after: float = 12.0  # a device silent this long is offline
    run_rejoin_grace: float = 5.0  # a run that lost a device waits this long for it to reconnect before re-planning
    telemetry_flush_interval: float = 1.0
    telemetry_retention: float = 30 * 86400.0  # seconds telemetry is kept
    event_keepalive: float = 2.0  # seconds between keepalive comments on an idle event stream (a client sees a
    # stopped server within EVENT_READ_TIMEOUT, before the agents give up on it after offline_after)
    forecast_retrain_interval: float = 6 * 3600.0  # seconds between retrainings of the availability forecaster
    forecast_options: dict[str, Any] = field(default_factory=dict)  # ForecastConfig fields (epochs, hidden, ...)
    file_repair_interval: float = 60.0  # seconds between rounds of chunk repair and migration
    file_lost_after: float = 24 * 3600.0  # a device offline this long has its replicas replaced
    file_orphan_after: float = 24 * 3600.0  # chunks uploaded this long ago that no file uses are deleted
    limits: Limits = field(default_factory=Limits)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'neuranet.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


@dataclass(frozen=True)
class AgentConfig:
    server_url: str  # http(s)://host:port of the coordinator
    data_dir: Path
    name: str | None = None
    join_token: str | None = None
    ca_cert: Path | None = None  # trust this CA for wss:// (else the system store)
    # The coordinator's fingerprint as `neuranet server` prints it: its TLS certificate's for https
    # (pinned instead of trusting a CA), its identity key's for http. None: pin what enrolment meets.
    server_fingerprint: str | None = None
    listen_host: str = "0.0.0.0"  # where direct peer links are accepted
    listen_port: int = 0
    advertise: tuple[tuple[str, int], ...] | None = None  # None: every local address
    telemetry_interval: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # A connection must stay up this long before the backoff starts over (longer than the server's
    # offline_after, so a silent one is dropped before it counts as healthy).
    backoff_reset_after: float = 30.0
    measure: bool = True  # benchmark matmul speed and bandwidth when connecting
    # Run model files of this device's owner (their code, with this agent's rights): off unless the
    # owner allows it on this device (`neuranet agent --allow-owner-code`).
    user_models: bool = False
    storage_bytes: int = 0  # quota offered to the owner's files (0: none)
    link_window_bytes: int = 64 * MiB
    frame_bytes: int = 1 * MiB
    direct_retry_interval: float = 10.0
    link_idle_ping: float = 5.0
    link_dead_after: float = 15.0

    @property
    def ws_url(self) -> str:
        base = self.server_url.rstrip("/")
        if base.startswith("https://"):
            return "wss://" + base[len("https://") :] + "/agent"
        if base.startswith("http://"):
            return "ws://" + base[len("http://") :] + "/agent"
        raise ValueError(f"server URL must start with http:// or https://, got {self.server_url!r}")


@dataclass(frozen=True)
class ClientConfig:
    server_url: str
    token: str
    ca_cert: Path | None = None
    # ca_cert is the server's own certificate, pinned by its fingerprint (`login --server-fingerprint`):
    # trust exactly it, whatever host names it was made for.
    pinned: bool = False
