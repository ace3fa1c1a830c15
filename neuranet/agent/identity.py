"""A device's Ed25519 identity and enrolment record, kept in its data dir (mode 0600).

The record also holds what the device pinned of its coordinator at enrolment: the coordinator's
identity key (always) and its TLS certificate's fingerprint (when no CA vouches for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from neuranet.keyfiles import load_or_create_ed25519, write_private
from neuranet.net.tls import DeviceCredentials

KEY_FILE = "identity.key"
CERT_FILE = "identity.crt"  # the direct-link certificate, derived from the key (public)
DEVICE_FILE = "device.json"


@dataclass
class Identity:
    key: Ed25519PrivateKey
    data_dir: Path
    device_id: str | None = None
    server_url: str | None = None
    server_key: bytes | None = None  # the coordinator's Ed25519 public key, pinned at enrolment
    tls_fingerprint: str | None = None  # its certificate's, pinned when no CA vouches for it

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "Identity":
        ident = cls(load_or_create_ed25519(data_dir / KEY_FILE), data_dir)
        device_path = data_dir / DEVICE_FILE
        if device_path.exists():
            try:
                record = json.loads(device_path.read_text())
                ident.device_id, ident.server_url = record.get("device_id"), record.get("server_url")
                ident.server_key = bytes.fromhex(record["server_key"]) if record.get("server_key") else None
                ident.tls_fingerprint = record.get("tls_fingerprint")
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"{device_path} is not a valid enrolment record ({exc}); "
                                 "delete it and enrol again with --join-token") from None
        return ident

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def tls_credentials(self) -> DeviceCredentials:
        """The certificate this device presents on direct links, made from its key."""
        return DeviceCredentials.for_key(self.key, self.data_dir / KEY_FILE, self.data_dir / CERT_FILE)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def save_enrolment(self, device_id: str, server_url: str, server_key: bytes | None = None,
                       tls_fingerprint: str | None = None) -> None:
        self.device_id, self.server_url = device_id, server_url
        self.server_key, self.tls_fingerprint = server_key, tls_fingerprint
        record = {"device_id": device_id, "server_url": server_url,
                  "server_key": server_key.hex() if server_key else None, "tls_fingerprint": tls_fingerprint}
        write_private(self.data_dir / DEVICE_FILE, json.dumps(record).encode())
