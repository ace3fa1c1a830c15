"""Pure encode/decode of NeuraNet messages and tensor frames (sans-I/O)."""

from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame
from neuranet.protocol.errors import ProtocolError
from neuranet.protocol.messages import MESSAGE_TYPES, Message, parse
from neuranet.protocol.tensors import decode_tensor, encode_tensor

__all__ = [
    "PROTOCOL_VERSION",
    "Envelope",
    "decode_frame",
    "encode_frame",
    "ProtocolError",
    "MESSAGE_TYPES",
    "Message",
    "parse",
    "decode_tensor",
    "encode_tensor",
]
