"""Typed messages of the control and data planes, each validating its own body.

The base class, the registry and ``parse`` are in `message_base`, the file chunk messages in
`file_messages`; both are re-exported here, so ``messages`` names every message.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from neuranet.protocol.file_messages import (  # noqa: F401  (re-exported: every message is reachable here)
    MAX_CHUNK_NAMES, ChunkCopy, ChunkDelete, ChunkFetch, ChunkInventory, ChunkLost, ChunkName, ChunkPlace, ChunkPlaced,
    ChunkPut, ChunkReply, ChunkStored, chunk_batches)
from neuranet.protocol.json_values import JsonBounds, check_json_value
from neuranet.protocol.message_base import INT64_MAX, MESSAGE_TYPES, Message, Text, parse  # noqa: F401

MAX_ID_CHARS = 128  # of a device, link, run or test id
_Id = Field(min_length=1, max_length=MAX_ID_CHARS)
MAX_CERT_BYTES = 1024  # a device's direct-link certificate (neuranet.net.tls) is about 300 bytes
# What an agent claims to be before it is authenticated is bounded and plain (the coordinator's ids
# are 32 hex digits), so it can be looked up and logged safely.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
DEVICE_NAME_MAX = 100


# --- handshake -----------------------------------------------------------------


class Enrolment(BaseModel):
    model_config = ConfigDict(frozen=True)
    join_token: str = Field(min_length=8, max_length=256)
    public_key: bytes = Field(min_length=32, max_length=32)
    name: str = Field(min_length=1, max_length=DEVICE_NAME_MAX, pattern=r"^[^\x00-\x1f\x7f]+$")  # no control chars


class Hello(Message):
    """First message from an agent: who it is, or an enrolment request."""

    TYPE: ClassVar[str] = "hello"
    version: int
    device_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, pattern=DEVICE_ID_PATTERN)
    enrol: Enrolment | None = None
    agent_version: str = ""
    # A fresh nonce the coordinator must sign with its identity key (see Challenge).
    server_nonce: bytes | None = Field(None, min_length=32, max_length=64)


class Challenge(Message):
    """The coordinator's nonce for the agent to sign, and the coordinator's own proof: its identity
    key (pinned by the agent at enrolment) and its signature over the agent's ``server_nonce``."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes = Field(min_length=32, max_length=64)
    device_id: str
    server_key: bytes | None = Field(None, min_length=32, max_length=32)
    server_signature: bytes | None = Field(None, min_length=64, max_length=64)


class Auth(Message):
    TYPE: ClassVar[str] = "auth"
    signature: bytes = Field(min_length=64, max_length=64)


class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    device_id: str
    user_id: str
    heartbeat_interval: float
    offline_after: float
    max_message_bytes: int
    max_queued_bytes: int


class Error(Message):
    """A typed error: ``code`` names a ProtocolError subclass."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: Text
    ref: int | None = None


# --- control plane ---------------------------------------------------------------


class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    seq: int


class HeartbeatAck(Message):
    TYPE: ClassVar[str] = "heartbeat_ack"
    seq: int


# A profile is stored and shown with the device: bounded so it can always be read back and encoded.
PROFILE_BOUNDS = JsonBounds(max_depth=6, max_items=4096, max_string=4096)


class Profile(Message):
    """The device's resources; ``profile`` is a DeviceProfile as a dict."""

    TYPE: ClassVar[str] = "profile"
    profile: dict[str, Any]
    # The device's direct-link certificate (DER): the coordinator checks it carries the enrolled key
    # and gives it to the device's link peers, who accept no other on a direct path.
    tls_cert: bytes = Field(b"", max_length=MAX_CERT_BYTES)

    @field_validator("profile")
    @classmethod
    def _bounded(cls, profile: dict[str, Any]) -> dict[str, Any]:
        return check_json_value(profile, PROFILE_BOUNDS, "profile")


class TelemetrySample(BaseModel):
    model_config = ConfigDict(frozen=True)
    ts: float = Field(allow_inf_nan=False)
    cpu_percent: float = Field(ge=0, le=100 * 1024)
    mem_percent: float = Field(ge=0, le=100)
    mem_used: int = Field(ge=0, le=INT64_MAX)
    net_sent: int = Field(ge=0, le=INT64_MAX)
    net_recv: int = Field(ge=0, le=INT64_MAX)
    battery_percent: float | None = Field(None, ge=0, le=100)
    power_plugged: bool | None = None


class Telemetry(Message):
    TYPE: ClassVar[str] = "telemetry"
    samples: list[TelemetrySample] = Field(max_length=1000)


class Echo(Message):
    """Bandwidth / round-trip probe: the server answers with the same payload."""

    TYPE: ClassVar[str] = "echo"
    reply: bool = False


# --- links ---------------------------------------------------------------------


