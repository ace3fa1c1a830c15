"""The coordinator's long-term identity and its own TLS certificate, both kept in its data dir.

The identity is an Ed25519 key (``coordinator.key``, mode 0600): agents pin its public key at
enrolment and, on every connection, make the coordinator sign a fresh nonce with it before they
accept any instruction. ``neuranet server --self-signed`` also makes a certificate (``tls/``), reused
on restart, whose fingerprint agents pin instead of trusting a CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from neuranet.keyfiles import load_or_create_ed25519, write_private
from neuranet.protocol.auth import coordinator_payload, fingerprint

KEY_FILE = "coordinator.key"
TLS_DIR = "tls"
CERT_DAYS = 10 * 365  # agents pin the certificate itself, so it should not need replacing


@dataclass(frozen=True)
class CoordinatorIdentity:
    key: Ed25519PrivateKey

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "CoordinatorIdentity":
        return cls(load_or_create_ed25519(data_dir / KEY_FILE))

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def prove(self, agent_nonce: bytes, nonce: bytes, device_id: str) -> bytes:
        """Sign the agent's nonce, bound to this challenge."""
        return self.key.sign(coordinator_payload(agent_nonce, nonce, device_id))


def _names(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    try:
        addr = ipaddress.ip_address(host)
        if not addr.is_unspecified and not addr.is_loopback:
            names.append(x509.IPAddress(addr))
    except ValueError:
        if host not in ("localhost", hostname):
            names.append(x509.DNSName(host))
    return names


def self_signed_certificate(data_dir: Path, host: str) -> tuple[Path, Path]:
    """``(cert, key)`` paths of this coordinator's self-signed certificate, made on first use."""
    cert_path, key_path = data_dir / TLS_DIR / "cert.pem", data_dir / TLS_DIR / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "neuranet coordinator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(host)), critical=False)
        # A CA of itself, so the CLI can trust exactly this certificate with --ca-cert.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def leaf_certificate(cert_path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (the one the server presents; the rest is its chain)."""
    try:
        return x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{cert_path} does not hold a PEM certificate: {exc}") from None


def certificate_fingerprint(cert_path: Path) -> str:
    return fingerprint(leaf_certificate(cert_path).public_bytes(serialization.Encoding.DER))


def agent_pin(tls_cert: Path | None, identity: CoordinatorIdentity) -> str | None:
    """What agents pass as ``--server-fingerprint``: the certificate's when it is self-signed (no CA
    vouches for it), the identity key's over plain HTTP, none for a CA-issued certificate (the CA
    checks it, and pinning it would break every agent at its next renewal)."""
    if tls_cert is None:
        return identity.fingerprint
    cert = leaf_certificate(tls_cert)
    return certificate_fingerprint(tls_cert) if cert.issuer == cert.subject else None
