"""Load test: one real coordinator holding N lightweight simulated agents.

Usage::

    python bench/agents_load.py [--agents N] [--seconds S] [--quick]

A real ``neuranet server`` subprocess is started through :class:`LocalFabric`.
N join tokens are created over REST; then 1-2 client processes (multiprocessing,
asyncio) open N real WebSocket connections to ``/agent`` at a bounded rate and
speak the real protocol: each agent makes its own Ed25519 key, enrols with its
own join token (hello -> challenge -> signed auth -> welcome), then sends a
Heartbeat every ``heartbeat_interval`` seconds (random phase) and a Telemetry
sample now and then, timing Heartbeat(seq) -> HeartbeatAck(seq).

Printed: connections held (server ``/healthz`` and client side), heartbeat
round trip p50/p99/max, the server's RSS per connection and its CPU time, next
to the aim (2,000 agents held, heartbeat p99 under 100 ms, on a 2-core box).

Also printed, to explain the numbers: the client event-loop lag (is the
bench itself the bottleneck?), the slowest seconds of the window, ``/healthz``
latency sampled every 0.1 s (the server's event-loop responsiveness), the
server's garbage-collection pauses and tracked objects per connection, and how
busy the machine was (other processes on a 2-core box distort everything).
The GC/object figures come from a ``sitecustomize`` hook put on the server's
PYTHONPATH (it shadows any other sitecustomize); the server's code is unchanged.

Options: ``--py-spy DIR`` records the server with py-spy during the ramp and
the steady phase (raw collapsed stacks; ``AGENTS_LOAD_PY_SPY_ARGS=--gil`` adds
flags); ``--server-uvloop`` runs the unchanged server on uvloop (experiment).

Every loop is bounded in count and time, and every process started here is
stopped on the way out, error or not.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

AIM_AGENTS = 2000
AIM_P99_MS = 100.0
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for this process (children inherit it); returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    if hard != resource.RLIM_INFINITY and want > hard:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            want = hard
    if want != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def percentile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 100])."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def fmt_ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f} ms"


# --------------------------------------------------------------------------- client process


class _Stats:
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
    stats = _Stats()
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


# --------------------------------------------------------------------------- parent

SERVER_HOOK = """
import gc, os, time
_path = os.environ.get("AGENTS_LOAD_GC_LOG")
if _path:
    _f = open(_path, "a", buffering=1)
    _t0 = [0.0]
    def _gc_timer(phase, info):
        if phase == "start":
            _t0[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - _t0[0]) * 1000.0
            if info["generation"] == 2 or ms > 2.0:
                _f.write(f"{time.time():.3f} {info['generation']} {ms:.2f} {info['collected']}\\n")
    gc.callbacks.append(_gc_timer)
_dump = os.environ.get("AGENTS_LOAD_OBJ_DUMP")
if _dump:
    import collections, json, signal
    def _count_objects(signum, frame):
        objs = gc.get_objects()
        types = collections.Counter(type(o).__name__ for o in objs)
        with open(_dump + ".tmp", "w") as f:
            json.dump({"total": len(objs), "types": dict(types.most_common(40))}, f)
        os.replace(_dump + ".tmp", _dump)
    signal.signal(signal.SIGUSR1, _count_objects)
    open(_dump + ".ready", "w").close()  # the parent only signals a server that has this handler
"""
UVLOOP_HOOK = """
import asyncio, uvloop
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""


def count_server_objects(pid: int, path: Path, timeout: float = 15.0) -> dict[str, Any] | None:
    """Ask the server (through the hook) to count the objects its collector tracks; None if it did not answer."""
    import json

    if not Path(str(path) + ".ready").exists():
        return None  # hook not loaded: SIGUSR1 would kill the server
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    return None


def gc_pauses(path: Path, t0: float, t1: float) -> list[tuple[int, float, int]]:
    """(generation, ms, objects collected) of the server's logged collections between wall times t0 and t1."""
    out: list[tuple[int, float, int]] = []
    try:
        for line in path.read_text().splitlines():
            ts, gen, ms, collected = line.split()
            if t0 <= float(ts) <= t1:
                out.append((int(gen), float(ms), int(collected)))
    except (OSError, ValueError):
        pass
    return out