class LinkOpen(Message):
    """Agent asks the server to authorise a link to ``peer``."""

    TYPE: ClassVar[str] = "link_open"
    link_id: str = _Id
    peer: str = _Id
    channel: str = Field("default", max_length=64)


class LinkGrant(Message):
    """Server tells both ends of a link who the other is and how to reach it directly."""

    TYPE: ClassVar[str] = "link_grant"
    link_id: str
    peer: str
    channel: str = "default"
    initiator: bool
    peer_addrs: list[tuple[str, int]] = Field(default_factory=list, max_length=32)
    secret: bytes = Field(min_length=16, max_length=64)
    # Who a direct path must reach: the peer's enrolled Ed25519 key and the certificate it reported.
    # Empty when the peer reported none: the link is then relayed only.
    peer_key: bytes = Field(b"", max_length=32)
    peer_cert: bytes = Field(b"", max_length=MAX_CERT_BYTES)


class LinkRefusedMsg(Message):
    TYPE: ClassVar[str] = "link_refused"
    link_id: str
    peer: str
    reason: Text


class PeerDown(Message):
    """The server saw ``peer`` go offline; links to it wait for it to return."""

    TYPE: ClassVar[str] = "peer_down"
    peer: str


class LinkData(Message):
    """One frame of a PeerLink message. ``meta`` rides on the first frame only.

    The data plane sends one of these per ~1 MiB (or per small message), so besides the
    validating model it has a hand-written body codec that checks the same constraints.
    """

    TYPE: ClassVar[str] = "link_data"
    link: str
    seq: int = Field(ge=0)
    off: int = Field(ge=0)
    end: bool
    meta: dict[str, Any] | None = None

    @staticmethod
    def body(link: str, seq: int, off: int, end: bool, meta: dict[str, Any] | None) -> dict[str, Any]:
        return {"link": link, "seq": seq, "off": off, "end": end, "meta": meta}

    @staticmethod
    def read(body: dict[str, Any]) -> tuple[int, int, bool, dict[str, Any] | None]:
        """``(seq, off, end, meta)`` of a body, or InvalidMessage."""
        seq, off, end, meta = body.get("seq"), body.get("off"), body.get("end"), body.get("meta")
        if type(seq) is not int or seq < 0 or type(off) is not int or off < 0:
            raise InvalidMessage("link_data: seq and off must be non-negative integers")
        if type(end) is not bool or not (meta is None or isinstance(meta, dict)):
            raise InvalidMessage("link_data: end must be a bool and meta a map or nil")
        return seq, off, end, meta


class LinkAck(Message):
    """Receiver has consumed frames up to ``seq`` and bytes up to ``consumed``."""

    TYPE: ClassVar[str] = "link_ack"
    link: str
    seq: int = Field(ge=-1)
    consumed: int = Field(ge=0)

    @staticmethod
    def read(body: dict[str, Any]) -> tuple[int, int]:
        """``(seq, consumed)`` of a body, or InvalidMessage (the data plane's fast path)."""
        seq, consumed = body.get("seq"), body.get("consumed")
        if type(seq) is not int or seq < -1 or type(consumed) is not int or consumed < 0:
            raise InvalidMessage("link_ack: seq must be an integer >= -1 and consumed >= 0")
        return seq, consumed


class LinkClose(Message):
    TYPE: ClassVar[str] = "link_close"
    link: str


class DirectStartTls(Message):
    """The only plaintext frame on a direct connection, each way: the dialer names the link (so the
    listener knows whose certificate to require), the listener answers it, and both switch to TLS."""

    TYPE: ClassVar[str] = "direct_start_tls"
    link: str = _Id


class DirectHello(Message):
    """First frame inside a direct link's TLS: proves knowledge of the link secret (binds it to the grant)."""

    TYPE: ClassVar[str] = "direct_hello"
    link: str
    proof: bytes = Field(min_length=32, max_length=32)


class DirectOk(Message):
    TYPE: ClassVar[str] = "direct_ok"
    link: str


class Ping(Message):
    """Liveness probe on an idle direct path."""

    TYPE: ClassVar[str] = "ping"
    link: str = ""


class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    link: str = ""


# --- link tests (measured transfers between two devices) -----------------------


class LinkTestStart(Message):
    TYPE: ClassVar[str] = "linktest_start"
    test_id: str
    peer: str
    total_bytes: int = Field(gt=0)
    message_bytes: int = Field(gt=0)


class LinkTestProgress(Message):
    TYPE: ClassVar[str] = "linktest_progress"
    test_id: str
    sent_bytes: int
    path: str


class LinkTestDone(Message):
    TYPE: ClassVar[str] = "linktest_done"
    test_id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    path: str = ""
    paths_used: list[str] = Field(default_factory=list)
    rtt_ms: float = 0.0
    error: Text = ""


