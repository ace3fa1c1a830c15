"""Unit and property tests of the pure protocol modules: framing, messages, tensors, errors."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_samples import SAMPLES

from neuranet.protocol import errors, messages
from neuranet.protocol.envelope import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    decode_frame,
    encode_frame,
    peek_route,
)
from neuranet.protocol.errors import (
    ERRORS_BY_CODE,
    InvalidMessage,
    MalformedFrame,
    MessageTooLarge,
    ProtocolError,
    TensorFormatError,
    UnknownMessageType,
    VersionMismatch,
    error_from_code,
)
from neuranet.protocol.messages import MESSAGE_TYPES, Message, parse
from neuranet.protocol.tensors import DTYPES, MAX_DIMS, decode_tensor, encode_tensor

PREFIX = struct.Struct(">BI")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    # NaN never compares equal, which would make a correct round trip look broken.
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
# Only values msgpack maps back to the same Python value: lists (not tuples), str keys.
msgpack_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5)
ids = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def frame_with_header(header: Any, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(version, len(raw)) + raw + payload


# --- envelope ----------------------------------------------------------------------


@PROPERTY
@given(mtype=st.text(max_size=30), mid=ids, src=st.text(max_size=30), dst=st.text(max_size=30), body=bodies, payload=st.binary(max_size=256))
def test_frame_round_trip(mtype: str, mid: int, src: str, dst: str, body: dict, payload: bytes) -> None:
    frame = encode_frame(Envelope(type=mtype, body=body, id=mid, src=src, dst=dst, payload=payload))
    env = decode_frame(frame)
    assert (env.type, env.id, env.src, env.dst, env.body) == (mtype, mid, src, dst, body)
    assert bytes(env.payload) == payload
    assert peek_route(frame) == (mtype, src, dst)


def test_payload_is_a_zero_copy_view() -> None:
    frame = bytearray(encode_frame(Envelope(type="echo", payload=b"abcd")))
    env = decode_frame(frame)
    assert isinstance(env.payload, memoryview)
    frame[-1] = ord("z")
    assert bytes(env.payload) == b"abcz"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_every_buffer_kind(kind: type) -> None:
    frame = encode_frame(Envelope(type="ping", body={"a": 1}, id=7, payload=b"xyz"))
    env = decode_frame(kind(frame))
    assert (env.type, env.id, env.body, bytes(env.payload)) == ("ping", 7, {"a": 1}, b"xyz")


@PROPERTY
@given(data=st.binary(max_size=512))
def test_decode_of_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except ProtocolError:
        pass


@PROPERTY
@given(header=st.binary(max_size=256), payload=st.binary(max_size=32))
def test_decode_of_random_header_bytes_raises_only_protocol_errors(header: bytes, payload: bytes) -> None:
    # A correct prefix gets random bytes past the version check into the msgpack decoder.
    try:
        decode_frame(PREFIX.pack(PROTOCOL_VERSION, len(header)) + header + payload)
    except ProtocolError:
        pass


@PROPERTY
@given(header=msgpack_values)
def test_decode_of_arbitrary_msgpack_header_raises_only_protocol_errors(header: Any) -> None:
    try:
        env = decode_frame(frame_with_header(header))
    except ProtocolError:
        return
    assert header == [env.type, env.id, env.src, env.dst, env.body]


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_rejected(version: int) -> None:
    frame = bytearray(encode_frame(Envelope(type="ping")))
    frame[0] = version
    with pytest.raises(VersionMismatch, match=str(version)):
        decode_frame(bytes(frame))


def test_every_truncation_inside_prefix_or_header_is_malformed() -> None:
    frame = encode_frame(Envelope(type="link_data", body={"link": "l", "seq": 3}, id=9, src="a", dst="b", payload=b"p" * 10))
    (header_len,) = struct.unpack_from(">I", frame, 1)
    for cut in range(PREFIX.size + header_len):
        with pytest.raises(MalformedFrame):
            decode_frame(frame[:cut])


def test_header_length_past_the_limit_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(PREFIX.pack(PROTOCOL_VERSION, MAX_HEADER_BYTES + 1) + b"\x90" * (MAX_HEADER_BYTES + 1))


def test_too_large_frame_is_rejected_before_parsing() -> None:
    frame = encode_frame(Envelope(type="echo", payload=b"x" * 100))
    assert decode_frame(frame, max_size=len(frame)).type == "echo"
    with pytest.raises(MessageTooLarge):
        decode_frame(frame, max_size=len(frame) - 1)
    # The size check comes first, so even garbage of that size is reported as too large.
    with pytest.raises(MessageTooLarge):
        decode_frame(b"\xff" * 50, max_size=10)


def test_encode_refuses_oversized_header() -> None:
    with pytest.raises(MessageTooLarge):
        encode_frame(Envelope(type="profile", body={"blob": b"x" * MAX_HEADER_BYTES}))


@pytest.mark.parametrize(
    "header",
    [
        ["ping", 0, "", ""],
        ["ping", 0, "", "", {}, "extra"],
        [],
        {"type": "ping"},
        "ping",
        42,
        None,
    ],
    ids=["4-list", "6-list", "empty", "map", "str", "int", "nil"],
)
def test_header_not_a_five_list_is_malformed(header: Any) -> None:
    with pytest.raises(MalformedFrame, match="list"):
        decode_frame(frame_with_header(header))


@pytest.mark.parametrize(
    "header",
    [
        [1, 0, "", "", {}],
        ["ping", "0", "", "", {}],
        ["ping", 1.5, "", "", {}],
        ["ping", 0, b"src", "", {}],
        ["ping", 0, "", None, {}],
        ["ping", 0, "", "", []],
        ["ping", 0, "", "", None],
    ],
)
def test_header_fields_of_wrong_type_are_malformed(header: list) -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(frame_with_header(header))


def test_header_that_is_not_msgpack_is_malformed() -> None:
    bad = b"\xc1"  # the one byte msgpack never uses
    with pytest.raises(MalformedFrame, match="msgpack"):
        decode_frame(PREFIX.pack(PROTOCOL_VERSION, len(bad)) + bad)


def test_map_with_non_string_keys_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        decode_frame(frame_with_header(["ping", 0, "", "", {1: "x"}]))


# --- messages ----------------------------------------------------------------------


def test_samples_cover_every_registered_type() -> None:
    # A new message type must get a sample in protocol_samples.py so its round trip is exercised.
    assert set(SAMPLES) == set(MESSAGE_TYPES)
    for name, samples in SAMPLES.items():
        assert all(type(m) is MESSAGE_TYPES[name] for m in samples)


@pytest.mark.parametrize(
    "msg", [m for ms in SAMPLES.values() for m in ms], ids=lambda m: m.TYPE
)
def test_every_message_type_round_trips(msg: Message) -> None:
    frame = encode_frame(msg.envelope(id=42, src="a", dst="b", payload=b"\x00\x01"))
    env = decode_frame(frame)
    assert env.type == msg.TYPE
    back = parse(env)
    assert type(back) is type(msg)
    assert back == msg
    assert (env.id, env.src, env.dst, bytes(env.payload)) == (42, "a", "b", b"\x00\x01")


def test_message_types_are_unique_and_named() -> None:
    assert all(name and cls.TYPE == name for name, cls in MESSAGE_TYPES.items())
    with pytest.raises(TypeError, match="twice"):

        class Duplicate(Message):  # noqa: F841 - defining it is the test
            TYPE = "ping"


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(UnknownMessageType, match="no_such_type"):
        parse(Envelope(type="no_such_type"))
    assert UnknownMessageType.fatal is False


@pytest.mark.parametrize(
    ("mtype", "body", "field"),
    [
        ("link_data", {"link": "l", "seq": -1, "off": 0, "end": False}, "seq"),
        ("link_data", {"link": "l", "seq": 0, "off": -5, "end": False}, "off"),
        ("link_data", {"seq": 0, "off": 0, "end": False}, "link"),
        ("link_ack", {"link": "l", "seq": -2, "consumed": 0}, "seq"),
        ("auth", {"signature": bytes(63)}, "signature"),
        ("auth", {"signature": bytes(65)}, "signature"),
        ("auth", {"signature": 12}, "signature"),
        ("challenge", {"nonce": bytes(8), "device_id": "d"}, "nonce"),
        ("direct_hello", {"link": "l", "proof": bytes(31)}, "proof"),
        ("link_open", {"link_id": "", "peer": "p"}, "link_id"),
        ("link_open", {"link_id": "l", "peer": "p" * 129}, "peer"),
        ("link_grant", {"link_id": "l", "peer": "p", "initiator": True, "secret": bytes(8)}, "secret"),
        ("linktest_start", {"test_id": "t", "peer": "p", "total_bytes": 0, "message_bytes": 1}, "total_bytes"),
        ("telemetry", {"samples": [{"ts": 0, "cpu_percent": -1, "mem_percent": 0, "mem_used": 0, "net_sent": 0, "net_recv": 0}]}, "samples.0.cpu_percent"),
        ("hello", {"version": 1, "enrol": {"join_token": "short", "public_key": bytes(32), "name": "n"}}, "enrol.join_token"),
        ("heartbeat", {"seq": "three"}, "seq"),
    ],
)
def test_invalid_body_names_the_field(mtype: str, body: dict, field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(Envelope(type=mtype, body=body))
    assert str(info.value).startswith(f"{mtype}: {field}: ")
    assert info.value.fatal is False


def test_unknown_body_fields_are_ignored() -> None:
    assert parse(Envelope(type="heartbeat", body={"seq": 1, "future_field": [1, 2]})) == messages.Heartbeat(seq=1)


def test_messages_are_frozen() -> None:
    msg = messages.Heartbeat(seq=1)
    with pytest.raises(Exception):  # pydantic raises its own ValidationError for frozen models
        msg.seq = 2  # type: ignore[misc]


@PROPERTY
@given(mtype=st.sampled_from(sorted(MESSAGE_TYPES)), body=bodies)
def test_parse_of_arbitrary_body_raises_only_invalid_message(mtype: str, body: dict) -> None:
    # Go through the wire so the body is exactly what a peer could make this side see.
    env = decode_frame(encode_frame(Envelope(type=mtype, body=body)))
    try:
        msg = parse(env)
    except InvalidMessage:
        return
    assert type(msg) is MESSAGE_TYPES[mtype]


# --- tensors -----------------------------------------------------------------------

shapes = st.lists(st.integers(min_value=0, max_value=4), max_size=4)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as bytes, computed independently of encode_tensor."""
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Random bit patterns rather than randn: covers NaNs, infinities and subnormals too.
    bits = torch.randint(0, 256, (math.prod(shape) * itemsize,), generator=g, dtype=torch.uint8)
    return bits.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_tensor_round_trip(name: str, shape: list[int], seed: int) -> None:
    t = random_tensor(DTYPES[name], shape, seed)
    header, payload = encode_tensor(t)
    assert header == {"dtype": name, "shape": shape}
    assert bytes(payload) == raw_bytes(t)
    back = decode_tensor(header, payload)
    assert back.dtype == t.dtype and list(back.shape) == shape
    assert raw_bytes(back) == raw_bytes(t)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_zero_dim_and_empty_tensors_round_trip(name: str) -> None:
    dtype = DTYPES[name]
    for t in (torch.ones((), dtype=dtype), torch.empty((0,), dtype=dtype), torch.empty((3, 0, 2), dtype=dtype)):
        header, payload = encode_tensor(t)
        back = decode_tensor(header, payload)
        assert back.dtype == dtype and back.shape == t.shape
        assert raw_bytes(back) == raw_bytes(t)


