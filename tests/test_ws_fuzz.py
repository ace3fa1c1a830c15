"""Fuzzing a real coordinator's ``/agent`` WebSocket as an authenticated device: valid, mutated and
random frames of every message type. The server must answer each with a reply or a typed error,
never an exception (its log is read afterwards), and keep serving everyone.

Seeded (``NEURANET_FUZZ_SEED`` picks another seed) and bounded in frames and in time.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from protocol_samples import SAMPLES
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fabric_helpers import free_port
from neuranet.fabric import LocalFabric
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("NEURANET_FUZZ_SEED", "1313"))
FRAMES = 2000  # frames sent in all
TIME_BUDGET = 60.0  # seconds; the fuzzer stops early past it (2,000 frames take 10-30 s)
BAD_SIGNS = ("Traceback", "connection failed", "maintenance failed", "Exception in ASGI", "Task exception")

# Values that have broken servers: out-of-range integers, non-finite floats, wrong types, long and odd
# strings, deep nesting.
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63) - 1, 0.5, -1e308, math.inf, -math.inf,
    math.nan, "", "x" * 5000, "../../etc/passwd", "\x00\x1b[31m\n", "é" * 300, "a" * 64, "f" * 64, b"", b"\xff" * 100,
    [], [1, "a", None], ["f" * 64] * 50, {}, {"a": 1}, {"": {"": []}},
]


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


INT_EDGES = [-1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63) - 1, -(2 ** 63)]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e-308, 2.0 ** 63]


def odd_value(rng: random.Random, like: Any = None) -> Any:
    """Something a field should not hold; near its own type half the time (the edges of ints, floats)."""
    if isinstance(like, int) and not isinstance(like, bool) and rng.random() < 0.6:
        return rng.choice(INT_EDGES)
    if isinstance(like, float) and rng.random() < 0.6:
        return rng.choice(FLOAT_EDGES)
    roll = rng.random()
    if roll < 0.05:
        return deep(rng.choice([50, 500]))  # msgpack's own limit is far deeper
    if roll < 0.1:
        return {rng.choice(["profile", "x", "ts", "chunks"]): odd_value(rng)}
    return rng.choice(ODD_VALUES)


def mutate_body(body: dict[str, Any], rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A copy of a message body with 1-3 fields changed, dropped or added, maybe inside nested maps
    and lists (a telemetry sample, a tensor header)."""
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        keys = list(body)
        roll = rng.random()
        key = rng.choice(keys) if keys else ""
        inner = body.get(key)
        if isinstance(inner, list) and inner and isinstance(inner[0], dict) and depth < 3 and roll < 0.5:
            body[key] = [mutate_body(inner[0], rng, depth + 1), *inner[1:]]
        elif isinstance(inner, dict) and inner and depth < 3 and roll < 0.5:
            body[key] = mutate_body(inner, rng, depth + 1)
        elif keys and roll < 0.7:
            body[key] = odd_value(rng, inner)
        elif keys and roll < 0.8:
            del body[key]
        else:
            body[rng.choice(["extra", "link", "peer", "run_id", "request"])] = odd_value(rng)
    return body


def mutate_bytes(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    roll = rng.random()
    if roll < 0.4 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif roll < 0.7:
        del data[rng.randrange(len(data) + 1):]
    else:
        data += rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def frame_for(mtype: str, device_id: str, rng: random.Random, peers: list[str]) -> bytes | str:
    """One fuzzed frame of type ``mtype`` from ``device_id``: usually a mutated sample of it."""
    sample = rng.choice(SAMPLES[mtype])
    env = sample.envelope(id=rng.randrange(2 ** 32), src=device_id, dst="server")
    if mtype == "link_open" and peers and rng.random() < 0.5:
        env.body["peer"] = rng.choice(peers)  # a link that is granted: relayed frames then reach the peer
    roll = rng.random()
    if roll < 0.15:  # valid as is
        pass
    elif roll < 0.65:
        env.body = mutate_body(env.body, rng)
    elif roll < 0.75:  # addressed to another device (relay path), known or not
        env.dst = rng.choice([*peers, "nobody", "d" * 300, ""])
    elif roll < 0.8:
        env.payload = rng.randbytes(rng.choice([1, 1000, 70_000]))
    elif roll < 0.85:
        env.type = rng.choice([mtype.upper(), "x" * 200, "", "error", "welcome"])
    elif roll < 0.87:
        return "not binary"
    else:
        try:
            return mutate_bytes(encode_frame(env), rng)
        except Exception:
            return rng.randbytes(40)
    try:
        return encode_frame(env)
    except Exception:  # a mutation msgpack or the header limit refuses: send raw msgpack instead
        header = msgpack.packb([env.type, env.id, env.src, env.dst, {}], use_bin_type=True)
        return bytes([PROTOCOL_VERSION]) + len(header).to_bytes(4, "big") + header


class Device:
    """A device of the fuzzing user: enrolled once, then reconnecting with its key (cheaper than a new one)."""

    def __init__(self, fabric: LocalFabric) -> None:
        self.fabric = fabric
        self.key = Ed25519PrivateKey.generate()
        self.id = ""

    async def connect(self) -> ClientConnection:
        ws = await connect(self.fabric.url.replace("http://", "ws://") + "/agent", max_size=None, compression=None)
        if self.id:
            hello = m.Hello(version=PROTOCOL_VERSION, device_id=self.id)
        else:
            pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            with self.fabric.client() as c:
                jt = c.create_join_token()["join_token"]
            name = f"fuzz-{pub[:6].hex()}"  # names are unique per owner
            hello = m.Hello(version=PROTOCOL_VERSION, enrol=m.Enrolment(join_token=jt, public_key=pub, name=name))
        await ws.send(encode_frame(hello.envelope()))
        challenge = m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))
        assert isinstance(challenge, m.Challenge), challenge
        signature = self.key.sign(auth_payload(challenge.nonce, challenge.device_id))
        await ws.send(encode_frame(m.Auth(signature=signature).envelope()))
        welcome = m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 10)))
        assert isinstance(welcome, m.Welcome), welcome
        self.id = welcome.device_id
        return ws


