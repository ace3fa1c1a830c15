"""TLS 1.3 for direct links: a certificate made from the device's Ed25519 key, and contexts pinned to one peer.

As in Syncthing, a device's certificate is self-signed with its enrolled key, so the certificate *is*
the identity: the coordinator checks that the certificate a device reports carries its enrolled key and
hands it to the device's link peers in the grant. Each side of a link then trusts exactly that one
certificate (it is the context's only trust anchor) and, after the handshake and before any data,
checks once more that the key the peer proved possession of (TLS 1.3 CertificateVerify) is the granted
peer's key. An impostor without the device's private key cannot complete the handshake on either side.

The certificate is deterministic (Ed25519 signatures are, and every field derives from the key), so
it never needs renewing or caching: it is rebuilt from the key and written next to it because Python's
``ssl`` loads certificates only from files.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from neuranet.protocol.errors import AuthenticationFailed
ED25519_KEY_BYTES = 32
_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "neuranet device")])
# Fixed, so the certificate depends on the key alone; a device's key is revoked at the coordinator,
# not by expiry (9999-12-31 is RFC 5280's "no well-defined expiration").
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def device_certificate(key: Ed25519PrivateKey) -> bytes:
    """The device's self-signed X.509 certificate (DER), the same bytes every time for one key."""
    public = key.public_key()
    serial = int.from_bytes(hashlib.sha256(raw_public_key(public)).digest()[:16], "big") >> 1  # positive, < 2^127
    builder = (
        x509.CertificateBuilder()
        .subject_name(_NAME).issuer_name(_NAME).public_key(public).serial_number(serial)
        .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    return builder.sign(key, None).public_bytes(serialization.Encoding.DER)


def certificate_key(cert: bytes) -> bytes:
    """The raw Ed25519 public key a DER certificate carries; AuthenticationFailed if it carries none."""
    try:
        public = x509.load_der_x509_certificate(cert).public_key()
    except ValueError as exc:
        raise AuthenticationFailed(f"not a valid X.509 certificate: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise AuthenticationFailed("a device certificate must carry an Ed25519 key")
    return raw_public_key(public)


@dataclass(frozen=True)
class DeviceCredentials:
    """What this device presents on direct links: its certificate and key, as files for ``ssl``."""

    cert: bytes  # DER, as reported to the coordinator
    cert_file: Path
    key_file: Path

    @classmethod
    def for_key(cls, key: Ed25519PrivateKey, key_file: Path, cert_file: Path) -> "DeviceCredentials":
        """Credentials for a key already stored (PEM, PKCS#8) at ``key_file``; writes ``cert_file``."""
        cert = device_certificate(key)
        pem = ssl.DER_cert_to_PEM_cert(cert).encode()
        if not cert_file.exists() or cert_file.read_bytes() != pem:
            tmp = cert_file.with_name(cert_file.name + ".tmp")
            tmp.write_bytes(pem)
            tmp.replace(cert_file)
        return cls(cert, cert_file, key_file)


@dataclass(frozen=True)
class PeerPin:
    """The link peer as the coordinator granted it: its enrolled key and its certificate."""

    key: bytes
    cert: bytes

    @property
    def usable(self) -> bool:
        """Whether a direct path may be tried: the grant named a certificate that carries the key."""
        if len(self.key) != ED25519_KEY_BYTES or not self.cert:
            return False
        try:
            return certificate_key(self.cert) == self.key
        except AuthenticationFailed:
            return False


def link_context(own: DeviceCredentials, peer: PeerPin, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context that presents ``own`` and accepts only ``peer``'s certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # devices have no host names; the pinned certificate is the identity
    ctx.verify_mode = ssl.CERT_REQUIRED  # on the listener: a client certificate is required too
    ctx.load_cert_chain(own.cert_file, own.key_file)
    ctx.load_verify_locations(cadata=peer.cert)  # the only trust anchor: no system CAs
    if server_side:
        ctx.num_tickets = 0  # one connection per link, never resumed
    return ctx


def check_peer(ssl_object: "ssl.SSLObject | ssl.SSLSocket | None", peer: PeerPin) -> None:
    """After the handshake: the peer proved the granted key, or AuthenticationFailed."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise AuthenticationFailed("the peer presented no certificate")
    if ssl_object.version() != "TLSv1.3":  # type: ignore[union-attr]
        raise AuthenticationFailed(f"direct links need TLS 1.3, the peer negotiated {ssl_object.version()}")  # type: ignore[union-attr]
    if certificate_key(der) != peer.key:
        raise AuthenticationFailed("the peer's certificate does not carry the granted device's key")