def test_tensor_round_trip_through_a_frame() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header, payload = encode_tensor(t)
    env = decode_frame(encode_frame(Envelope(type="link_data", body={"tensor": header}, payload=payload)))
    assert torch.equal(decode_tensor(env.body["tensor"], env.payload), t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        lambda: torch.arange(24, dtype=torch.int64).reshape(2, 3, 4).permute(2, 0, 1),
        lambda: torch.arange(20, dtype=torch.int16)[::3],
        lambda: torch.arange(6, dtype=torch.float16).reshape(2, 3)[:, 1:],
        lambda: torch.tensor([1.5, -2.0], dtype=torch.bfloat16).expand(3, 2),
        lambda: (torch.arange(10) % 3 == 0)[1::2],
        lambda: torch.arange(8, dtype=torch.uint8)[4:],  # contiguous, but with a storage offset
        lambda: torch.ones(3, requires_grad=True) * 2,
    ],
    ids=["transpose", "permute", "step", "slice", "expand", "bool-step", "offset", "grad"],
)
def test_non_contiguous_tensors_round_trip(make: Any) -> None:
    t = make()
    header, payload = encode_tensor(t)
    back = decode_tensor(header, payload)
    assert back.is_contiguous()
    assert torch.equal(back, t.detach())


def test_decoded_tensor_owns_its_memory() -> None:
    t = torch.arange(4, dtype=torch.int32)
    header, payload = encode_tensor(t)
    buf = bytearray(payload)
    back = decode_tensor(header, buf)
    buf[:] = bytes(len(buf))
    back += 1  # writable: a read-only buffer would warn or fail here
    assert back.tolist() == [1, 2, 3, 4]


