"""Files across devices with a real server and five real agent processes: put, get, replicas, repair,
damaged chunks, quota, deletion while offline, encryption, another user's devices, server restart."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fabric_helpers import free_port
from neuranet.cli import app
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric
from neuranet.storage.chunks import chunk_id
from neuranet.net.local_api import LocalAgent, LocalRequestError
from neuranet.storage.transfer import download, upload

pytestmark = pytest.mark.slow
AGENTS = ["s0", "s1", "s2", "s3", "s4"]
MiB = 2 ** 20
ORPHAN_AFTER = 8  # seconds; every upload here commits well within it


def chunk_files(fabric: LocalFabric, name: str) -> dict[str, Path]:
    return {p.name: p for p in (fabric.root / "agents" / name / "chunks").glob("*/*") if len(p.name) == 64}


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        out = check()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("files")
    with LocalFabric(root, server_args=["--file-repair", "1", "--file-lost-after", "2",
                                                    "--file-orphan-after", str(ORPHAN_AFTER)]) as f:
        f.start_server(port=free_port())
        for name in AGENTS:
            f.start_agent(name, extra=["--no-measure", "--storage", "64M", "-v"])
        with f.client() as c:
            f.stranger_token = c.create_user("stranger")["token"]
        f.start_agent("theirs", token=f.stranger_token, extra=["--no-measure", "--storage", "64M"])
        f.wait_online(AGENTS)
        f.wait_online(["theirs"], token=f.stranger_token)
        yield f


def put_bytes(fabric: LocalFabric, tmp_path: Path, name: str, data: bytes, *extra: str) -> Path:
    src = tmp_path / name
    src.write_bytes(data)
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["files", "put", str(src), *extra, *auth])
    assert result.exit_code == 0, result.output
    return src


def copy_log(fabric: LocalFabric, chunks: list[str]) -> dict[tuple[str, str], str]:
    """(chunk prefix, target device) -> path, for every device-to-device copy of these chunks in the
    agents' logs."""
    prefixes = {c[:12] for c in chunks}
    out = {}
    for name in AGENTS:
        for line in (fabric.root / f"agent-{name}.log").read_text(errors="replace").splitlines():
            found = re.search(r"chunk (\w+) copied to (\w+) \(\d+ bytes, (\w+) path\)", line)
            if found and found[1] in prefixes:
                out[found[1], found[2]] = found[3]
    return out


def holders(c, name: str) -> list[list[str]]:
    return [[h["name"] for h in ch["holders"]] for ch in c.file_info(name)["chunk_list"]]


