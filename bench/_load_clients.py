"""The simulated agents of bench/agents_load.py: client processes that each hold many real agent connections.

``client_process`` runs its share of the join tokens on one event loop. Each simulated agent makes its own
Ed25519 key, enrols over a real WebSocket to ``/agent`` (hello -> challenge -> signed auth -> welcome), then
sends heartbeats at the interval the server hands out (random phase) and telemetry now and then, timing each
Heartbeat(seq) -> HeartbeatAck(seq). The parent steers the process through ``ctl``: events ``measure`` (the
window is open), ``report`` and ``stop``; the process puts ``("ramped", idx, connected, gave_up)`` and
``("held", idx, connected)`` on ``ctl["progress"]`` and its result dict (or ``{"idx", "crash"}``) on
``ctl["results"]``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import traceback
from typing import Any

from _stats import MiB


class _ClientStats:
    """Counters and samples of the agents in one client process."""

    def __init__(self) -> None:
        self.connected = 0  # agents currently holding a welcomed connection
        self.ever_connected = 0
        self.enrol_failed = 0
        self.reconnects = 0
        self.drops = 0
        self.handshake_ms: list[float] = []
        self.rtt_ms: list[float] = []  # heartbeats sent inside the measurement window
        self.rtt_at: list[float] = []  # wall-clock send time of each rtt_ms sample
        self.hb_sent_window = 0
        self.hb_acked_window = 0
        self.telemetry_sent = 0
        self.server_errors = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        key = what[:160]
        if len(self.errors) < 50 or key in self.errors:
            self.errors[key] = self.errors.get(key, 0) + 1


async def _client_main(idx: int, url: str, tokens: list[str], opts: dict[str, Any], ctl: dict[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from websockets.asyncio.client import connect

    from neuranet.protocol import messages as m
    from neuranet.protocol.auth import auth_payload
    from neuranet.protocol.envelope import PROTOCOL_VERSION, decode_frame, encode_frame

    ws_url = "ws://" + url.split("://", 1)[1].rstrip("/") + "/agent"
    rate = opts["rate"]  # new connections per second, this process
    deadline_ramp = time.monotonic() + opts["ramp_timeout"]
    stats = _ClientStats()
    measuring = asyncio.Event()
    stopping = asyncio.Event()
    ramp_slots = asyncio.Semaphore(opts["max_inflight"])
    lag_ms: list[float] = []
    rng = random.Random(1000 + idx)

    async def handshake(ws: Any, key: Ed25519PrivateKey, pub: bytes, token: str, name: str, device_id: str | None) -> m.Welcome:
        if device_id:
            hello = m.Hello(version=PROTOCOL_VERSION, device_id=device_id, agent_version="bench")
        else:
            hello = m.Hello(version=PROTOCOL_VERSION, agent_version="bench",
                            enrol=m.Enrolment(join_token=token, public_key=pub, name=name))
        await ws.send(encode_frame(hello.envelope()))
        msg = m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 30)))
        if isinstance(msg, m.Error):
            raise RuntimeError(f"server refused hello: {msg.code}: {msg.message}")
        if not isinstance(msg, m.Challenge):
            raise RuntimeError(f"expected challenge, got {msg.TYPE}")
        sig = key.sign(auth_payload(msg.nonce, msg.device_id))
        await ws.send(encode_frame(m.Auth(signature=sig).envelope()))
        msg = m.parse(decode_frame(await asyncio.wait_for(ws.recv(), 30)))
        if isinstance(msg, m.Error):
            raise RuntimeError(f"server refused auth: {msg.code}: {msg.message}")
        if not isinstance(msg, m.Welcome):
            raise RuntimeError(f"expected welcome, got {msg.TYPE}")
        return msg

    async def session(ws: Any, device_id: str, welcome: m.Welcome) -> None:
        """Heartbeat + telemetry + reader on one welcomed connection, until it closes or we stop."""
        pending: dict[int, tuple[float, bool, float]] = {}
        interval = welcome.heartbeat_interval
        tel_every = opts["telemetry_interval"]

        async def reader() -> None:
            async for data in ws:
                if isinstance(data, str):
                    continue
                env = decode_frame(data)
                if env.type == "heartbeat_ack":
                    sent = pending.pop(env.body.get("seq"), None)
                    if sent is not None:
                        t0, in_window, wall = sent
                        if in_window:
                            stats.rtt_ms.append((time.perf_counter() - t0) * 1000.0)
                            stats.rtt_at.append(wall)
                            stats.hb_acked_window += 1
                elif env.type == "error":
                    stats.server_errors += 1
                    stats.error(f"server error frame: {env.body.get('code')}: {env.body.get('message')}")

        async def beater() -> None:
            seq = 0
            loop = asyncio.get_running_loop()
            nxt = loop.time() + rng.uniform(0, interval)  # random phase
            tel_next = loop.time() + rng.uniform(0, tel_every)
            while not stopping.is_set():
                await asyncio.sleep(max(0.0, nxt - loop.time()))
                nxt += interval
                seq += 1
                in_window = measuring.is_set() and not stopping.is_set()
                frame = encode_frame(m.Heartbeat(seq=seq).envelope(src=device_id, dst="server"))
                pending[seq] = (time.perf_counter(), in_window, time.time())
                if in_window:
                    stats.hb_sent_window += 1
                await ws.send(frame)
                if len(pending) > 64:  # bounded: forget very old unanswered heartbeats
                    for old in sorted(pending)[:-64]:
                        del pending[old]
                if loop.time() >= tel_next:
                    tel_next += tel_every
                    sample = m.TelemetrySample(ts=time.time(), cpu_percent=rng.uniform(0, 100), mem_percent=rng.uniform(0, 100),
                                               mem_used=rng.randrange(1 << 30), net_sent=seq * 1000, net_recv=seq * 900)
                    await ws.send(encode_frame(m.Telemetry(samples=[sample]).envelope(src=device_id, dst="server")))
                    stats.telemetry_sent += 1

        tasks = [asyncio.ensure_future(reader()), asyncio.ensure_future(beater()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def agent(i: int, token: str, start_at: float) -> None:
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        name = f"bench-{idx}-{i}"
        device_id: str | None = None
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        attempts = sessions = 0
        while not stopping.is_set() and attempts < opts["max_attempts"] and sessions < 20:
            attempts += 1
            ws = None
            welcomed = False
            try:
                if device_id is None:
                    await ramp_slots.acquire()
                t0 = time.perf_counter()
                try:
                    ws = await connect(ws_url, compression=None, open_timeout=30, ping_interval=20, ping_timeout=20,
                                       max_queue=16, max_size=8 * MiB, close_timeout=2)
                    welcome = await handshake(ws, key, pub, token, name, device_id)
                finally:
                    if device_id is None:
                        ramp_slots.release()
                if device_id is None:
                    stats.handshake_ms.append((time.perf_counter() - t0) * 1000.0)
                else:
                    stats.reconnects += 1
                device_id = welcome.device_id
                welcomed = True
                sessions += 1
                stats.connected += 1
                stats.ever_connected += 1
                attempts = 0  # a welcomed session resets the retry budget
                try:
                    await session(ws, device_id, welcome)
                finally:
                    stats.connected -= 1
                if stopping.is_set():
                    return
                stats.drops += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # record and retry (bounded)
                if welcomed:
                    stats.drops += 1
                stats.error(f"{type(exc).__name__}: {exc}")
            finally:
                if ws is not None and stopping.is_set():
                    pass  # closed in bulk at the end
                elif ws is not None:
                    try:
                        await asyncio.wait_for(ws.close(), 3)
                    except Exception:
                        pass
            if ws is not None:
                sockets.append(ws)
            if stopping.is_set() or time.monotonic() > deadline_ramp + opts["steady_timeout"]:
                return
            await asyncio.sleep(min(10.0, 0.5 * 2 ** attempts) * rng.random())
        if device_id is None:
            stats.enrol_failed += 1

    async def lag_probe() -> None:
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            t = loop.time()
            await asyncio.sleep(0.05)
            if measuring.is_set():
                lag_ms.append(max(0.0, (loop.time() - t - 0.05) * 1000.0))
            if len(lag_ms) > 100_000:
                return

    async def control() -> None:
        """Report progress to the parent and follow its measure/stop events (bounded by time)."""
        ramp_reported = held_reported = window_closed = False
        hard_deadline = time.monotonic() + opts["ramp_timeout"] + opts["steady_timeout"]
        while time.monotonic() < hard_deadline:
            settled = stats.ever_connected + stats.enrol_failed >= len(tokens)
            if not ramp_reported and (settled or time.monotonic() > deadline_ramp):
                ctl["progress"].put(("ramped", idx, stats.connected, stats.enrol_failed))
                ramp_reported = True
            if ctl["measure"].is_set() and not measuring.is_set() and not window_closed:
                measuring.set()
            elif measuring.is_set() and not ctl["measure"].is_set():
                measuring.clear()  # the parent closed the window
                window_closed = True
            if ctl["stop"].is_set():
                break
            if ctl["report"].is_set() and not held_reported:
                ctl["progress"].put(("held", idx, stats.connected))
                held_reported = True
            await asyncio.sleep(0.05)
        stopping.set()

    sockets: list[Any] = []
    t_start = time.monotonic()
    spacing = 1.0 / rate
    agents = [asyncio.ensure_future(agent(i, tok, t_start + i * spacing)) for i, tok in enumerate(tokens)]
    probe = asyncio.ensure_future(lag_probe())
    await control()
    # stop: let sessions notice, then close every socket (bounded in time)
    held_at_stop = stats.connected
    done, pending = await asyncio.wait(agents, timeout=10)
    for t in pending:
        t.cancel()
    await asyncio.gather(*agents, probe, return_exceptions=True)

    async def _close(ws: Any) -> None:
        try:
            await asyncio.wait_for(ws.close(), 5)
        except Exception:
            pass

    await asyncio.wait_for(asyncio.gather(*(_close(ws) for ws in sockets), return_exceptions=True), 20)
    return {
        "idx": idx, "agents": len(tokens), "held_at_stop": held_at_stop, "ever_connected": stats.ever_connected,
        "enrol_failed": stats.enrol_failed, "reconnects": stats.reconnects, "drops": stats.drops,
        "handshake_ms": stats.handshake_ms, "rtt_ms": stats.rtt_ms, "rtt_at": stats.rtt_at, "hb_sent": stats.hb_sent_window,
        "hb_acked": stats.hb_acked_window, "telemetry_sent": stats.telemetry_sent, "server_errors": stats.server_errors,
        "errors": stats.errors, "lag_ms": lag_ms,
    }


def client_process(idx: int, url: str, tokens: list[str], opts: dict[str, Any], ctl: dict[str, Any]) -> None:
    """Entry point of one client process: runs its share of agents on one event loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        import uvloop  # the clients should cost as little as possible; the server is what is measured

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        result = runner(_client_main(idx, url, tokens, opts, ctl))
    except BaseException:
        result = {"idx": idx, "crash": traceback.format_exc()}
    ctl["results"].put(result)
