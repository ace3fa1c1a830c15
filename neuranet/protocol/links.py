"""Link-plane messages: link open / grant / refusal, peer down, the PeerLink data frames (data, ack,
close), the direct path's handshake and probes, and link tests between two devices.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from neuranet.protocol.control import MAX_CERT_BYTES
from neuranet.protocol.errors import InvalidMessage
from neuranet.protocol.message_base import ID_FIELD as _Id
from neuranet.protocol.message_base import Message, Text


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


# Why the coordinator refused a link, which the agent decides on: ``forbidden`` (never allowed: the
# opener gives up), ``offline`` (the peer is away: a granted link waits for it), ``limit`` (too many
# peers at once), ``ungranted`` (relayed data on a link not granted, or not yet renewed after a reconnect).
LinkRefusalCode = Literal["forbidden", "offline", "limit", "ungranted"]


class LinkRefusedMsg(Message):
    """The coordinator will not grant or relay a link: ``code`` for the agent, ``reason`` for people."""

    TYPE: ClassVar[str] = "link_refused"
    link_id: str
    peer: str
    code: LinkRefusalCode
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
