"""Client-side encryption of files: AES-256-GCM per chunk plus a sealed manifest; key from a passphrase
(`neuranet.storage.kdf`) or a key file.

Each chunk is sealed on its own with a random 96-bit nonce and authenticated together with the
file's random id and the chunk's index (associated data), so a device can neither read a chunk nor
swap or reorder chunks without the reader noticing. Stored bytes are ``nonce || ciphertext+tag``.

What only the key holder may know about the file (its name, plaintext size, plaintext SHA-256 and
chunk count: `SealedFacts`) is sealed too, as the *sealed manifest*, under the same key with its own
associated data. The coordinator keeps `Sealer.describe()`: the algorithm, the salt and key
derivation parameters, the file id and the sealed manifest, i.e. nothing a holder of the
ciphertext does not see anyway. A wrong passphrase or key fails the sealed manifest's
authentication; the chunk count it holds catches chunks dropped from the record.

Two limits are inherent: GCM does not pad, so the ciphertext's size gives the plaintext's
(`SEALING_OVERHEAD` bytes less per chunk); and whoever holds the record can try passphrases offline
against the sealed manifest at the KDF's cost per guess (hence a high cost, and key files for
secrets that matter). Records written before the sealed manifest (format 1: plaintext size and
hash in the coordinator's record, a key-check value) still open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from neuranet.storage.kdf import KEY_BYTES, KdfError, KdfParams, ScryptParams, parse_kdf

ALGORITHM = "aes-256-gcm"
FORMAT = 2  # 1: key check and plaintext facts in the coordinator's record; 2: sealed manifest
NONCE = 12
TAG = 16
SEALING_OVERHEAD = NONCE + TAG  # stored bytes per chunk beyond its plaintext
KEY_FILE_MIN = 32
SALT_BYTES = 16
FILE_ID_BYTES = 16
SEALED_MANIFEST_MAX = 8192  # a name of 1024 characters is at most 4 KiB of UTF-8
_MANIFEST_AAD = b"neuranet-sealed-manifest\0"
_V2_KEYS = {"version", "algorithm", "salt", "file_id", "kdf", "manifest"}
_V1_KEYS = {"algorithm", "salt", "file_id", "kdf", "key_check"}


class SealingError(ValueError):
    """Wrong passphrase or key, a tampered chunk, or unusable sealing parameters."""


WRONG_SECRET = "wrong passphrase or key for this file (or its record was altered)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(data: dict[str, Any], key: str, least: int, most: int) -> bytes:
    text = data.get(key)
    if not isinstance(text, str) or len(text) > 4 * (most + 2) // 3 + 4:
        raise SealingError(f"malformed encryption parameters: {key!r} must be base64 of {least} to {most} bytes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        raw = b""
    if not least <= len(raw) <= most:
        raise SealingError(f"malformed encryption parameters: {key!r} must be base64 of {least} to {most} bytes")
    return raw


@dataclass(frozen=True, slots=True)
class SealedFacts:
    """What a sealed file's manifest holds: known to the key holder only."""

    name: str
    size: int  # plaintext bytes
    sha256: str  # of the whole plaintext, checked after a download
    chunks: int

    def to_bytes(self) -> bytes:
        return json.dumps({"name": self.name, "size": self.size, "sha256": self.sha256, "chunks": self.chunks},
                          ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SealedFacts:
        try:
            data = json.loads(raw)
            facts = cls(data["name"], data["size"], data["sha256"], data["chunks"])
        except (ValueError, KeyError, TypeError) as e:
            raise SealingError(f"the sealed manifest is malformed: {e}") from None
        if not (isinstance(facts.name, str) and type(facts.size) is int and type(facts.chunks) is int
                and isinstance(facts.sha256, str)):
            raise SealingError("the sealed manifest is malformed")
        return facts


@dataclass(frozen=True, slots=True)
class Description:
    """A parsed `Sealer.describe()`: what the coordinator keeps about how a file is sealed."""

    version: int
    salt: bytes
    file_id: bytes
    kdf: KdfParams | None  # None: a key file
    manifest: bytes  # the sealed manifest (format 2; empty in format 1)
    key_check: str = ""  # format 1 only


def parse_description(data: Any, legacy: bool = True) -> Description:
    """A sealing record back to its parts; `SealingError` (what is wrong) if it is malformed.
    ``legacy=False`` refuses format 1, which the coordinator no longer records."""
    if not isinstance(data, dict):
        raise SealingError("malformed encryption parameters: not an object")
    version = data.get("version", 1 if "key_check" in data else None)
    if type(version) is not int or version not in (1, FORMAT):
        raise SealingError(f"unknown encryption format {str(version)[:20]!r} (this neuranet reads 1 and {FORMAT})")
    if version == 1 and not legacy:
        raise SealingError("this client seals files in an old format that gives the coordinator the file's size, "
                           "hash and a key check; update neuranet")
    extra = sorted(str(k) for k in set(data) - (_V1_KEYS if version == 1 else _V2_KEYS))
    if extra:
        raise SealingError(f"malformed encryption parameters: unknown field {extra[0][:40]!r}")
    if data.get("algorithm") != ALGORITHM:
        raise SealingError(f"unknown encryption {str(data.get('algorithm'))[:40]!r} (this neuranet knows {ALGORITHM})")
    salt = _unb64(data, "salt", SALT_BYTES, 64)
    file_id = _unb64(data, "file_id", FILE_ID_BYTES, FILE_ID_BYTES)
    try:
        kdf = None if data.get("kdf") is None else parse_kdf(data["kdf"])
    except KdfError as e:
        raise SealingError(str(e)) from None
    if version == 1:
        check = data.get("key_check")
        if not isinstance(check, str):
            raise SealingError("malformed encryption parameters: no key check")
        return Description(1, salt, file_id, kdf, b"", check)
    manifest = _unb64(data, "manifest", SEALING_OVERHEAD + 2, SEALED_MANIFEST_MAX)
    return Description(FORMAT, salt, file_id, kdf, manifest)


def derive_key(passphrase: str | None = None, key_file: Path | None = None, salt: bytes = b"",
               kdf: KdfParams | None = None) -> bytes:
    """The 256-bit key: ``kdf`` of the passphrase, or SHA-256 of the key file's bytes with the salt."""
    if (passphrase is None) == (key_file is None):
        raise SealingError("give exactly one of a passphrase or a key file")
    if key_file is not None:
        try:
            material = Path(key_file).read_bytes()
        except OSError as e:
            raise SealingError(f"cannot read the key file {key_file}: {e.strerror}") from e
        if len(material) < KEY_FILE_MIN:
            raise SealingError(f"key file {key_file} holds {len(material)} bytes; at least {KEY_FILE_MIN} random "
                               "bytes are needed (e.g. `head -c 32 /dev/urandom > key`)")
        return hashlib.sha256(b"neuranet-key-file\0" + salt + material).digest()
    if not passphrase:
        raise SealingError("the passphrase is empty")
    return (kdf or ScryptParams()).derive(passphrase.encode(), salt)


class Sealer:
    """Seals and opens the chunks and the manifest of one file."""

    def __init__(self, key: bytes, file_id: bytes, salt: bytes, kdf: KdfParams | None) -> None:
        if len(key) != KEY_BYTES:
            raise SealingError(f"a key is {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._aead = AESGCM(key)
        self.file_id, self.salt, self.kdf = file_id, salt, kdf
        self.facts: SealedFacts | None = None  # of a stored file, from its sealed manifest (format 2)

    @classmethod
    def new(cls, passphrase: str | None = None, key_file: Path | None = None,
            kdf: KdfParams | None = None) -> Sealer:
        """A sealer for a new file: fresh salt and file id; ``kdf`` defaults to scrypt at today's cost."""
        salt, file_id = os.urandom(SALT_BYTES), os.urandom(FILE_ID_BYTES)
        kdf = None if key_file is not None else (kdf or ScryptParams())
        return cls(derive_key(passphrase, key_file, salt, kdf), file_id, salt, kdf)

    @classmethod
    def for_file(cls, description: dict[str, Any], passphrase: str | None = None,
                 key_file: Path | None = None) -> Sealer:
        """The sealer of a stored file, from its `describe()`, with its `facts`; `SealingError` if the
        passphrase or key is wrong."""
        d = parse_description(description)
        if (d.kdf is None) != (key_file is not None):
            need = "a key file (--key-file)" if d.kdf is None else "a passphrase"
            raise SealingError(f"this file was encrypted with {need}")
        sealer = cls(derive_key(passphrase, key_file, d.salt, d.kdf), d.file_id, d.salt, d.kdf)
        if d.version == 1:
            check = hmac.new(sealer._key, b"neuranet-key-check", hashlib.sha256).hexdigest()[:16]
            if not hmac.compare_digest(check, d.key_check):
                raise SealingError(WRONG_SECRET)
            return sealer
        try:
            raw = sealer._aead.decrypt(d.manifest[:NONCE], d.manifest[NONCE:], _MANIFEST_AAD + d.file_id)
        except InvalidTag:
            raise SealingError(WRONG_SECRET) from None
        sealer.facts = SealedFacts.from_bytes(raw)
        return sealer

    def describe(self, facts: SealedFacts) -> dict[str, Any]:
        """What the coordinator keeps: how to re-derive the key from the secret, and ``facts`` sealed."""
        nonce = os.urandom(NONCE)
        manifest = nonce + self._aead.encrypt(nonce, facts.to_bytes(), _MANIFEST_AAD + self.file_id)
        if len(manifest) > SEALED_MANIFEST_MAX:
            raise SealingError(f"the file's name is too long to seal ({len(facts.name)} characters)")
        return {"version": FORMAT, "algorithm": ALGORITHM, "salt": _b64(self.salt), "file_id": _b64(self.file_id),
                "kdf": self.kdf.to_json() if self.kdf is not None else None, "manifest": _b64(manifest)}

    def _aad(self, index: int) -> bytes:
        return self.file_id + index.to_bytes(8, "big")

    def seal(self, index: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, self._aad(index))

    def open(self, index: int, sealed: bytes) -> bytes:
        if len(sealed) < NONCE + TAG:
            raise SealingError(f"chunk {index} is too short to be sealed ({len(sealed)} bytes)")
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], self._aad(index))
        except InvalidTag:
            raise SealingError(f"chunk {index} failed authentication (tampered, reordered or wrong key)") from None
