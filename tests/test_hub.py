"""The hub's per-agent outbound queue (AgentConnection) and the agent's reconnect backoff."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuranet.agent.runtime import backoff_delay
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import decode_frame
from neuranet.protocol.errors import QueueLimitExceeded, UnknownMessageType
from neuranet.server.hub import AgentConnection


class FakeSocket:
    """Stands in for the WebSocket: records frames; optionally holds each write until released."""

    def __init__(self, gated: bool = False) -> None:
        self.sent: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.gated = gated
        self._permits = asyncio.Semaphore(0)
        self._writing = asyncio.Condition()
        self.fail_close = False

    async def send_bytes(self, frame: bytes) -> None:
        async with self._writing:
            self.sent.append(frame)
            self._writing.notify_all()
        if self.gated:
            await self._permits.acquire()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    async def wait_sent(self, n: int) -> None:
        """Until the n-th write has started."""
        async with self._writing:
            await asyncio.wait_for(self._writing.wait_for(lambda: len(self.sent) >= n), 5)

    async def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        if self.fail_close:
            raise ConnectionError("already gone")


def conn_for(sock: FakeSocket, max_queued: int = 100) -> AgentConnection:
    return AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, max_queued)


async def _settle() -> None:
    """Let every ready task run (no wall-clock wait)."""
    for _ in range(20):
        await asyncio.sleep(0)


# --- queue limits ---------------------------------------------------------------------------


async def test_one_source_over_its_limit_is_refused_while_others_still_fit() -> None:
    conn = conn_for(FakeSocket(), max_queued=100)
    conn.enqueue(b"a" * 60, source="flood")
    conn.enqueue(b"b" * 40, source="flood")  # exactly at the limit is fine
    with pytest.raises(QueueLimitExceeded, match=r"100 bytes from flood already wait for dev-b; limit is 100"):
        conn.enqueue(b"c", source="flood")
    assert conn.queued_bytes == 100  # the refused frame was not queued

    conn.enqueue(b"d" * 100, source="polite")  # another peer is unaffected
    conn.enqueue(b"s" * 1000)  # the server's own frames are not limited per peer
    assert conn.queued_bytes == 1200
    with pytest.raises(QueueLimitExceeded):
        conn.enqueue(b"e", source="polite")
    with pytest.raises(QueueLimitExceeded):
        conn.enqueue(b"f" * 101, source="newcomer")  # one frame bigger than the limit never fits
    conn.enqueue(b"g" * 100, source="newcomer")
    assert conn.queued_bytes == 1300


async def test_writer_drains_fifo_and_releases_accounting() -> None:
    sock = FakeSocket(gated=True)
    conn = conn_for(sock, max_queued=16)
    frames = [(b"p1-first", "p1"), (b"p2-x", "p2"), (b"srv", ""), (b"p1-2", "p1")]
    for frame, source in frames:
        conn.enqueue(frame, source=source)
    writer = asyncio.create_task(conn.writer())
    try:
        await sock.wait_sent(1)
        assert conn._queued_from["p1"] == len(b"p1-first") + len(b"p1-2")  # counted until written
        with pytest.raises(QueueLimitExceeded):
            conn.enqueue(b"xxxxx", source="p1")  # 12 + 5 > 16
        sock.release()
        await sock.wait_sent(2)
        assert conn._queued_from["p1"] == len(b"p1-2")  # the written frame's bytes are free again
        conn.enqueue(b"p1-3", source="p1")

        # drained() swallows its own timeout, so give it a long one and bound it from outside:
        # returning means the queue really emptied.
        drained = asyncio.create_task(asyncio.wait_for(conn.drained(timeout=600), 5))
        sock.release(3)
        await sock.wait_sent(5)
        await _settle()
        assert not drained.done()  # the last write has not finished yet
        sock.release()
        await drained
        assert sock.sent == [f for f, _ in frames] + [b"p1-3"]
        assert conn.queued_bytes == 0
        assert dict(conn._queued_from) == {}  # no empty counters left behind per peer
        conn.enqueue(b"q" * 16, source="p1")  # the full allowance is back
    finally:
        await conn.close()
        sock.release(10)
        await asyncio.wait_for(writer, 5)


async def test_accounting_is_released_when_a_write_fails() -> None:
    async def broken(frame: bytes) -> None:
        raise ConnectionError("socket gone")

    async def close(code: int, reason: str) -> None:
        pass

    conn = AgentConnection("dev-b", "user-1", broken, close, 10)
    conn.enqueue(b"x" * 10, source="p1")
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(conn.writer(), 5)
    assert conn.queued_bytes == 0


async def test_drained_returns_when_empty_and_is_bounded_when_stuck() -> None:
    sock = FakeSocket(gated=True)
    conn = conn_for(sock)
    await asyncio.wait_for(conn.drained(timeout=600), 5)  # nothing queued: at once

    conn.enqueue(b"stuck", source="p1")
    writer = asyncio.create_task(conn.writer())
    try:
        await sock.wait_sent(1)
        await conn.drained(timeout=0.01)  # the socket never finishes: gives up without raising
        assert conn.queued_bytes == 5
    finally:
        await conn.close()
        sock.release()
        await asyncio.wait_for(writer, 5)


async def test_server_messages_get_increasing_ids_and_are_not_peer_limited() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, max_queued=1)
    conn.send(m.PeerDown(peer="dev-a"))
    conn.send(m.PeerDown(peer="dev-c"))
    writer = asyncio.create_task(conn.writer())
    await asyncio.wait_for(conn.drained(timeout=600), 5)
    envs = [decode_frame(f) for f in sock.sent]
    assert [(e.type, e.src, e.dst, e.body["peer"]) for e in envs] == [
        ("peer_down", "server", "dev-b", "dev-a"),
        ("peer_down", "server", "dev-b", "dev-c"),
    ]
    assert envs[0].id < envs[1].id
    await conn.close()
    await asyncio.wait_for(writer, 5)


# --- close -------------------------------------------------------------------------------------


async def test_close_is_idempotent_and_stops_the_writer() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    writer = asyncio.create_task(conn.writer())
    await _settle()  # the writer is now waiting for frames
    assert not writer.done()

    await conn.close(4001, "silent " * 40)
    await conn.close(4000, "again")
    await conn.close()
    assert conn.closed
    assert len(sock.closes) == 1
    code, reason = sock.closes[0]
    assert code == 4001 and reason == ("silent " * 40)[:120]  # WebSocket close reasons are short
    await asyncio.wait_for(writer, 5)  # woke up and ended

    conn.enqueue(b"late", source="p1")  # frames for a closed agent are dropped quietly
    assert conn.queued_bytes == 0


async def test_close_swallows_a_failing_socket_close() -> None:
    sock = FakeSocket()
    sock.fail_close = True
    conn = conn_for(sock)
    await conn.close(1000, "bye")
    await conn.close(1000, "bye")
    assert conn.closed and sock.closes == [(1000, "bye")]


# --- agent reconnect backoff --------------------------------------------------------------------


@given(
    attempt=st.integers(0, 10_000),
    base=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 600.0),
    seed=st.integers(0, 2**32),
)
def test_backoff_delay_stays_within_full_jitter_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    d = backoff_delay(attempt, base, cap, random.Random(seed))
    bound = min(cap, base * 2.0 ** min(attempt, 1000))
    assert 0.0 <= d <= bound * (1 + 1e-12)
    assert d <= cap * (1 + 1e-12)


def test_backoff_delay_is_capped_for_huge_attempts() -> None:
    rng = random.Random(7)
    for attempt in (31, 64, 1_000, 10**6, 10**9):
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= 30.0 for d in draws)
        assert max(draws) > 25.0  # the cap, not some overflowed or collapsed value, is the ceiling


def test_backoff_delay_grows_then_caps() -> None:
    rng = random.Random(11)
    for attempt, bound in [(0, 0.5), (1, 1.0), (3, 4.0), (5, 16.0), (6, 30.0), (20, 30.0)]:
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(400)]
        assert max(draws) <= bound
        assert max(draws) > 0.9 * bound  # reaches close to its bound
        assert min(draws) < 0.1 * bound  # full jitter: starts near zero


def test_backoff_delay_is_jittered() -> None:
    rng = random.Random(3)
    draws = [backoff_delay(4, 1.0, 60.0, rng) for _ in range(300)]
    assert len(set(draws)) > 290  # not a constant (or a handful of values)
    mean = sum(draws) / len(draws)
    assert 6.5 < mean < 9.5  # uniform on [0, 16] averages 8
    # the default generator jitters too: agents restarted together must not retry in lockstep
    assert len({backoff_delay(4, 1.0, 60.0) for _ in range(50)}) > 45


# --- relay backpressure ---------------------------------------------------------------------


async def test_relay_pauses_a_source_until_the_destination_drains() -> None:
    sock = FakeSocket(gated=True)
    conn = AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, 100, stall_timeout=5.0)
    writer = asyncio.create_task(conn.writer())
    await conn.relay_from("src", b"a" * 60)
    await conn.relay_from("src", b"b" * 40)
    third = asyncio.create_task(conn.relay_from("src", b"c" * 50))  # would pass the limit: it waits
    await _settle()
    assert not third.done()
    await sock.wait_sent(1)
    sock.release(1)  # the destination takes the first frame: 60 bytes of room
    await asyncio.wait_for(third, 5)
    sock.release(10)
    await sock.wait_sent(3)
    assert [f[:1] for f in sock.sent] == [b"a", b"b", b"c"]
    await conn.close()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


async def test_relay_cuts_off_a_source_whose_destination_never_reads() -> None:
    sock = FakeSocket(gated=True)  # never released: the agent is not reading
    conn = AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, 100, stall_timeout=0.05)
    writer = asyncio.create_task(conn.writer())
    await conn.relay_from("src", b"a" * 100)
    with pytest.raises(QueueLimitExceeded, match="not reading"):
        await conn.relay_from("src", b"b")
    await conn.relay_from("other", b"c" * 100)  # another source still has its own room
    await conn.close()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


# --- what one connection may have waiting -------------------------------------------------------


async def test_replies_to_an_agent_that_does_not_read_close_it_and_free_its_queue() -> None:
    sock = FakeSocket(gated=True)  # the agent sends but never reads
    conn = AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, 1000, max_total=10_000)
    writer = asyncio.create_task(conn.writer())
    try:
        sent = 0
        while not conn.closed and sent < 1000:
            conn.send_error(UnknownMessageType("unknown message type 'x'"))  # what a flood of bad frames gets
            sent += 1
        assert conn.closed and sent < 50  # cut off near its 1,000-byte allowance, not after 1,000 replies
        await asyncio.wait_for(conn.closing, 5)
        assert conn.queued_bytes == 0 and len(conn._queue) == 0  # the queue is dropped at once
        code, reason = sock.closes[0]
        assert code == 4002 and reason.startswith("queue_limit: ") and "dev-b" in reason
        conn.send(m.PeerDown(peer="dev-a"))  # later frames are dropped quietly
        assert conn.queued_bytes == 0
    finally:
        sock.release(100)
        await asyncio.wait_for(writer, 5)


async def test_server_frames_count_against_the_connection_total() -> None:
    sock = FakeSocket(gated=True)
    conn = AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, 100, max_total=1000)
    conn.enqueue(b"p" * 100, source="peer")
    conn.enqueue(b"s" * 800)  # the server's own: no per-source limit, but the total counts them
    assert conn.queued_bytes == 900 and not conn.closed
    conn.enqueue(b"s" * 101)
    assert conn.closed and conn.queued_bytes == 0
    await asyncio.wait_for(conn.closing, 5)
    assert sock.closes and "1000" in sock.closes[0][1]


async def test_a_peer_finding_the_total_full_is_refused_alone() -> None:
    sock = FakeSocket(gated=True)
    conn = AgentConnection("dev-b", "user-1", sock.send_bytes, sock.close, 100, stall_timeout=0.05, max_total=150)
    conn.enqueue(b"s" * 100)
    await conn.relay_from("peer", b"a" * 50)  # fits the total exactly
    with pytest.raises(QueueLimitExceeded, match="150 bytes already wait for dev-b; limit is 150.*not reading"):
        await conn.relay_from("other", b"b")  # its own allowance is untouched, the total is not
    assert not conn.closed and conn.queued_bytes == 150  # the destination keeps its connection


def test_echoed_text_is_cut_and_escaped() -> None:
    from neuranet.protocol.envelope import Envelope
    from neuranet.protocol.errors import MAX_ERROR_CHARS, MAX_SHOWN_CHARS, shown

    with pytest.raises(UnknownMessageType) as info:
        m.parse(Envelope(type="x" * 200_000 + "\n\ud800"))
    text = str(info.value)
    assert len(text) < 3 * MAX_SHOWN_CHARS and "(199922 more characters)" in text
    assert shown("a\nb\x1b[31m\ud800") == r"'a\nb\x1b[31m\ud800'"  # no forged log lines, no raw escapes
    # An error a device reports (then repeated to the user and logged) is kept to a readable length.
    reply = m.parse(Envelope(type="chunk_reply", body={"request": 1, "chunk": "a" * 64, "ok": False, "error": "e" * 10**6}))
    assert isinstance(reply, m.ChunkReply) and len(reply.error) == MAX_ERROR_CHARS


# --- liveness: a probe unanswered for offline_after, not silence, marks a device offline ---------------


def test_liveness_needs_an_unanswered_probe_not_silence() -> None:
    from neuranet.protocol.liveness import Liveness

    live = Liveness(timeout=12.0, probe_after=3.0, heard_at=100.0)
    assert not live.probe_due(102.9) and live.probe_due(103.0)
    assert not live.gone(1_000_000.0)  # silent for ages (this side was stalled, say): not gone, probe first
    live.probed(1_000_000.0)
    live.probed(1_000_005.0)  # later probes do not restart the clock
    assert not live.gone(1_000_011.9) and live.gone(1_000_012.0) and live.deadline == 1_000_012.0
    live.heard(1_000_011.0)  # any message answers
    assert not live.gone(1_000_100.0) and live.deadline == float("inf") and live.probe_due(1_000_100.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def store_with_a_device(tmp_path):
    """A migrated SQLite store with user ``u`` and its enrolled device ``box``."""
    from neuranet.server.store import Store

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.migrate()
    user, _ = await store.users.create_user("u")
    token, _ = await store.identity.create_join_token(user.user_id)
    return store, user, await store.identity.enrol_device(token, bytes(32), "box")


async def test_a_server_stall_drops_nobody_and_a_dead_agent_goes_after_one_unanswered_probe(tmp_path) -> None:
    from neuranet.config import ServerConfig
    from neuranet.server.hub import Hub

    store, user, device = await store_with_a_device(tmp_path)
    clock = Clock()
    hub = Hub(ServerConfig(data_dir=tmp_path, heartbeat_interval=3.0, offline_after=12.0), store, clock)
    sock = FakeSocket()
    conn = AgentConnection(device.id, user.user_id, sock.send_bytes, sock.close, 1 << 20)
    writer = asyncio.create_task(conn.writer())
    try:
        await hub.register(conn)
        clock.now += 2.0
        await hub.sweep()
        assert sock.sent == []  # heard from recently: nothing to ask
        clock.now += 13.0  # the server was stalled 13 s: it heard nothing, the agent was fine
        await hub.sweep()
        assert device.id in hub.conns and not conn.closed  # silence is no proof: it is asked first
        await conn.drained(timeout=5)
        assert [decode_frame(f).type for f in sock.sent] == ["heartbeat"]
        clock.now += 0.01
        hub.seen(conn)  # its answer (anything it sends) comes in
        clock.now += 11.0
        await hub.sweep()
        await conn.drained(timeout=5)
        assert device.id in hub.conns and len(sock.sent) == 2  # 11 s silent: asked again, not dropped
        clock.now += 11.9
        await hub.sweep()
        assert device.id in hub.conns  # the probe has waited 11.9 s of the 12
        clock.now += 0.1
        await hub.sweep()  # unanswered for 12 s: offline
        assert device.id not in hub.conns and conn.closed and sock.closes[0][0] == 4001
        assert [end is not None for _, end in await store.presence.presence_history(device.id)] == [True]
    finally:
        await conn.close()
        await asyncio.wait_for(writer, 5)
        await store.close()


# --- telemetry: a rate per device, and retention --------------------------------------------------


def test_telemetry_beyond_a_devices_rate_is_dropped_and_counted() -> None:
    from neuranet.server.telemetry import TelemetryIntake

    intake = TelemetryIntake(rate=1.0, burst=10)
    bucket = intake.bucket(now=0.0)
    sample = m.TelemetrySample(ts=50.0, cpu_percent=1, mem_percent=1, mem_used=1, net_sent=1, net_recv=1)
    assert intake.add("d", bucket, [sample] * 1000, now=0.0, wall_now=100.0) == 990  # the burst passes
    assert intake.add("d", bucket, [sample] * 1000, now=0.5, wall_now=100.0) == 1000  # half a token: none
    assert intake.add("d", bucket, [sample] * 3, now=5.0, wall_now=100.0) == 0  # 0.5 + 4.5 s: 5 tokens
    assert intake.add("d", bucket, [sample] * 3, now=5.0, wall_now=100.0) == 1
    assert intake.add("d", bucket, [sample] * 100, now=1e6, wall_now=100.0) == 90  # savings stop at the burst
    assert intake.dropped == 990 + 1000 + 1 + 90
    rows = intake.take_rows()
    assert len(rows) == 10 + 3 + 2 + 10 and intake.take_rows() == []
    future = sample.model_copy(update={"ts": 1e12})  # a device's clock far ahead: recorded as received
    intake.add("d", intake.bucket(0.0), [future], now=0.0, wall_now=100.0)
    assert intake.take_rows()[0]["ts"] == 100.0
    with pytest.raises(ValueError):
        m.TelemetrySample(ts=float("nan"), cpu_percent=1, mem_percent=1, mem_used=1, net_sent=1, net_recv=1)
    with pytest.raises(ValueError):  # a BIGINT column could not hold it, and the flush would fail for all
        m.TelemetrySample(ts=1, cpu_percent=1, mem_percent=1, mem_used=2 ** 63, net_sent=1, net_recv=1)


async def test_telemetry_older_than_the_retention_is_deleted_in_bounded_batches(tmp_path) -> None:
    import time

    from neuranet.config import ServerConfig
    from neuranet.server.hub import Hub

    store, _, device = await store_with_a_device(tmp_path)
    now = time.time()

    def row(ts: float) -> dict:
        return {"device_id": device.id, "ts": ts, "cpu_percent": 1.0, "mem_percent": 1.0, "mem_used": 1,
                "net_sent": 1, "net_recv": 1, "battery_percent": None, "power_plugged": None}

    await store.telemetry.add_telemetry([row(now - 100 * 86400 + i) for i in range(7)] + [row(now - 10.0), row(now)])
    clock = Clock()
    hub = Hub(ServerConfig(data_dir=tmp_path, telemetry_retention=30 * 86400.0), store, clock)
    try:
        assert [await hub.prune(batch=3) for _ in range(3)] == [3, 3, 1]  # full batches go on at once
        assert await hub.prune(batch=3) == 0  # the last was not full: the next round a minute later
        assert [r["ts"] for r in await store.telemetry.telemetry(device.id, 100)] == [now - 10.0, now]
        await store.telemetry.add_telemetry([row(now - 50 * 86400)])
        assert await hub.prune(batch=3) == 0  # within the minute
        clock.now += 60.0
        assert await hub.prune(batch=3) == 1
        assert [r["ts"] for r in await store.telemetry.telemetry(device.id, 100)] == [now - 10.0, now]
    finally:
        await store.close()


# --- revocation: removed devices and disabled users are cut off at once (#13 item 7) --------------


async def test_removing_a_device_or_disabling_a_user_closes_their_connections_now(tmp_path) -> None:
    from neuranet.config import ServerConfig
    from neuranet.server.hub import Hub
    from neuranet.server.store import Store

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.migrate()
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    devices = []
    for owner, name in ((alice, "a1"), (alice, "a2"), (bob, "b1"), (bob, "b2")):
        token, _ = await store.identity.create_join_token(owner.user_id)
        devices.append(await store.identity.enrol_device(token, random.randbytes(32), name))
    hub = Hub(ServerConfig(data_dir=tmp_path), store)
    socks = {d.name: FakeSocket() for d in devices}
    conns = {d.name: AgentConnection(d.id, d.user_id, socks[d.name].send_bytes, socks[d.name].close, 1 << 20)
             for d in devices}
    writers = [asyncio.create_task(c.writer()) for c in conns.values()]
    try:
        for c in conns.values():
            await hub.register(c)
        hub.add_telemetry(conns["a1"], [m.TelemetrySample(ts=0.0, cpu_percent=1.0, mem_percent=1.0, mem_used=1,
                                                          net_sent=0, net_recv=0)])
        await store.identity.remove_device(alice.user_id, devices[0].id)
        await hub.disconnect_device(devices[0].id, "this device was removed by its owner")
        # Told why, then closed and forgotten; its waiting telemetry went too, so the flush still works.
        assert conns["a1"].closed and socks["a1"].closes[0][0] == 4003
        told = [m.parse(decode_frame(f)) for f in socks["a1"].sent]
        assert any(isinstance(t, m.Error) and t.code == "auth_failed" and "removed" in t.message for t in told)
        assert devices[0].id not in hub.conns and not conns["a2"].closed
        await hub.flush()
        # A user disabled: every device of theirs goes, nobody else's.
        await store.users.set_user_disabled("bob", True)
        await hub.disconnect_user(bob.user_id, "the owner of this device was disabled on this coordinator")
        assert conns["b1"].closed and conns["b2"].closed and not conns["a2"].closed
        assert set(hub.conns) == {devices[1].id} and hub.connections_of(bob.user_id) == 0
        # One that finished its handshake just as its owner was disabled is closed when it registers.
        late = AgentConnection(devices[2].id, bob.user_id, socks["b1"].send_bytes, socks["b1"].close, 1 << 20)
        await hub.register(late)
        assert await hub.login_revoked(late) and late.closed and devices[2].id not in hub.conns
        assert not await hub.login_revoked(conns["a2"])
        # And one of a device removed just before it registered (no presence row for a missing device).
        gone = AgentConnection(devices[0].id, alice.user_id, socks["a1"].send_bytes, socks["a1"].close, 1 << 20)
        await hub.register(gone)
        assert await hub.login_revoked(gone) and gone.closed and devices[0].id not in hub.conns
    finally:
        for c in conns.values():
            await c.close()
        await asyncio.gather(*writers, return_exceptions=True)
        await hub.shutdown()
        await store.close()
