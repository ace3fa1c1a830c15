"""Pure encode/decode of NeuraNet messages and tensor frames (sans-I/O).

Tensor frames live in ``neuranet.protocol.tensors`` (it imports torch, which the
coordinator itself never needs).
"""

from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame
from neuranet.protocol.errors import ProtocolError
from neuranet.protocol.messages import MESSAGE_TYPES, Message, parse

__all__ = [
    "PROTOCOL_VERSION",
    "Envelope",
    "decode_frame",
    "encode_frame",
    "ProtocolError",
    "MESSAGE_TYPES",
    "Message",
    "parse",
]