def healthz(url: str) -> int | None:
    import httpx

    try:
        return int(httpx.get(url + "/healthz", timeout=10).json()["online_devices"])
    except Exception:
        return None


class ServerMeter:
    """RSS and CPU time of the server process (and any children it has)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def nofile(self) -> int:
        import psutil

        return self.proc.rlimit(psutil.RLIMIT_NOFILE)[0]


class Profiler:
    """Optional ``py-spy record`` of the server, one raw (collapsed-stack) file per phase."""

    def __init__(self, pid: int, out_dir: str | None) -> None:
        self.pid, self.out_dir, self.proc = pid, Path(out_dir) if out_dir else None, None

    def start(self, phase: str) -> None:
        if self.out_dir is None:
            return
        import shutil
        import subprocess

        self.stop()
        exe = shutil.which("py-spy")
        if exe is None:
            print("py-spy not found (pip install py-spy); not profiling")
            self.out_dir = None
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        extra = os.environ.get("AGENTS_LOAD_PY_SPY_ARGS", "").split()  # e.g. "--gil" or "--idle"
        self.proc = subprocess.Popen([exe, "record", "-p", str(self.pid), "-r", "100", "-f", "raw", "--nonblocking",
                                      *extra, "-o", str(self.out_dir / f"server-{phase}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class HealthProbe:
    """Times ``GET /healthz`` (no database work) every ``period`` s: the server's event-loop responsiveness."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        import threading

        self.url, self.period = url, period
        self.samples: list[tuple[float, float]] = []  # (wall time, ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)

    def start(self) -> "HealthProbe":
        self._thread.start()
        return self

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:
            while not self._stop.is_set() and len(self.samples) < 100_000:
                t = time.perf_counter()
                try:
                    c.get("/healthz")
                    self.samples.append((time.time(), (time.perf_counter() - t) * 1000.0))
                except Exception:
                    pass
                self._stop.wait(self.period)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(15)
        return self.samples


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def procs_cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def create_join_tokens(fabric: Any, n: int, deadline: float) -> list[str]:
    tokens: list[str] = []
    with fabric.client() as c:
        for _ in range(n):
            if time.monotonic() > deadline:
                raise TimeoutError(f"created only {len(tokens)}/{n} join tokens in time")
            tokens.append(c.create_join_token()["join_token"])
    return tokens


