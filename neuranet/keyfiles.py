"""Private files in a data dir (keys, enrolment records): written atomically with mode 0600, and
refused when other users can read them."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by this user only; a crash mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def read_private(path: Path) -> bytes:
    """Read a file that must not be readable by others (a leaked key is a stolen identity)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); run chmod 600 on it")
    return path.read_bytes()


def pem_private_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_or_create_ed25519(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key kept at ``path``, made (mode 0600) on first use."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_private(path, pem_private_key(key))
        return key
    try:
        key = serialization.load_pem_private_key(read_private(path), password=None)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key
