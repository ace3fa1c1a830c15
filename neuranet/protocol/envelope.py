"""Byte framing of one message: version, msgpack header, raw payload. Pure, no I/O.

A frame is ``[u8 version][u32 header length][msgpack header][payload]``. The
header is ``[type, id, src, dst, body]``; the payload is opaque bytes that are
never re-encoded, so a relay can forward a frame after reading its header only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from neuranet.protocol.errors import MalformedFrame, MessageTooLarge, VersionMismatch

PROTOCOL_VERSION = 1
_PREFIX = struct.Struct(">BI")
MAX_HEADER_BYTES = 256 * 1024
Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class Envelope:
    """One message on the wire: routing fields, a structured body and raw payload."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)
    id: int = 0
    src: str = ""
    dst: str = ""
    payload: Buffer = b""


def encode_frame(env: Envelope) -> bytes:
    """Serialise an envelope into one frame (the payload is copied once)."""
    header = msgpack.packb([env.type, env.id, env.src, env.dst, env.body], use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"message header is {len(header)} bytes, limit {MAX_HEADER_BYTES}")
    return b"".join((_PREFIX.pack(PROTOCOL_VERSION, len(header)), header, env.payload))


def decode_frame(data: Buffer, max_size: int | None = None) -> Envelope:
    """Parse one frame; raises a typed ProtocolError for anything malformed.

    The payload is returned as a zero-copy memoryview into ``data``.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    if len(data) < _PREFIX.size:
        raise MalformedFrame(f"frame of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    version, header_len = _PREFIX.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    end = _PREFIX.size + header_len
    if header_len > MAX_HEADER_BYTES or end > len(data):
        raise MalformedFrame(f"header length {header_len} does not fit a frame of {len(data)} bytes")
    view = memoryview(data)
    try:
        header = msgpack.unpackb(view[_PREFIX.size : end], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedFrame(f"header is not valid msgpack: {exc}") from None
    if not (isinstance(header, list) and len(header) == 5):
        raise MalformedFrame("header must be a list of [type, id, src, dst, body]")
    mtype, mid, src, dst, body = header
    if not (isinstance(mtype, str) and isinstance(mid, int) and isinstance(src, str) and isinstance(dst, str)):
        raise MalformedFrame("header fields have the wrong types")
    if not isinstance(body, dict):
        raise MalformedFrame("message body must be a map")
    return Envelope(type=mtype, body=body, id=mid, src=src, dst=dst, payload=view[end:])


def peek_route(data: Buffer) -> tuple[str, str, str]:
    """Return ``(type, src, dst)`` of a frame, for relaying without touching the payload."""
    env = decode_frame(data)
    return env.type, env.src, env.dst
