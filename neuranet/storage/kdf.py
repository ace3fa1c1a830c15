"""Keys from passphrases: scrypt (the default) or PBKDF2-SHA256, their parameters stored with each file.

The parameters travel with the file's record, so the cost can be raised for new files while old
ones still open with what they were written with. Parameters read back from a record are bounded
(`MAX_KDF_MEMORY`, `MAX_PBKDF2_ITERATIONS`): a record from a hostile coordinator can make a
derivation fail, never exhaust this machine. PBKDF2 is there for browsers: Web Crypto offers it and
has no scrypt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

KEY_BYTES = 32
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1  # 128 MiB and ~0.5 s per derivation (OWASP 2023 minimum)
PBKDF2_ITERATIONS = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256
MAX_KDF_MEMORY = 2 ** 30  # what a stored scrypt setting may ask of this machine: 8 x the default's cost
MAX_PBKDF2_ITERATIONS = 8 * PBKDF2_ITERATIONS  # likewise 8 x the default's work (seconds, not minutes)
SCRYPT, PBKDF2 = "scrypt", "pbkdf2-sha256"


class KdfError(ValueError):
    """Key derivation parameters that are malformed, unknown or too costly to honour."""


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is not int:  # JSON true/1.0/"8" are not parameters
        raise KdfError(f"key derivation parameter {key!r} must be an integer, got {value!r}"[:200])
    return value


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt (RFC 7914): memory-hard; costs about 128·n·r bytes and n·r·p work."""

    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise KdfError(f"scrypt n must be a power of two of at least 2, got {self.n}")
        if not 1 <= self.r <= 64 or not 1 <= self.p <= 64:
            raise KdfError(f"scrypt r and p must be in 1..64, got r={self.r}, p={self.p}")
        if 128 * self.n * self.r * self.p > MAX_KDF_MEMORY:  # p lanes run one after another here
            raise KdfError(f"scrypt n={self.n}, r={self.r}, p={self.p} asks for more than "
                           f"{MAX_KDF_MEMORY // 2 ** 20} MiB of memory or the work of that; refused")

    @property
    def memory(self) -> int:
        """Bytes scrypt needs: the n·r blocks of 128 bytes, plus the p lanes' buffers."""
        return 128 * self.r * (self.n + self.p + 2)

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        # OpenSSL's default memory cap is 32 MiB, below n=2^17; give it exactly what these need.
        return hashlib.scrypt(passphrase, salt=salt, n=self.n, r=self.r, p=self.p,
                              maxmem=self.memory + 2 ** 20, dklen=KEY_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {"name": SCRYPT, "n": self.n, "r": self.r, "p": self.p}


@dataclass(frozen=True, slots=True)
class Pbkdf2Params:
    """PBKDF2-HMAC-SHA256: not memory-hard, so it needs many iterations; what a browser can do."""

    iterations: int = PBKDF2_ITERATIONS

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= MAX_PBKDF2_ITERATIONS:
            raise KdfError(f"PBKDF2 iterations must be in 1..{MAX_PBKDF2_ITERATIONS}, got {self.iterations}")

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", passphrase, salt, self.iterations, KEY_BYTES)

    def to_json(self) -> dict[str, Any]:
        return {"name": PBKDF2, "iterations": self.iterations}


KdfParams = ScryptParams | Pbkdf2Params


def parse_kdf(data: Any) -> KdfParams:
    """Stored parameters back to a KDF; `KdfError` if they are malformed, unknown or too costly.

    A record without a name is scrypt (how the first sealed files were written)."""
    if not isinstance(data, dict):
        raise KdfError(f"key derivation parameters must be an object, got {type(data).__name__}")
    name = data.get("name", SCRYPT)
    if name == SCRYPT:
        _only(data, {"name", "n", "r", "p"})
        return ScryptParams(_int(data, "n"), _int(data, "r"), _int(data, "p"))
    if name == PBKDF2:
        _only(data, {"name", "iterations"})
        return Pbkdf2Params(_int(data, "iterations"))
    raise KdfError(f"unknown key derivation {str(name)[:40]!r} (known: {SCRYPT}, {PBKDF2})")


def _only(data: dict[str, Any], known: set[str]) -> None:
    extra = sorted(str(k) for k in set(data) - known)
    if extra:
        raise KdfError(f"unknown key derivation parameter {extra[0][:40]!r}")