def test_put_get_survives_two_lost_holders_and_repair_restores_replicas(fabric: LocalFabric, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    put_bytes(fabric, tmp_path, "big.bin", data, "--replicas", "3")
    with fabric.client() as c:
        info = c.file_info("big.bin")
        assert info["chunks"] == 6 and info["size"] == len(data) and info["retrievable_now"]
        assert all(len(set(h)) == 3 for h in holders(c, "big.bin"))
        # The server sent each chunk's bytes to one device; that device copied them on to the other two
        # over PeerLinks, device to device (direct here: the agents listen on loopback).
        copies = copy_log(fabric, [ch["id"] for ch in info["chunk_list"]])
        assert len(copies) == 2 * 6 and set(copies.values()) == {"direct"}, copies
        assert {f["name"] for f in c.files()} >= {"big.bin"}
        # No chunk went to another user's device.
        assert not chunk_files(fabric, "theirs")
        # Kill the two agents that hold the most chunks.
        counts = {a: sum(a in h for h in holders(c, "big.bin")) for a in AGENTS}
        victims = sorted(AGENTS, key=lambda a: -counts[a])[:2]
        for v in victims:
            fabric.kill_agent(v, signal.SIGKILL)
        out = tmp_path / "back.bin"
        download(c, "big.bin", out)
        assert out.read_bytes() == data
        # Repair (the victims count as lost after 2 s offline) puts each chunk on 3 live devices again.
        alive = set(AGENTS) - set(victims)
        wait_for(lambda: all(len(set(h) & alive) >= 3 for h in holders(c, "big.bin")), 90, "repair")
        # Repair copies device to device too.
        assert len(copy_log(fabric, [ch["id"] for ch in info["chunk_list"]])) > len(copies)
    for v in victims:  # bring them back for the other tests; stale copies are theirs to drop
        fabric.start_agent(v, extra=["--no-measure", "--storage", "64M"])
    fabric.wait_online(victims)


def test_a_damaged_chunk_is_caught_and_the_file_still_reads(fabric: LocalFabric, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    put_bytes(fabric, tmp_path, "rot.bin", data, "--replicas", "2")
    with fabric.client() as c:
        first = c.file_info("rot.bin")["chunk_list"][0]
        for h in first["holders"]:  # damage one copy
            path = chunk_files(fabric, h["name"]).get(first["id"])
            if path is not None:
                raw = bytearray(path.read_bytes())
                raw[100] ^= 0xFF
                path.write_bytes(bytes(raw))
                damaged = h["name"]
                break
        # Reads go to the replicas in random order: whenever the damaged copy is asked, it fails its
        # hash, is dropped, and another replica serves; the bytes are right every time.
        for _ in range(40):
            out = tmp_path / "rot.out"
            download(c, "rot.bin", out)
            assert out.read_bytes() == data
            if first["id"] not in chunk_files(fabric, damaged):
                break
        assert first["id"] not in chunk_files(fabric, damaged)
        # ... and repair makes a new second copy (possibly on the same device: a fresh, intact one).
        wait_for(lambda: len(holders(c, "rot.bin")[0]) >= 2, 30, "repair")
        for h in holders(c, "rot.bin")[0]:
            assert chunk_id(chunk_files(fabric, h)[first["id"]].read_bytes()) == first["id"]


def test_put_reports_the_replicas_it_got_and_when_repair_adds_the_rest(fabric: LocalFabric, tmp_path: Path) -> None:
    with fabric.client() as c:
        online = sum(d["online"] for d in c.devices() if d["name"] in AGENTS)
    data = os.urandom(MiB + 7)  # two chunks
    src = tmp_path / "wide.bin"
    src.write_bytes(data)
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["files", "put", str(src), "--replicas", str(online + 1), *auth])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    # Not "N+1 replicas": one device too few offers storage.
    assert f"{online} of {online + 1} replicas now (2 of 2 chunks short)" in said, said
    assert "repair adds the missing copies when another device with space is online (checked every 1 s)" in said
    with fabric.client() as c:
        info = c.file_info("wide.bin")
        assert (info["replicas_now"], info["chunks_short"]) == (online, 2)
        c.delete_file("wide.bin")
    result = CliRunner().invoke(app, ["files", "put", str(src), "--replicas", "2", *auth])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "2 replicas" in said and "short" not in said and "repair" not in said, said
    with fabric.client() as c:
        c.delete_file("wide.bin")


def test_quota_full_and_bad_requests_get_clear_errors(fabric: LocalFabric, tmp_path: Path) -> None:
    with fabric.client(fabric.stranger_token) as theirs:
        src = tmp_path / "too-big.bin"
        src.write_bytes(os.urandom(65 * MiB))
        with open(src, "rb") as f, pytest.raises(ClientError, match="507.*quota full"):
            upload(theirs, f, "too-big.bin", replicas=1)
        # The stranger cannot see or fetch the owner's files or chunks.
        with pytest.raises(ClientError, match="404"):
            theirs.file_info("big.bin")
        with fabric.client() as c:
            owners_chunk = c.file_info("big.bin")["chunk_list"][0]["id"]
        with pytest.raises(ClientError, match="404.*no chunk"):
            theirs.get_chunk(owners_chunk)
    with fabric.client() as c:
        with pytest.raises(ClientError, match="422.*does not match"):
            c.put_chunk(chunk_id(b"abc"), b"abd", 1)
        with pytest.raises(ClientError, match="422"):
            c.put_chunk("not-a-hash", b"x", 1)
        with pytest.raises(ClientError, match="404.*no file"):
            c.file_info("missing.txt")
        with pytest.raises(ClientError, match="409.*not stored"):
            c.commit_file({"name": "ghost", "size": 1, "sha256": "0" * 64, "chunks": [{"id": "1" * 64, "size": 1}]})
    runner = CliRunner()
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = runner.invoke(app, ["files", "get", "missing.txt", *auth])
    assert result.exit_code == 1 and "no file named" in result.output
    result = runner.invoke(app, ["files", "held", "s0", *auth])
    assert result.exit_code == 0 and "s0:" in result.output and "quota 64.0 MiB" in result.output


def test_put_and_get_through_this_machines_agent_go_device_to_device_with_failover(fabric: LocalFabric,
                                                                               tmp_path: Path) -> None:
    data = os.urandom(4 * MiB + 7)
    put_bytes(fabric, tmp_path, "near.bin", data, "--replicas", "2")
    with fabric.client() as c:
        chunk_list = c.file_info("near.bin")["chunk_list"]
        held = [{h["name"] for h in ch["holders"]} for ch in chunk_list]
        ids = {d["name"]: d["id"] for d in c.devices()}
        # "This machine" runs the agent that holds the fewest of the file's chunks.
        near = min(AGENTS, key=lambda a: sum(a in h for h in held))
        here = LocalAgent(fabric.root / "agents" / near)
        info = download(c, "near.bin", tmp_path / "near.out", agent=here)
        assert (tmp_path / "near.out").read_bytes() == data
        # Every chunk came from its own disk or from a holder over a direct PeerLink, none via the server.
        assert set(info["paths"]) <= {"local", "direct"} and sum(info["paths"].values()) == 5, info["paths"]
        assert info["paths"].get("direct")
        # A holder that is gone is skipped for the next one, whatever the order tried.
        ch, holders_ = next((ch, sorted(h)) for ch, h in zip(chunk_list, held) if near not in h and len(h) == 2)
        gone, alive = holders_
        fabric.kill_agent(gone, signal.SIGKILL)
        for _ in range(3):
            answer, got = here.request({"op": "chunk", "chunk": ch["id"], "holders": [ids[gone], ids[alive]]})
            assert chunk_id(got) == ch["id"] and (answer["source"], answer["path"]) == (ids[alive], "direct")
        # Uploads through the agent too: it keeps a chunk or sends it to the devices the coordinator
        # chose over PeerLinks, and answers once the coordinator has recorded them.
        up = os.urandom(3 * MiB)
        src = tmp_path / "up.bin"
        src.write_bytes(up)
        with open(src, "rb") as f:
            out = upload(c, f, "up.bin", replicas=2, agent=here)
        assert set(out["paths"]) <= {"local", "direct"} and sum(out["paths"].values()) == 2 * 3, out["paths"]
        assert all(len(set(h)) == 2 for h in holders(c, "up.bin"))
        download(c, "up.bin", tmp_path / "up.out")  # through the coordinator
        assert (tmp_path / "up.out").read_bytes() == up
        with pytest.raises(LocalRequestError, match="does not match"):
            here.request({"op": "put", "chunk": chunk_id(b"abc"), "replicas": 1}, b"abd")
        with pytest.raises(LocalRequestError, match="not a chunk name"):
            here.request({"op": "chunk", "chunk": "nope"})
        with pytest.raises(LocalRequestError, match="no holder returned it"):
            here.request({"op": "chunk", "chunk": chunk_id(b"never stored"), "holders": [ids[alive]]})
    # The CLI finds the agent and says how the chunks came.
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["files", "get", "near.bin", "-o", str(tmp_path / "cli.out"),
                                      "--agent-dir", str(fabric.root / "agents" / near), *auth])
    assert result.exit_code == 0 and "server" not in result.output.split("chunks:")[1], result.output
    assert (tmp_path / "cli.out").read_bytes() == data
    result = CliRunner().invoke(app, ["files", "get", "near.bin", "-o", str(tmp_path / "cli2.out"), "--no-agent", *auth])
    assert result.exit_code == 0 and "5 server" in result.output, result.output
    result = CliRunner().invoke(app, ["files", "get", "near.bin", "--agent-dir", str(tmp_path), *auth])
    assert result.exit_code == 1 and "no agent answers" in result.output
    result = CliRunner().invoke(app, ["files", "put", str(src), "--name", "up2.bin", "-k", "1",
                                      "--agent-dir", str(fabric.root / "agents" / near), *auth])
    assert result.exit_code == 0 and "server" not in result.output.split("chunks:")[1], result.output
    fabric.start_agent(gone, extra=["--no-measure", "--storage", "64M", "-v"])
    fabric.wait_online([gone])


