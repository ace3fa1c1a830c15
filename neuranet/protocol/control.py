"""Control-plane messages: the handshake (hello, challenge, auth, welcome), errors, heartbeats, the
device profile, telemetry and the echo probe.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from neuranet.protocol.json_values import JsonBounds, check_json_value
from neuranet.protocol.message_base import INT64_MAX, MAX_ID_CHARS, Message, Text

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