def test_non_byte_memoryview_payload_is_measured_in_bytes() -> None:
    payload = memoryview(struct.pack("<2f", 1.0, 2.0)).cast("f")
    assert torch.equal(decode_tensor({"dtype": "float32", "shape": [2]}, payload), torch.tensor([1.0, 2.0]))
    with pytest.raises(TensorFormatError):
        decode_tensor({"dtype": "uint8", "shape": [2]}, payload)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(TensorFormatError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_wrong_byte_count_is_rejected(name: str) -> None:
    header, payload = encode_tensor(torch.zeros((2, 3), dtype=DTYPES[name]))
    for wrong in (bytes(payload)[:-1], bytes(payload) + b"\x00", b""):
        with pytest.raises(TensorFormatError, match="bytes"):
            decode_tensor(header, wrong)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ({"dtype": "complex64", "shape": [1]}, bytes(8)),
        ({"dtype": "float", "shape": [1]}, bytes(4)),
        ({"dtype": None, "shape": [1]}, bytes(4)),
        ({"dtype": 5, "shape": [1]}, bytes(4)),
        ({"dtype": ["float32"], "shape": [1]}, bytes(4)),
        ({"dtype": {"a": 1}, "shape": [1]}, bytes(4)),
        ({"shape": [1]}, bytes(4)),
        ({"dtype": "float32", "shape": [-1]}, b""),
        ({"dtype": "float32", "shape": [2, -3]}, b""),
        ({"dtype": "uint8", "shape": [1] * (MAX_DIMS + 1)}, bytes(1)),
        ({"dtype": "float32", "shape": (1,)}, bytes(4)),
        ({"dtype": "float32", "shape": 1}, bytes(4)),
        ({"dtype": "float32", "shape": None}, bytes(4)),
        ({"dtype": "float32", "shape": [1.0]}, bytes(4)),
        ({"dtype": "float32", "shape": ["1"]}, bytes(4)),
        ({"dtype": "float32", "shape": [True]}, bytes(4)),
        ({"dtype": "float32", "shape": [2**64 - 1, 0]}, b""),
        ({"dtype": "float32", "shape": [2**62, 2**62, 0]}, b""),
        ({"dtype": "uint8", "shape": [2**40] * 3}, bytes(1)),
        (["float32", [1]], bytes(4)),
        (None, b""),
    ],
)
def test_bad_tensor_headers_are_rejected(header: Any, payload: bytes) -> None:
    with pytest.raises(TensorFormatError):
        decode_tensor(header, payload)


