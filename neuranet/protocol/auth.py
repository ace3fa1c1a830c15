"""What a device signs to prove it holds its enrolled key."""

from __future__ import annotations


def auth_payload(nonce: bytes, device_id: str) -> bytes:
    """Domain-separated challenge bytes, so a signature is useless for anything else."""
    return b"neuranet-auth-v1\x00" + nonce + device_id.encode()
