"""Client-side encryption of files: the sealing format and its key derivation (pure), and what the
coordinator records about an encrypted file (a real server and agent)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fabric_helpers import free_port
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric
from neuranet.storage.chunks import split
from neuranet.storage.kdf import MAX_KDF_MEMORY, PBKDF2, PBKDF2_ITERATIONS, Pbkdf2Params, ScryptParams, parse_kdf
from neuranet.storage.sealing import (
    SEALING_OVERHEAD,
    SealedFacts,
    Sealer,
    SealingError,
    parse_description,
)
from neuranet.storage.transfer import TransferError, download, plaintext_size, upload

FAST = ScryptParams(n=2 ** 10)  # stored with each file, so tests may choose a cheap cost
FACTS = SealedFacts("weights.bin", 14, "ab" * 32, 1)

# Written by the first sealing format (commit d29f760), passphrase "legacy pass": its record held a
# key check, and the plaintext's hash and size sat next to it in the coordinator's record.
LEGACY = {"algorithm": "aes-256-gcm", "salt": "AAECAwQFBgcICQoLDA0ODw==", "file_id": "EBESExQVFhcYGRobHB0eHw==",
          "kdf": {"name": "scrypt", "n": 1024, "r": 8, "p": 1}, "key_check": "c16a048e711bba5a"}
LEGACY_CHUNKS = ["KBDzllodjcwURcOYDaCbrGWHccoIc7G20XecR64zVb6D97Hg4DxXuObpNRPgYg0wB5Uun8cf",
                 "Y7117ysIVBmXrFUoXj/weKPgn+sJPWNcwvcIM2nS1dvq9YSSUuWC"]


# -- the format, pure ---------------------------------------------------------------------------------


def test_new_files_use_scrypt_at_2_17_and_store_it() -> None:
    assert ScryptParams() == ScryptParams(2 ** 17, 8, 1) and ScryptParams().memory >= 128 * 2 ** 20
    sealer = Sealer.new(passphrase="the default")  # derives at 128 MiB: above OpenSSL's default cap
    assert sealer.describe(FACTS)["kdf"] == {"name": "scrypt", "n": 2 ** 17, "r": 8, "p": 1}


def test_the_record_holds_only_what_the_ciphertext_shows() -> None:
    data = b"secret weights" * 100
    sealer = Sealer.new(passphrase="correct horse", kdf=FAST)
    parts = list(split(io.BytesIO(data), seal=sealer.seal, size=256))
    facts = SealedFacts("w.bin", len(data), hashlib.sha256(data).hexdigest(), len(parts))
    record = sealer.describe(facts)
    assert set(record) == {"version", "algorithm", "salt", "file_id", "kdf", "manifest"}
    text = json.dumps(record)
    assert facts.sha256 not in text and str(len(data)) not in text and "correct horse" not in text
    assert all(b"secret" not in p for _, p in parts)
    opened = Sealer.for_file(record, passphrase="correct horse")
    assert opened.facts == facts
    assert b"".join(opened.open(i, p) for i, (_, p) in enumerate(parts)) == data


def test_a_wrong_passphrase_fails_the_sealed_manifest() -> None:
    record = Sealer.new(passphrase="pw", kdf=FAST).describe(FACTS)
    with pytest.raises(SealingError, match="wrong passphrase or key"):
        Sealer.for_file(record, passphrase="PW")
    # So does a record the coordinator altered: the manifest is authenticated with the file id.
    other = Sealer.new(passphrase="pw", kdf=FAST).describe(FACTS)
    with pytest.raises(SealingError, match="wrong passphrase or key"):
        Sealer.for_file(record | {"manifest": other["manifest"]}, passphrase="pw")


def test_kdf_parameters_are_stored_and_used() -> None:
    sealer = Sealer.new(passphrase="pw", kdf=ScryptParams(n=2 ** 11, r=4, p=2))
    record = sealer.describe(FACTS)
    assert record["kdf"] == {"name": "scrypt", "n": 2 ** 11, "r": 4, "p": 2}
    assert Sealer.for_file(record, passphrase="pw").facts == FACTS
    for changed in ({"n": 2 ** 10}, {"r": 8}, {"p": 1}):  # other parameters, another key
        with pytest.raises(SealingError, match="wrong passphrase"):
            Sealer.for_file(record | {"kdf": record["kdf"] | changed}, passphrase="pw")


def test_pbkdf2_files_follow_a_recipe_a_browser_can_repeat() -> None:
    """PBKDF2-SHA256 (what Web Crypto offers) as the stored KDF; the record and a chunk open with
    nothing but the documented steps."""
    sealer = Sealer.new(passphrase="from a browser", kdf=Pbkdf2Params(iterations=1000))
    record, chunk = sealer.describe(FACTS), sealer.seal(0, b"first chunk")
    assert record["kdf"] == {"name": PBKDF2, "iterations": 1000}
    salt, file_id = base64.b64decode(record["salt"]), base64.b64decode(record["file_id"])
    key = hashlib.pbkdf2_hmac("sha256", b"from a browser", salt, 1000, 32)
    manifest = base64.b64decode(record["manifest"])
    aead = AESGCM(key)
    assert json.loads(aead.decrypt(manifest[:12], manifest[12:], b"neuranet-sealed-manifest\0" + file_id)) == {
        "name": FACTS.name, "size": FACTS.size, "sha256": FACTS.sha256, "chunks": FACTS.chunks}
    assert aead.decrypt(chunk[:12], chunk[12:], file_id + (0).to_bytes(8, "big")) == b"first chunk"
    assert Sealer.for_file(record, passphrase="from a browser").open(0, chunk) == b"first chunk"


@pytest.mark.parametrize("kdf, why", [
    ({"name": "scrypt", "n": 2 ** 30, "r": 8, "p": 1}, f"more than {MAX_KDF_MEMORY // 2 ** 20} MiB"),
    ({"name": "scrypt", "n": 2 ** 17, "r": 8, "p": 64}, "more than"),
    ({"name": "scrypt", "n": 3000, "r": 8, "p": 1}, "power of two"),
    ({"name": "scrypt", "n": 1024, "r": 0, "p": 1}, "r and p"),
    ({"name": "scrypt", "n": True, "r": 8, "p": 1}, "integer"),
    ({"name": "scrypt", "n": "1024", "r": 8, "p": 1}, "integer"),
    ({"name": "scrypt", "n": 1024, "r": 8, "p": 1, "x": 1}, "unknown key derivation parameter"),
    ({"name": "argon2"}, "unknown key derivation"),
    ({"name": PBKDF2, "iterations": 0}, "iterations"),
    ({"name": PBKDF2, "iterations": 8 * PBKDF2_ITERATIONS + 1}, "iterations"),  # a hostile record's minutes of work
    ([1024, 8, 1], "must be an object"),
])
def test_hostile_kdf_parameters_are_refused_before_any_work(kdf: object, why: str) -> None:
    record = Sealer.new(passphrase="pw", kdf=FAST).describe(FACTS) | {"kdf": kdf}
    started = time.monotonic()
    with pytest.raises(SealingError, match=why):
        Sealer.for_file(record, passphrase="pw")
    assert time.monotonic() - started < 5  # refused, not attempted
    with pytest.raises(ValueError):
        parse_kdf(kdf)


def test_files_sealed_in_the_first_format_still_open() -> None:
    sealer = Sealer.for_file(LEGACY, passphrase="legacy pass")
    assert sealer.facts is None  # their facts are in the record
    chunks = [base64.b64decode(c) for c in LEGACY_CHUNKS]
    assert b"".join(sealer.open(i, c) for i, c in enumerate(chunks)) == b"sealed by the first format, chunk two"
    with pytest.raises(SealingError, match="wrong passphrase or key"):
        Sealer.for_file(LEGACY, passphrase="legacy Pass")
    with pytest.raises(SealingError, match="old format"):  # but the coordinator records them no more
        parse_description(LEGACY, legacy=False)


@pytest.mark.parametrize("change, why", [
    ({"key_check": "c16a048e711bba5a"}, "unknown field 'key_check'"),
    ({"version": 3}, "unknown encryption format"),
    ({"version": True}, "unknown encryption format"),
    ({"algorithm": "rot13"}, "unknown encryption"),
    ({"salt": "not base64!"}, "'salt' must be base64"),
    ({"salt": base64.b64encode(b"short").decode()}, "'salt' must be base64 of 16"),
    ({"file_id": None}, "'file_id' must be base64"),
    ({"manifest": base64.b64encode(b"x" * 10).decode()}, "'manifest' must be base64"),
    ({"manifest": "A" * 100_000}, "'manifest' must be base64"),
])
def test_malformed_records_say_what_is_wrong(change: dict, why: str) -> None:
    record = Sealer.new(passphrase="pw", kdf=FAST).describe(FACTS)
    with pytest.raises(SealingError, match=why):
        parse_description(record | change)
    with pytest.raises(SealingError, match="not an object"):
        parse_description(["version", 2])


def test_sealing_catches_tampering_reordering_and_bad_key_files(tmp_path: Path) -> None:
    sealer = Sealer.new(passphrase="pw", kdf=FAST)
    a, b = sealer.seal(0, b"first"), sealer.seal(1, b"second")
    with pytest.raises(SealingError, match="failed authentication"):
        sealer.open(0, a[:-1] + bytes([a[-1] ^ 1]))
    with pytest.raises(SealingError, match="failed authentication"):
        sealer.open(0, b)  # chunk 1 presented as chunk 0
    with pytest.raises(SealingError, match="too short"):
        sealer.open(0, b"x")
    assert sealer.seal(0, b"first") != a  # a fresh nonce each time
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    with pytest.raises(SealingError, match="at least 32"):
        Sealer.new(key_file=short)
    with pytest.raises(SealingError, match="cannot read"):
        Sealer.new(key_file=tmp_path / "missing.key")
    key = tmp_path / "good.key"
    key.write_bytes(bytes(range(32)))
    by_file = Sealer.new(key_file=key)
    record, sealed = by_file.describe(FACTS), by_file.seal(0, b"data")
    assert record["kdf"] is None
    assert Sealer.for_file(record, key_file=key).open(0, sealed) == b"data"
    other = tmp_path / "other.key"
    other.write_bytes(bytes(range(1, 33)))
    with pytest.raises(SealingError, match="wrong passphrase or key"):
        Sealer.for_file(record, key_file=other)
    with pytest.raises(SealingError, match="encrypted with a key file"):
        Sealer.for_file(record, passphrase="pw")
    with pytest.raises(SealingError, match="exactly one"):
        Sealer.new()
    with pytest.raises(SealingError, match="empty"):
        Sealer.new(passphrase="")


# -- what the coordinator records: a real server and agent ---------------------------------------------


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("sealing")) as f:
        f.start_server(port=free_port())
        f.start_agent("keeper", extra=["--no-measure", "--storage", "16M"])
        f.wait_online(["keeper"])
        yield f


def _file_row(fabric: LocalFabric, name: str) -> dict:
    with sqlite3.connect(f"file:{fabric.server_dir / 'neuranet.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()
        chunks = db.execute("SELECT size FROM file_chunks WHERE file_id = ? ORDER BY idx", (row["id"],)).fetchall()
    return dict(row) | {"chunk_sizes": [c["size"] for c in chunks]}


@pytest.mark.slow
def test_the_coordinator_records_no_plaintext_facts_of_an_encrypted_file(fabric: LocalFabric,
                                                                         tmp_path: Path) -> None:
    data = bytes(range(256)) * 3000 + b"tail"  # 768,004 bytes: two chunks of 512 KiB
    plain_sha = hashlib.sha256(data).hexdigest()
    with fabric.client() as c:
        out = upload(c, io.BytesIO(data), "sealed.bin", 1, Sealer.new(passphrase="hunter2", kdf=FAST),
                     chunk_size=2 ** 19)
        assert out["encrypted"] and out["chunks"] == 2 and out["plaintext_size"] == len(data)
        row, view = _file_row(fabric, "sealed.bin"), c.file_info("sealed.bin")
        listing = c.files()
        for seen in (row, view, listing):
            text = json.dumps(seen, default=str)
            assert plain_sha not in text and "key_check" not in text and str(len(data)) not in text
        # Size and hash are the ciphertext's, as a device holding the chunks sees them.
        ciphertext = b"".join(c.get_chunk(ch["id"]) for ch in view["chunk_list"])
        assert row["sha256"] == view["sha256"] == hashlib.sha256(ciphertext).hexdigest()
        assert row["size"] == view["size"] == sum(row["chunk_sizes"]) == len(ciphertext)
        assert len(ciphertext) == len(data) + 2 * SEALING_OVERHEAD and plaintext_size(view) == len(data)
        assert json.loads(row["sealing"])["kdf"] == FAST.to_json()

        target = tmp_path / "sealed.out"
        download(c, "sealed.bin", target, lambda s: Sealer.for_file(s, passphrase="hunter2"))
        assert target.read_bytes() == data
        with pytest.raises(SealingError, match="wrong passphrase or key"):
            download(c, "sealed.bin", tmp_path / "nope", lambda s: Sealer.for_file(s, passphrase="hunter3"))
        assert not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_the_coordinator_refuses_sealed_records_that_leak_or_do_not_add_up(fabric: LocalFabric) -> None:
    sealer = Sealer.new(passphrase="pw", kdf=FAST)
    with fabric.client() as c:
        chunk = sealer.seal(0, b"x" * 100)
        ref = {"id": hashlib.sha256(chunk).hexdigest(), "size": len(chunk)}
        c.put_chunk(ref["id"], chunk, 1)
        good = {"name": "checked.bin", "size": len(chunk), "sha256": ref["id"], "chunks": [ref], "replicas": 1,
                "sealing": sealer.describe(SealedFacts("checked.bin", 100, "cd" * 32, 1))}
        refused = {
            "unknown field 'key_check'": good | {"sealing": good["sealing"] | {"key_check": "00" * 8}},
            "old format": good | {"sealing": LEGACY},
            "hold 128 bytes, not the file's 1073741824": good | {"size": 2 ** 30},
            "hold 0 bytes, not the file's 1000": good | {"size": 1000, "chunks": []},
            "a sealed chunk holds at least 29": good | {"size": 20, "chunks": [{"id": "e" * 64, "size": 20}]},
            "should be a valid string": good | {"sha256": None},
            "more than": good | {"sealing": good["sealing"] | {"kdf": {"name": "scrypt", "n": 2 ** 40, "r": 8,
                                                                          "p": 1}}},
        }
        for why, body in refused.items():
            with pytest.raises(ClientError, match="422") as err:
                c.request("POST", "/api/v1/files", json=body)  # what the server refuses, sent as is
            assert why in str(err.value), (why, str(err.value))
        with pytest.raises(ClientError, match="404"):
            c.file_info("checked.bin")  # nothing half-made
        assert c.commit_file(good)["encrypted"]


class TamperingCoordinator:
    """A coordinator that lies about a file's record (the chunks it serves are the real ones)."""

    def __init__(self, client, alter) -> None:
        self.client, self.alter = client, alter

    def file_info(self, name: str) -> dict:
        return self.alter(self.client.file_info(name))

    def get_chunk(self, chunk: str) -> bytes:
        return self.client.get_chunk(chunk)


@pytest.mark.slow
def test_a_download_checks_the_record_against_the_sealed_manifest(fabric: LocalFabric, tmp_path: Path) -> None:
    data = b"three chunks, the last one short" * 1000
    opener = lambda s: Sealer.for_file(s, passphrase="pw")  # noqa: E731
    with fabric.client() as c:
        for name in ("mine.bin", "other.bin"):
            upload(c, io.BytesIO(data), name, 1, Sealer.new(passphrase="pw", kdf=FAST), chunk_size=12_000)
        other = c.file_info("other.bin")
        lies = {
            "lists 2 chunk": lambda v: v | {"chunk_list": v["chunk_list"][:-1]},
            "stored bytes do not match": lambda v: v | {"sha256": "0" * 64},
            "answered for 'mine.bin' with the sealed file 'other.bin'": lambda v: other,
        }
        for why, alter in lies.items():
            with pytest.raises(TransferError, match=why):
                download(TamperingCoordinator(c, alter), "mine.bin", tmp_path / "out", opener)
            assert not (tmp_path / "out").exists()
        download(TamperingCoordinator(c, lambda v: v), "mine.bin", tmp_path / "out", opener)
        assert (tmp_path / "out").read_bytes() == data
