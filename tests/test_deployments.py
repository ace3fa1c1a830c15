"""The coordinator as deployed for real: behind TLS, and on PostgreSQL (with a restart)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabric_helpers import device_by_name, free_port, run_linktest, wait_for
from neuranet.fabric import LocalFabric

pytestmark = pytest.mark.slow


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "neuranet-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_server_with_verifying_agents(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with LocalFabric(tmp_path / "fab", server_args=["--tls-cert", str(cert), "--tls-key", str(key)]) as fabric:
        url = fabric.start_server(port=free_port())
        assert url.startswith("https://")
        for name in ("t1", "t2"):
            fabric.start_agent(name, extra=["--ca-cert", str(cert), "--listen-host", "127.0.0.1", "--no-measure"])
        fabric.wait_online(["t1", "t2"])
        # An agent that does not trust the certificate never gets in.
        fabric.start_agent("untrusting", extra=["--no-measure"])
        with fabric.client() as c:
            result = run_linktest(c, device_by_name(c, "t1")["id"], device_by_name(c, "t2")["id"])
            assert result["ok"], result
            assert "untrusting" not in {d["name"] for d in c.devices()}
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in (fabric.root / "agent-untrusting.log").read_text(),
                 what="the agent to report the untrusted certificate")


def fresh_database(postgres_url: str) -> str:
    import asyncpg

    name = "fabric_" + secrets.token_hex(4)
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def test_server_on_postgresql_keeps_everything_across_restart(postgres_url: str, tmp_path: Path) -> None:
    db_url = fresh_database(postgres_url)
    port = free_port()
    with LocalFabric(tmp_path, server_args=["--db-url", db_url]) as fabric:
        fabric.start_server(port=port)
        fabric.start_agent("pg1", extra=["--listen-host", "127.0.0.1", "--no-measure"])
        fabric.start_agent("pg2", extra=["--listen-host", "127.0.0.1", "--no-measure"])
        fabric.wait_online(["pg1", "pg2"])
        with fabric.client() as c:
            before = sorted((d["id"], d["name"]) for d in c.devices())
        fabric.stop_server()
        fabric.start_server(port=port)
        fabric.wait_online(["pg1", "pg2"])
        with fabric.client() as c:
            after = sorted((d["id"], d["name"]) for d in c.devices())
            pg1 = device_by_name(c, "pg1")
            history = c.request("GET", f"/api/v1/devices/{pg1['id']}/history")["intervals"]
            result = run_linktest(c, pg1["id"], device_by_name(c, "pg2")["id"])
        assert after == before
        assert len(history) == 2 and history[0]["end"] is not None and history[1]["end"] is None
        assert result["ok"], result
        assert not (tmp_path / "server" / "neuranet.db").exists()  # nothing went to SQLite