def run(args: argparse.Namespace) -> int:
    from neuranet.fabric import LocalFabric

    n, seconds = args.agents, args.seconds
    procs = args.procs or (1 if n < 1000 else 2)
    limits = raise_nofile(n + 4096)
    cores = os.cpu_count() or 1
    print(f"NeuraNet agents load: {n} agents in {procs} client process(es), {seconds:.0f} s measured, "
          f"ramp {args.rate:.0f} conn/s, telemetry every {args.telemetry_interval:.0f} s, {cores} cores, "
          f"RLIMIT_NOFILE {limits[0]}" + (", server on uvloop (experiment)" if args.server_uvloop else ""))
    print(f"aim: {AIM_AGENTS:,} agents held with heartbeat p99 under {AIM_P99_MS:.0f} ms on this 2-core machine")
    sys.stdout.flush()

    ctx = mp.get_context("spawn")
    ctl = {"progress": ctx.Queue(), "results": ctx.Queue(), "measure": ctx.Event(), "stop": ctx.Event(),
           "report": ctx.Event()}
    workers: list[Any] = []
    profiler: Profiler | None = None
    with tempfile.TemporaryDirectory(prefix="neuranet-agents-load-") as tmp:
        # A sitecustomize hook for the server process only: logs its garbage collections (pauses), and
        # optionally runs it on uvloop. It does not change the server's code.
        hook = Path(tmp) / "server-hook"
        hook.mkdir()
        gc_log = Path(tmp) / "server-gc.log"
        (hook / "sitecustomize.py").write_text(SERVER_HOOK + (UVLOOP_HOOK if args.server_uvloop else ""))
        obj_dump = Path(tmp) / "server-objects.json"
        env: dict[str, str] = {"AGENTS_LOAD_GC_LOG": str(gc_log), "AGENTS_LOAD_OBJ_DUMP": str(obj_dump),
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH", "")]))}
        fabric = LocalFabric(Path(tmp), server_args=["--max-connections-per-user", str(n + 100),
                                                     "--heartbeat", str(args.heartbeat)], env=env)
        try:
            fabric.start_server()
            assert fabric.server is not None
            meter = ServerMeter(fabric.server.pid)
            print(f"server: pid {fabric.server.pid} at {fabric.url}, its RLIMIT_NOFILE {meter.nofile()}")
            profiler = Profiler(fabric.server.pid, args.py_spy)

            t0 = time.monotonic()
            tokens = create_join_tokens(fabric, n, t0 + 300)
            print(f"join tokens: {n} created over REST in {time.monotonic() - t0:.1f} s")

            time.sleep(1.0)
            objs0 = count_server_objects(fabric.server.pid, obj_dump)
            rss0, cpu0 = meter.rss(), meter.cpu()
            share = [tokens[i::procs] for i in range(procs)]
            opts = {"rate": args.rate / procs, "max_inflight": max(1, args.max_inflight // procs),
                    "telemetry_interval": args.telemetry_interval, "max_attempts": 4,
                    "ramp_timeout": n / args.rate + 120.0, "steady_timeout": seconds + 120.0}
            profiler.start("ramp")
            t_ramp = time.monotonic()
            for i in range(procs):
                p = ctx.Process(target=client_process, args=(i, fabric.url, share[i], opts, ctl), daemon=True,
                                name=f"agents-load-{i}")
                p.start()
                workers.append(p)

            # wait for every client process to settle its ramp (bounded)
            ramped: dict[int, tuple[int, int]] = {}
            ramp_deadline = time.monotonic() + opts["ramp_timeout"] + 30
            last_print = time.monotonic()
            while len(ramped) < procs and time.monotonic() < ramp_deadline:
                try:
                    kind, idx, *rest = ctl["progress"].get(timeout=1.0)
                    if kind == "ramped":
                        ramped[idx] = (rest[0], rest[1])
                except queue.Empty:
                    pass
                if any(not p.is_alive() for p in workers):
                    raise RuntimeError("a client process died during the ramp")
                if time.monotonic() - last_print > 5:
                    print(f"  ramping... server online_devices={healthz(fabric.url)} "
                          f"after {time.monotonic() - t_ramp:.0f} s")
                    sys.stdout.flush()
                    last_print = time.monotonic()
            ramp_s = time.monotonic() - t_ramp
            online_after_ramp = healthz(fabric.url)
            connected_after_ramp = sum(c for c, _ in ramped.values())
            failed_ramp = sum(f for _, f in ramped.values())
            time.sleep(2.0)  # let the enrolment writes settle before sampling memory
            rss1, cpu1 = meter.rss(), meter.cpu()
            print(f"ramp: {connected_after_ramp}/{n} agents welcomed in {ramp_s:.1f} s "
                  f"({failed_ramp} gave up), server online_devices={online_after_ramp}")
            sys.stdout.flush()

            # steady state: measure heartbeats for `seconds`
            profiler.start("steady")
            probe = HealthProbe(fabric.url).start()
            client_pids = [p.pid for p in workers if p.pid is not None]
            busy0, clients0, load0 = machine_busy(), procs_cpu(client_pids), os.getloadavg()[0]
            ctl["measure"].set()
            wall_meas = time.time()
            t_meas = time.monotonic()
            mid_online: list[int | None] = []
            while time.monotonic() - t_meas < seconds:
                time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t_meas))))
                if any(not p.is_alive() for p in workers):
                    raise RuntimeError("a client process died during the measurement")
                if len(mid_online) < 1 and time.monotonic() - t_meas > seconds / 2:
                    mid_online.append(healthz(fabric.url))
            cpu2, rss2 = meter.cpu(), meter.rss()
            busy1, clients1, load1 = machine_busy(), procs_cpu(client_pids), os.getloadavg()[0]
            wall_end = time.time()
            ctl["measure"].clear()  # close the window in the clients before anything below disturbs the server
            profiler.stop()
            probe_samples = probe.stop()
            online_end = healthz(fabric.url)
            time.sleep(1.0)  # answers to heartbeats sent inside the window arrive
            objs1 = count_server_objects(fabric.server.pid, obj_dump)  # outside the window: its pause is not measured
            ctl["report"].set()
            held: dict[int, int] = {}
            hold_deadline = time.monotonic() + 30
            while len(held) < procs and time.monotonic() < hold_deadline:
                try:
                    kind, idx, *rest = ctl["progress"].get(timeout=1.0)
                    if kind == "held":
                        held[idx] = rest[0]
                except queue.Empty:
                    pass
            ctl["stop"].set()
            results: list[dict[str, Any]] = []
            res_deadline = time.monotonic() + 90
            while len(results) < procs and time.monotonic() < res_deadline:
                try:
                    results.append(ctl["results"].get(timeout=1.0))
                except queue.Empty:
                    if all(not p.is_alive() for p in workers) and ctl["results"].empty():
                        break
            crashes = [r["crash"] for r in results if "crash" in r]
            for c in crashes:
                print("client process crashed:\n" + c)
            results = [r for r in results if "crash" not in r]

            rtts = sorted(x for r in results for x in r["rtt_ms"])
            per_sec: dict[int, list[float]] = {}
            for r in results:
                for at, x in zip(r["rtt_at"], r["rtt_ms"]):
                    per_sec.setdefault(int(at - wall_meas), []).append(x)
            worst = sorted(per_sec.items(), key=lambda kv: -max(kv[1]))[:5]
            hz = sorted(x for _, x in probe_samples)
            lags = sorted(x for r in results for x in r["lag_ms"])
            hs = sorted(x for r in results for x in r["handshake_ms"])
            sent = sum(r["hb_sent"] for r in results)
            acked = sum(r["hb_acked"] for r in results)
            client_held = sum(held.values())
            p50, p99, mx = percentile(rtts, 50), percentile(rtts, 99), (rtts[-1] if rtts else float("nan"))
            rss_per_conn = (rss1 - rss0) / max(1, online_after_ramp or connected_after_ramp or 1)
            steady_cpu = cpu2 - cpu1
            steady_s = time.monotonic() - t_meas

            print()
            print("=" * 78)
            print(f"connections held: server /healthz online_devices={online_end} "
                  f"(mid-run {mid_online[0] if mid_online else 'n/a'}), client-side={client_held} / {n}")
            print(f"  ramp: {ramp_s:.1f} s at <= {args.rate:.0f} conn/s; handshake (connect+hello..welcome) "
                  f"p50 {fmt_ms(percentile(hs, 50))}, p99 {fmt_ms(percentile(hs, 99))}; "
                  f"gave up {sum(r['enrol_failed'] for r in results)}, drops {sum(r['drops'] for r in results)}, "
                  f"reconnects {sum(r['reconnects'] for r in results)}")
            print(f"heartbeat round trip over {seconds:.0f} s: n={len(rtts)} ({acked}/{sent} acked), "
                  f"p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}, max {fmt_ms(mx)}")
            print(f"  (client event-loop lag during the window: p50 {fmt_ms(percentile(lags, 50))}, "
                  f"p99 {fmt_ms(percentile(lags, 99))}, max {fmt_ms(lags[-1] if lags else float('nan'))}; "
                  f"telemetry frames sent {sum(r['telemetry_sent'] for r in results)}, "
                  f"server error frames {sum(r['server_errors'] for r in results)})")
            print(f"  slowest seconds of the window (t+s: max/p99 ms, n): " + ", ".join(
                f"t+{sec}: {max(xs):.0f}/{percentile(sorted(xs), 99):.0f} ({len(xs)})" for sec, xs in sorted(worst)))
            print(f"  server /healthz latency (event-loop responsiveness, every 0.1 s): n={len(hz)}, "
                  f"p50 {fmt_ms(percentile(hz, 50))}, p99 {fmt_ms(percentile(hz, 99))}, "
                  f"max {fmt_ms(hz[-1] if hz else float('nan'))}")
            all_full = [ms for g, ms, _ in gc_pauses(gc_log, 0.0, wall_end) if g == 2]
            pauses = gc_pauses(gc_log, wall_meas, wall_end)
            full = [ms for g, ms, _ in pauses if g == 2]
            young = max((p for p in pauses if p[0] < 2), key=lambda p: p[1], default=(0, 0.0, 0))
            print(f"  server GC in the window: {len(full)} full (gen 2) collections, "
                  f"max {max(full, default=0.0):.0f} ms, total {sum(full):.0f} ms; slowest young collection "
                  f"{young[1]:.1f} ms (gen {young[0]}, {young[2]} objects freed); since start {len(all_full)} full, "
                  f"the last {all_full[-1] if all_full else 0.0:.0f} ms, max {max(all_full, default=0.0):.0f} ms")
            print(f"server RSS: {rss0 / MiB:.1f} MiB before ramp, {rss1 / MiB:.1f} MiB after, "
                  f"{rss2 / MiB:.1f} MiB at end -> {rss_per_conn / 1024:.1f} KiB per connection")
            if objs0 and objs1:
                conns = max(1, online_end or n)
                grown = {t: c - objs0["types"].get(t, 0) for t, c in objs1["types"].items()}
                top = sorted(grown.items(), key=lambda kv: -kv[1])[:8]
                print(f"  objects the server's collector tracks: {objs0['total']:,} before ramp, {objs1['total']:,} after "
                      f"-> {(objs1['total'] - objs0['total']) / conns:.0f} per connection; most per connection: "
                      + ", ".join(f"{t} {c / conns:.0f}" for t, c in top))
            print(f"server CPU time: ramp {cpu1 - cpu0:.2f} s, steady {steady_cpu:.2f} s over {steady_s:.1f} s "
                  f"({100 * steady_cpu / max(steady_s, 1e-9):.1f}% of one core), total {cpu2:.2f} s since start")
            others = (busy1 - busy0) - (clients1 - clients0) - steady_cpu
            print(f"machine during the window: {100 * (busy1 - busy0) / steady_s:.0f}% busy of {cores * 100}% "
                  f"(server {100 * steady_cpu / steady_s:.0f}%, bench clients {100 * (clients1 - clients0) / steady_s:.0f}%, "
                  f"everything else {100 * max(0.0, others) / steady_s:.0f}%), load average {load0:.1f} -> {load1:.1f}")
            errors: dict[str, int] = {}
            for r in results:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            if errors:
                print("client-side errors (first kinds):")
                for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:8]:
                    print(f"  {v:5d} x {k}")
            held_ok = (online_end or 0) >= n and client_held >= n
            p99_ok = not math.isnan(p99) and p99 < AIM_P99_MS
            print(f"aim: {AIM_AGENTS:,} agents held with heartbeat p99 < {AIM_P99_MS:.0f} ms on 2 cores -> "
                  f"held {'OK' if held_ok else 'MISS'} ({client_held}/{n}), "
                  f"p99 {'OK' if p99_ok else 'MISS'} ({fmt_ms(p99)})"
                  + ("" if n >= AIM_AGENTS else f"  [note: run with N={n} < {AIM_AGENTS}]"))
            print("=" * 78)
            return 0 if (held_ok and p99_ok and not crashes) else 1
        finally:
            if profiler is not None:
                profiler.stop()
            ctl["stop"].set()
            for p in workers:
                p.join(timeout=15)
            for p in workers:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            fabric.close()
            if args.keep_log:
                log = Path(tmp) / "server.log"
                if log.exists():
                    print("--- server.log tail ---")
                    print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=2000, help="simulated agents (default 2000)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the measured steady phase (default 30)")
    ap.add_argument("--quick", action="store_true", help="small run: 200 agents for 10 s")
    ap.add_argument("--procs", type=int, default=0, help="client processes (default: 1 below 1000 agents, else 2)")
    ap.add_argument("--rate", type=float, default=200.0, help="new connections per second, all processes (default 200)")
    ap.add_argument("--max-inflight", type=int, default=64, help="handshakes in flight at once (default 64)")
    ap.add_argument("--heartbeat", type=float, default=3.0, help="heartbeat interval the server hands out (default 3)")
    ap.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds between telemetry samples (default 10)")
    ap.add_argument("--py-spy", metavar="DIR", help="record the server with py-spy during ramp and steady phase")
    ap.add_argument("--server-uvloop", action="store_true",
                    help="experiment: run the (unchanged) server on uvloop instead of the default asyncio loop")
    ap.add_argument("--keep-log", action="store_true", help="print the tail of the server log at the end")
    args = ap.parse_args(argv)
    if args.quick:
        args.agents, args.seconds = 200, 10.0
    if args.agents < 1 or args.seconds <= 0 or args.rate <= 0 or not 0 <= args.procs <= 8:
        ap.error("--agents, --seconds and --rate must be positive; --procs at most 8")

    def _term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
