"""What each side signs in the handshake, and the fingerprints users compare and pin.

The device signs the server's challenge to prove it holds its enrolled key; the coordinator signs
the agent's nonce to prove it is the coordinator the device enrolled with (so an impostor answering
at its address cannot instruct the device).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def auth_payload(nonce: bytes, device_id: str) -> bytes:
    """Domain-separated challenge bytes, so a signature is useless for anything else."""
    return b"neuranet-auth-v1\x00" + nonce + device_id.encode()


def coordinator_payload(agent_nonce: bytes, nonce: bytes, device_id: str) -> bytes:
    """What the coordinator signs: the agent's fresh nonce (no replay), bound to this challenge."""
    return b"neuranet-coordinator-v1\x00" + agent_nonce + nonce + device_id.encode()


def coordinator_signature_valid(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(data: bytes) -> str:
    """``SHA256:<base64>`` of a certificate (DER) or a raw public key, as SSH shows them."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


_HEX = re.compile(r"[0-9a-fA-F]{2}(:?[0-9a-fA-F]{2}){31}")


def parse_fingerprint(text: str) -> str:
    """The canonical form of a fingerprint given as ``SHA256:<base64>`` or as 64 hex digits
    (``openssl x509 -fingerprint -sha256`` prints those, with colons); ValueError otherwise."""
    value = text.strip()
    if value.lower().startswith("sha256 fingerprint="):
        value = value.split("=", 1)[1]
    if _HEX.fullmatch(value):
        digest = bytes.fromhex(value.replace(":", ""))
    else:
        if value[:7].upper() == "SHA256:":
            value = value[7:]
        try:
            digest = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            digest = b""
    if len(digest) != 32:
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (SHA256:<base64> as `neuranet server` prints it, "
                         "or 64 hex digits)")
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