# --- pipeline runs -------------------------------------------------------------


class StageAssign(Message):
    """Server tells a device which layers of which model it trains, and who its neighbours are."""

    TYPE: ClassVar[str] = "stage_assign"
    run_id: str
    stage: int = Field(ge=0)
    num_stages: int = Field(ge=1)
    model: str
    seed: int
    model_options: dict[str, Any] = Field(default_factory=dict)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    prev: str | None = None
    next: str | None = None
    schedule: str = "1f1b"
    microbatches: int = Field(1, ge=1)
    optimizer: str = "sgd"
    lr: float = Field(0.01, gt=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    data_seed: int = 0
    attempt: int = Field(0, ge=0)  # bumped each time the run is re-planned after losing a device
    checkpoint_every: int = Field(0, ge=0)  # steps between uploads of the stage's state; 0: only at the end
    resume_step: int = Field(0, ge=0)  # > 0: wait for StageState parts, then continue from this step
    model_source: str = ""  # a model file of the device's owner (its build(seed)) instead of a built-in model


class StageProgress(Message):
    TYPE: ClassVar[str] = "stage_progress"
    run_id: str
    stage: int
    attempt: int = 0
    step: int
    loss: float | None = None


class StageWeights(Message):
    """Part ``part`` of ``parts`` of a stage's state after ``step`` steps (safetensors, in the payload):
    a checkpoint, or the final weights when ``step`` is the run's last."""

    TYPE: ClassVar[str] = "stage_weights"
    run_id: str
    stage: int
    step: int = Field(0, ge=0)
    attempt: int = Field(0, ge=0)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


STATE_PART_BYTES = 1024 * 1024  # stage state travels in parts well under the server's message limit


def state_parts(blob: bytes) -> list[bytes]:
    """``blob`` cut into the payloads of StageWeights / StageState messages (at least one)."""
    return [blob[i : i + STATE_PART_BYTES] for i in range(0, len(blob), STATE_PART_BYTES)] or [b""]


class StageState(Message):
    """Server sends part of the checkpoint a re-planned stage resumes from (safetensors, in the payload)."""

    TYPE: ClassVar[str] = "stage_state"
    run_id: str
    attempt: int = Field(ge=0)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


class StageDone(Message):
    """A stage finished (after sending its weights as StageWeights parts) or failed."""

    TYPE: ClassVar[str] = "stage_done"
    run_id: str
    stage: int
    attempt: int = 0
    ok: bool
    error: Text = ""


class StageAbort(Message):
    """Server ends a run on this device: another of its devices went away."""

    TYPE: ClassVar[str] = "stage_abort"
    run_id: str
    reason: Text


# --- serving (inference across devices) ------------------------------------------------


class ServeAssign(Message):
    """Server tells a device which layers of a model it serves for a deployment, and its neighbours.

    ``weights_parts`` > 0: the weights (safetensors of the whole model's ``<layer>.<param>``, this
    stage's layers at least) follow as that many ServeWeights parts; 0: the model's own weights.
    """

    TYPE: ClassVar[str] = "serve_assign"
    run_id: str
    stage: int = Field(ge=0)
    num_stages: int = Field(ge=1)
    model: str
    seed: int = 0
    model_options: dict[str, Any] = Field(default_factory=dict)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    prev: str | None = None
    next: str | None = None
    attempt: int = Field(0, ge=0)
    weights_parts: int = Field(0, ge=0)


class ServeWeights(Message):
    """Part ``part`` of ``parts`` of the weights a served stage loads (safetensors, in the payload)."""

    TYPE: ClassVar[str] = "serve_weights"
    run_id: str
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


class ServeStatus(Message):
    """A served stage is loaded and linked (``ok``), or failed and stopped (``error``)."""

    TYPE: ClassVar[str] = "serve_status"
    run_id: str
    stage: int = Field(ge=0)
    ok: bool
    error: Text = ""


class ServeInput(Message):
    """Server hands the first stage part ``part`` of ``parts`` of request ``request``'s input batch (payload:
    the tensor's bytes); a batch is cut along its first dimension to fit the message limits."""

    TYPE: ClassVar[str] = "serve_input"
    run_id: str
    request: int = Field(ge=0)
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1)
    tensor: dict[str, Any]


class ServeOutput(Message):
    """The last stage returns part of a request's output (``tensor``; payload: its bytes), or any stage
    reports that the request failed there (``error``)."""

    TYPE: ClassVar[str] = "serve_output"
    run_id: str
    stage: int = Field(ge=0)
    request: int = Field(ge=0)
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1)
    tensor: dict[str, Any] | None = None
    error: Text = ""


class ServeStop(Message):
    """Server ends a deployment on this device."""

    TYPE: ClassVar[str] = "serve_stop"
    run_id: str
    reason: Text = ""
