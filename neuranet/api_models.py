"""The bodies the coordinator's REST API answers with, typed: one model per response shape.

The routers declare them (``/openapi.json`` and ``/docs`` describe every answer from them), and
anything that reads the API can import them without importing the server: `neuranet.client`,
tests, a web UI's generated types. Pydantic only; no server, storage or network code.

Times are Unix seconds (floats); sizes are bytes. A model here describes what is sent, so it is
lenient about extra keys a book adds (they are dropped, not refused) and strict about types: a
route whose answer does not fit its model is a bug the tests see.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class View(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(extra="ignore")


# --- errors -------------------------------------------------------------------------------


class ErrorBody(View):
    """A refusal: what went wrong and what to change, in one sentence."""

    detail: str


class FieldError(View):
    """One field a request got wrong: where (``body``/``query``/``path``, then the field's path) and why."""

    loc: list[str | int]
    msg: str
    type: str


class InvalidBody(View):
    """422: the request is invalid, either field by field (a list) or as a whole (a sentence)."""

    detail: str | list[FieldError]


# --- identity: users, tokens --------------------------------------------------------------


class Me(View):
    user_id: str
    name: str
    is_admin: bool


class NewToken(View):
    token: str = Field(description="The API token's secret; shown once, never again.")


class NewJoinToken(View):
    join_token: str = Field(description="Pass to `neuranet agent --join-token` to enrol a device; used once.")
    expires_at: float


class NewUser(View):
    user_id: str
    name: str
    token: str = Field(description="The new user's first API token; shown once.")


class TokenView(View):
    id: str
    name: str
    created_at: float
    expires_at: float | None = Field(description="None: valid until revoked.")
    current: bool = Field(description="Whether this request came with this token.")


class TokenRevoked(View):
    revoked: str = Field(description="The token's id.")
    name: str


class UserView(View):
    id: str
    name: str
    is_admin: bool
    disabled: bool
    created_at: float


class UserDisabled(View):
    name: str
    disabled: bool


class DeviceRemoved(View):
    removed: str = Field(description="The device's id.")
    name: str
    replicas: int = Field(description="Chunk copies it held, now to be made on other devices.")
    sole_copies: int = Field(description="Of those, chunks no other device holds (lost unless it comes back).")


# --- devices ------------------------------------------------------------------------------


class DeviceView(View):
    id: str
    name: str
    online: bool
    online_since: float | None
    last_seen: float | None
    profile: dict[str, Any] = Field(description="What the device's agent reported of itself (CPU, memory, disk, "
                                                "network measures); an imported trace device's says `simulated`.")
    created_at: float


class PresenceInterval(View):
    start: float
    end: float | None = Field(description="None: still online.")


class PresenceHistory(View):
    device_id: str
    now: float
    intervals: list[PresenceInterval]


class TelemetryPoint(View):
    ts: float
    cpu_percent: float
    mem_percent: float
    mem_used: int
    net_sent: int
    net_recv: int
    battery_percent: float | None
    power_plugged: bool | None


class Empty(View):
    """No value yet."""

    model_config = ConfigDict(extra="forbid")


class LinkTestResult(View):
    test_id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    path: str = ""
    paths_used: list[str] = Field(default_factory=list)
    rtt_ms: float = 0.0
    error: str = ""


class LinkTestView(View):
    id: str
    src: str
    dst: str
    total_bytes: int
    sent_bytes: int
    path: str = Field(description="How the bytes go: direct, or relayed through the coordinator.")
    done: bool
    result: LinkTestResult | Empty = Field(description="`{}` until the test is done.")


class Health(View):
    ok: bool
    version: str
    online_devices: int
    fingerprint: str | None = Field(description="The TLS certificate's fingerprint agents pin "
                                                "(`--server-fingerprint`); None when a CA vouches for it.")
    coordinator_key: str = Field(description="The fingerprint of the key the coordinator proves itself with.")


# --- runs and deployments -----------------------------------------------------------------


class StageView(View):
    """One stage of a run or deployment: the layers ``start``..``stop`` (exclusive) on one device."""

    model_config = ConfigDict(extra="allow")
    device: str
    start: int
    stop: int
    param_bytes: int = 0


class RunView(View):
    id: str
    model: str
    status: str = Field(description="running, finished or failed.")
    steps: int
    batch_size: int
    stages: list[StageView]
    plan: str = Field(description="The split over the devices, as the user reads it.")
    losses: list[float] = Field(description="The loss of each step so far.")
    errors: dict[int, str] = Field(description="Stage -> why it failed.")
    started: float
    attempt: int = Field(description="Re-plans so far (after losing a device).")
    recoveries: list[str]
    checkpoints: list[int] = Field(description="Steps with a whole checkpoint.")
    checkpoint_every: int
    checkpoint_reason: str
    recovering: bool = Field(False, description="Whether it is re-planning after losing a device now.")


class RunSummary(View):
    id: str
    kind: str = Field(description="train or serve.")
    created: float
    model: str | None
    state: str = Field(description="The run's or deployment's status; unknown: recorded by a coordinator too old "
                                   "to keep it.")
    step: int | None
    steps: int | None
    devices: list[str] = Field(description="Device names (ids of devices since removed).")


class DeploymentView(View):
    id: str
    model: str
    status: str = Field(description="loading, ready, failed or stopped.")
    stages: list[StageView]
    plan: str
    error: str
    started: float
    served: int = Field(description="Requests answered.")
    run: str | None = Field(description="The training run whose weights it serves.")
    can_generate: bool


class InferResult(View):
    outputs: list[Any] = Field(description="One output per input, in order.")


class Generated(View):
    text: str


# --- files --------------------------------------------------------------------------------


class ChunkStored(View):
    chunk: str
    holders: list[str] = Field(description="Devices that hold the chunk now (fewer than asked when no more can "
                                           "take it; repair adds the rest).")
    replicas: int


class FileSummary(View):
    name: str
    size: int = Field(description="Stored bytes (the ciphertext's when encrypted).")
    sha256: str
    replicas: int
    encrypted: bool
    created_at: float


class FileCommitted(FileSummary):
    chunks: int
    replicas_now: int = Field(description="The fewest copies any chunk has (at most the target).")
    chunks_short: int = Field(description="Chunks with fewer copies than the target.")
    repair_interval: float


class ChunkHolder(View):
    device: str
    name: str
    online: bool


class FileChunkView(View):
    id: str
    size: int
    holders: list[ChunkHolder]


class FileDetail(FileCommitted):
    sealing: dict[str, Any] | None = Field(description="How the file was encrypted; None when it was not.")
    chunk_list: list[FileChunkView]
    retrievable_now: bool
    p_retrievable_24h: float = Field(description="P(every chunk has a holder online), averaged over the next 24 h.")
    checked_at: float


class FileDeleted(View):
    deleted: str
    replicas_freed: int


class DeviceChunks(View):
    device: str
    name: str
    chunks: int
    bytes: int
    quota_bytes: int | None
    free_bytes: int | None
    chunk_ids: list[str]


# --- forecasts and traces -----------------------------------------------------------------


class ForecasterInfo(View):
    kind: str = Field(description="mlp (the trained model) or persistence (every device stays as it is now).")
    trained_at: float | None
    devices: int = Field(description="Devices in the last training.")
    next_fit_at: float | None
    min_history_seconds: float


class Horizon(View):
    seconds: int
    p_online: float
    p_stay_online: float


class Forecast(View):
    device: str
    name: str
    at: float
    online: bool
    simulated: bool
    horizons: list[Horizon]
    expected_online_seconds: float | None
    history: list[tuple[float, float | None]] = Field(description="Recent online intervals [start, end]; end "
                                                                   "None: online now.")
    model: ForecasterInfo
    method: str


class TraceImported(View):
    devices: int
    ids: list[str]
    history_end: float
    days: float
    prefix: str


class TraceSummary(View):
    prefix: str
    devices: int
    history_end: float | None


class TraceRemoved(View):
    prefix: str
    removed: int