def test_max_dims_is_allowed() -> None:
    t = decode_tensor({"dtype": "uint8", "shape": [1] * MAX_DIMS}, b"\x07")
    assert t.dim() == MAX_DIMS and t.item() == 7


_tensor_headers = st.one_of(
    msgpack_values,
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(sorted(DTYPES)) | msgpack_values,
            "shape": st.lists(st.integers(min_value=-2, max_value=2**64 - 1) | msgpack_values, max_size=MAX_DIMS + 2)
            | msgpack_values,
        }
    ),
)


@PROPERTY
@given(header=_tensor_headers, payload=st.binary(max_size=64))
def test_decode_tensor_of_arbitrary_input_raises_only_tensor_format_error(header: Any, payload: bytes) -> None:
    try:
        t = decode_tensor(header, payload)
    except TensorFormatError:
        return
    assert t.dtype == DTYPES[header["dtype"]] and list(t.shape) == header["shape"]


# --- errors ------------------------------------------------------------------------


def _all_subclasses(cls: type) -> set[type]:
    subs = set(cls.__subclasses__())
    return subs.union(*(_all_subclasses(s) for s in subs))


def test_every_error_class_has_a_unique_registered_code() -> None:
    classes = {ProtocolError} | {c for c in _all_subclasses(ProtocolError) if c.__module__ == errors.__name__}
    assert set(ERRORS_BY_CODE.values()) == classes
    assert len({c.code for c in classes}) == len(classes)


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_error_from_code_maps_back(code: str) -> None:
    cls = ERRORS_BY_CODE[code]
    err = error_from_code(code, "details here")
    assert type(err) is cls
    assert err.code == code and str(err) == "details here"
    assert isinstance(err, ProtocolError)


