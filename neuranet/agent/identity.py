"""A device's Ed25519 identity and enrolment record, kept in its data dir (mode 0600)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from neuranet.net.tls import DeviceCredentials

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"  # the direct-link certificate, derived from the key (public)
DEVICE_FILE = "device.json"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


@dataclass
class Identity:
    key: Ed25519PrivateKey
    data_dir: Path
    device_id: str | None = None
    server_url: str | None = None

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "Identity":
        key_path = data_dir / KEY_FILE
        if key_path.exists():
            mode = key_path.stat().st_mode & 0o777
            if mode & 0o077:
                raise PermissionError(f"{key_path} is readable by others (mode {mode:o}); run chmod 600 on it")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{key_path} does not hold an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            _write_private(key_path, pem)
        ident = cls(key, data_dir)
        device_path = data_dir / DEVICE_FILE
        if device_path.exists():
            record = json.loads(device_path.read_text())
            ident.device_id, ident.server_url = record.get("device_id"), record.get("server_url")
        return ident

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def tls_credentials(self) -> DeviceCredentials:
        """The certificate this device presents on direct links, made from its key."""
        return DeviceCredentials.for_key(self.key, self.data_dir / KEY_FILE, self.data_dir / CERT_FILE)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def save_enrolment(self, device_id: str, server_url: str) -> None:
        self.device_id, self.server_url = device_id, server_url
        _write_private(self.data_dir / DEVICE_FILE, json.dumps({"device_id": device_id, "server_url": server_url}).encode())