async def drain(ws: ClientConnection, counts: dict[str, int], acks: asyncio.Queue[int] | None = None) -> None:
    """Read everything the server sends (so its queue for us never fills), counting error codes."""
    try:
        async for data in ws:
            if isinstance(data, bytes):
                env = decode_frame(data)
                if env.type == "error":
                    counts[str(env.body.get("code"))] = counts.get(str(env.body.get("code")), 0) + 1
                elif env.type == "heartbeat_ack" and acks is not None:
                    acks.put_nowait(env.body["seq"])
                elif env.type == "heartbeat":  # the server's probe: answer it, as an agent does
                    await ws.send(encode_frame(m.HeartbeatAck(seq=0).envelope(src=env.dst, dst="server")))
    except ConnectionClosed:
        pass


async def beat(ws: ClientConnection, device_id: str) -> None:
    """Heartbeats, as an agent sends them, until the connection closes."""
    try:
        for seq in range(10_000):
            await ws.send(encode_frame(m.Heartbeat(seq=seq).envelope(src=device_id, dst="server")))
            await asyncio.sleep(2.0)
    except ConnectionClosed:
        pass


async def handled(ws: ClientConnection, device_id: str, acks: asyncio.Queue[int], reader: asyncio.Future[None],
                  seq: int) -> None:
    """Until the server has handled everything sent so far (a heartbeat behind it is answered), or closed
    the connection (ConnectionClosed)."""
    await ws.send(encode_frame(m.Heartbeat(seq=seq).envelope(src=device_id, dst="server")))
    while True:
        got = asyncio.ensure_future(acks.get())
        await asyncio.wait({got, reader}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not got.done():
            got.cancel()
            if reader.done():
                raise ConnectionClosed(None, None)
            raise AssertionError(f"the server did not answer heartbeat {seq} within 10 s")
        if got.result() == seq:
            return


async def test_fuzzed_frames_of_every_type_cause_no_server_exception(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    with LocalFabric(tmp_path) as fabric:
        await asyncio.to_thread(fabric.start_server, 30.0, free_port())
        other = Device(fabric)  # another device of the same owner, online throughout
        bystander = await other.connect()
        bystander_id = other.id
        fuzzer = Device(fabric)
        counts: dict[str, int] = {}
        readers = [asyncio.ensure_future(drain(bystander, {})), asyncio.ensure_future(beat(bystander, bystander_id))]
        started = time.monotonic()
        deadline = started + TIME_BUDGET
        sent = connections = 0
        types = sorted(SAMPLES)
        try:
            while sent < FRAMES and time.monotonic() < deadline:
                ws = await fuzzer.connect()
                device_id = fuzzer.id
                connections += 1
                acks: asyncio.Queue[int] = asyncio.Queue()
                reader = asyncio.ensure_future(drain(ws, counts, acks))
                readers.append(reader)
                try:
                    while sent < FRAMES and time.monotonic() < deadline:
                        mtype = types[sent % len(types)]  # every type in turn
                        await asyncio.wait_for(ws.send(frame_for(mtype, device_id, rng, [bystander_id])), 10)
                        sent += 1
                        await handled(ws, device_id, acks, reader, sent)
                except ConnectionClosed:
                    pass  # a fatal error closed it: the next device goes on
                finally:
                    await ws.close()
            assert sent >= min(FRAMES, 300), f"only {sent} frames in {TIME_BUDGET:.0f}s"

            # The server still serves: a fresh device's heartbeat is answered, the bystander is online,
            # and REST answers.
            fresh = Device(fabric)
            ws = await fresh.connect()
            device_id = fresh.id
            await ws.send(encode_frame(m.Heartbeat(seq=99).envelope(src=device_id, dst="server")))
            while (env := decode_frame(await asyncio.wait_for(ws.recv(), 10))).type != "heartbeat_ack":
                pass
            assert env.body == {"seq": 99}
            await ws.close()
            with fabric.client() as c:
                online = {d["id"] for d in c.devices() if d["online"]}
                assert bystander_id in online
        finally:
            await bystander.close()
            readers[1].cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        log = (tmp_path / "server.log").read_text(errors="replace")
        bad = [line for line in log.splitlines() if any(sign in line for sign in BAD_SIGNS)]
        assert not bad, f"seed {SEED}: {len(bad)} server exceptions, first:\n" + _context(log, bad[0])
        assert counts, "the fuzzer never drew an error: it is not reaching the server"
        print(f"fuzz seed {SEED}: {sent} frames over {connections} connections in "
              f"{time.monotonic() - started:.1f}s; errors {counts}")


def _context(log: str, line: str, before: int = 5, after: int = 25) -> str:
    lines = log.splitlines()
    i = lines.index(line)
    return "\n".join(lines[max(0, i - before): i + after])