def test_chunks_of_an_unfinished_upload_are_deleted(fabric: LocalFabric) -> None:
    data = os.urandom(MiB // 2)
    with fabric.client() as c:
        stored = c.put_chunk(chunk_id(data), data, 2)["holders"]  # uploaded, never committed to a file
        assert len(stored) == 2
        names = {d["id"]: d["name"] for d in c.devices()}
        assert all(chunk_id(data) in chunk_files(fabric, names[d]) for d in stored)
        # Past --file-orphan-after, a repair round forgets it and the devices delete it.
        wait_for(lambda: not any(chunk_id(data) in chunk_files(fabric, names[d]) for d in stored),
                 ORPHAN_AFTER + 30, "orphan collection")
        # Uploading it again stores it anew.
        assert len(c.put_chunk(chunk_id(data), data, 1)["holders"]) == 1


def test_delete_frees_space_also_on_a_device_that_was_offline(fabric: LocalFabric, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    put_bytes(fabric, tmp_path, "gone.bin", data, "--replicas", "5")
    with fabric.client() as c:
        ids = {ch["id"] for ch in c.file_info("gone.bin")["chunk_list"]}
        assert all(ids <= set(chunk_files(fabric, a)) for a in AGENTS)  # 5 replicas: everyone has them
        fabric.kill_agent("s4", signal.SIGTERM)
        assert c.delete_file("gone.bin")["replicas_freed"] == 5 * len(ids)
        wait_for(lambda: all(not ids & set(chunk_files(fabric, a)) for a in AGENTS[:4]), 30, "online devices to drop")
        assert ids <= set(chunk_files(fabric, "s4"))  # it was away
        fabric.start_agent("s4", extra=["--no-measure", "--storage", "64M"])
        wait_for(lambda: not ids & set(chunk_files(fabric, "s4")), 60, "the returning device to drop its chunks")
        with pytest.raises(ClientError, match="404"):
            c.file_info("gone.bin")


def test_encrypted_files_round_trip_and_need_the_passphrase(fabric: LocalFabric, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    secret = b"model weights nobody else may read " * 40000
    monkeypatch.setenv("NEURANET_PASSPHRASE", "open sesame")
    put_bytes(fabric, tmp_path, "secret.bin", secret, "--encrypt", "--replicas", "2")
    stored = [p.read_bytes() for a in AGENTS for p in chunk_files(fabric, a).values()]
    assert not any(b"nobody else" in blob for blob in stored)  # no device can read it
    auth = ["--server", fabric.url, "--token", fabric.token]
    out = tmp_path / "secret.out"
    result = CliRunner().invoke(app, ["files", "get", "secret.bin", "-o", str(out), *auth])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == secret
    monkeypatch.setenv("NEURANET_PASSPHRASE", "wrong")
    result = CliRunner().invoke(app, ["files", "get", "secret.bin", "-o", str(tmp_path / "x"), *auth])
    assert result.exit_code == 1 and "wrong passphrase" in result.output
    result = CliRunner().invoke(app, ["files", "info", "secret.bin", *auth])
    assert result.exit_code == 0 and "encrypted" in result.output and "P(retrievable" in result.output
    with fabric.client() as c:  # the coordinator's record: ciphertext facts and the KDF cost, no more
        record = c.file_info("secret.bin")
    assert hashlib.sha256(secret).hexdigest() not in str(record) and "key_check" not in record["sealing"]
    assert record["size"] != len(secret)
    assert record["sealing"]["kdf"] == {"name": "scrypt", "n": 2 ** 17, "r": 8, "p": 1}


def test_files_survive_a_server_restart(fabric: LocalFabric, tmp_path: Path) -> None:
    data = os.urandom(MiB + 7)
    put_bytes(fabric, tmp_path, "durable.bin", data, "--replicas", "2")
    port = int(fabric.url.rsplit(":", 1)[1])
    fabric.stop_server()
    fabric.start_server(port=port)
    fabric.wait_online(AGENTS)
    with fabric.client() as c:
        out = tmp_path / "durable.out"
        download(c, "durable.bin", out)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        listing = CliRunner().invoke(app, ["files", "ls", "--server", fabric.url, "--token", fabric.token])
        assert "durable.bin" in listing.output
