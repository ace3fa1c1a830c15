"""Client-side encryption of file chunks: AES-256-GCM, key from a passphrase (scrypt) or a key file.

Each chunk is sealed on its own with a random 96-bit nonce and authenticated together with the
file's random id and the chunk's index (associated data), so a device can neither read a chunk nor
swap or reorder chunks without the reader noticing. Stored bytes are ``nonce || ciphertext+tag``.
The coordinator keeps only `Sealer.describe()` (algorithm, KDF parameters, salt, file id, and a
key check value): never the key or the passphrase.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

ALGORITHM = "aes-256-gcm"
NONCE = 12
TAG = 16
KEY_BYTES = 32
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1  # ~32 MiB and ~0.1 s per derivation
KEY_FILE_MIN = 32


class SealingError(ValueError):
    """Wrong passphrase or key, a tampered chunk, or unusable sealing parameters."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def derive_key(passphrase: str | None = None, key_file: Path | None = None, salt: bytes = b"",
               kdf: dict[str, Any] | None = None) -> bytes:
    """The 256-bit key: scrypt of the passphrase, or SHA-256 of the key file's bytes with the salt."""
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
    params = kdf or {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    try:
        return Scrypt(salt=salt, length=KEY_BYTES, n=int(params["n"]), r=int(params["r"]),
                      p=int(params["p"])).derive(passphrase.encode())
    except (KeyError, ValueError, TypeError) as e:
        raise SealingError(f"unusable key derivation parameters {params}: {e}") from e


class Sealer:
    """Seals and opens the chunks of one file."""

    def __init__(self, key: bytes, file_id: bytes, salt: bytes, kdf: dict[str, Any] | None) -> None:
        if len(key) != KEY_BYTES:
            raise SealingError(f"a key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._check = hmac.new(key, b"neuranet-key-check", hashlib.sha256).hexdigest()[:16]
        self.file_id, self.salt, self.kdf = file_id, salt, kdf

    @classmethod
    def new(cls, passphrase: str | None = None, key_file: Path | None = None) -> Sealer:
        """A sealer for a new file: fresh salt and file id."""
        salt, file_id = os.urandom(16), os.urandom(16)
        kdf = None if key_file is not None else {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        return cls(derive_key(passphrase, key_file, salt, kdf), file_id, salt, kdf)

    @classmethod
    def for_file(cls, description: dict[str, Any], passphrase: str | None = None,
                 key_file: Path | None = None) -> Sealer:
        """The sealer of a stored file, from its `describe()`; `SealingError` if the key is wrong."""
        try:
            if description["algorithm"] != ALGORITHM:
                raise SealingError(f"unknown encryption {description['algorithm']!r}")
            salt, file_id = _unb64(description["salt"]), _unb64(description["file_id"])
            kdf = description.get("kdf")
            check = description["key_check"]
        except (KeyError, TypeError, ValueError) as e:
            raise SealingError(f"malformed encryption parameters: {e}") from e
        if (kdf is None) != (key_file is not None):
            need = "a key file (--key-file)" if kdf is None else "a passphrase"
            raise SealingError(f"this file was encrypted with {need}")
        sealer = cls(derive_key(passphrase, key_file, salt, kdf), file_id, salt, kdf)
        if not hmac.compare_digest(sealer._check, str(check)):
            raise SealingError("wrong passphrase or key for this file")
        return sealer

    def describe(self) -> dict[str, Any]:
        """What the coordinator keeps: enough to re-derive the key from the secret, nothing more."""
        return {"algorithm": ALGORITHM, "salt": _b64(self.salt), "file_id": _b64(self.file_id),
                "kdf": self.kdf, "key_check": self._check}

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