def test_unknown_error_code_becomes_plain_protocol_error() -> None:
    err = error_from_code("from_the_future", "?")
    assert type(err) is ProtocolError and str(err) == "?"


@pytest.mark.parametrize("cls", sorted(ERRORS_BY_CODE.values(), key=lambda c: c.code), ids=lambda c: c.code)
def test_error_survives_an_error_message_round_trip(cls: type[ProtocolError]) -> None:
    exc = cls("went wrong")
    env = decode_frame(encode_frame(messages.Error(code=exc.code, message=str(exc), ref=3).envelope()))
    reply = parse(env)
    assert isinstance(reply, messages.Error)
    again = error_from_code(reply.code, reply.message)
    assert type(again) is cls and str(again) == "went wrong" and again.fatal == cls.fatal


@pytest.mark.parametrize("body", [
    {"seq": -1, "off": 0, "end": True, "meta": None},
    {"seq": 0, "off": "0", "end": True, "meta": None},
    {"seq": 0, "off": 0, "end": 1, "meta": None},
    {"seq": 0, "off": 0, "end": True, "meta": [1]},
])
def test_link_data_fast_path_refuses_a_bad_body_with_a_typed_error(body):
    # The data plane's hand-written codec raised a NameError here before the plane split.
    with pytest.raises(InvalidMessage, match="link_data"):
        messages.LinkData.read(body)


def test_link_ack_fast_path_refuses_a_bad_body_with_a_typed_error():
    with pytest.raises(InvalidMessage, match="link_ack"):
        messages.LinkAck.read({"seq": -2, "consumed": 0})


def test_every_plane_module_registers_its_messages_and_messages_re_exports_them():
    from neuranet.protocol import chunks, control, jobs, links, runs, serving

    planes = (control, links, runs, serving, chunks, jobs)
    types = {cls.TYPE: cls for plane in planes for cls in vars(plane).values()
             if isinstance(cls, type) and issubclass(cls, Message) and cls.TYPE}
    assert types == MESSAGE_TYPES
    assert all(getattr(messages, cls.__name__) is cls for cls in types.values())


def test_a_link_refusal_carries_one_of_the_known_codes():
    env = messages.LinkRefusedMsg(link_id="l-1", peer="dev-2", code="limit", reason="too many peers").envelope()
    assert parse(env).code == "limit"
    env.body["code"] = "nope"
    with pytest.raises(InvalidMessage, match="code"):
        parse(env)
