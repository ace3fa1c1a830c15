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
import math
import multiprocessing as mp
import os
import queue
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this directory is sys.path[0] already; imported some other way, it may not be. Spawned
# client processes inherit sys.path, which is how they import the function they run.
_BENCH_DIR = str(Path(__file__).resolve().parent)
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

from _load_clients import client_process  # noqa: E402
from _procs import machine_busy, procs_cpu, reap  # noqa: E402
from _stats import MiB, fmt_ms, percentile  # noqa: E402

AIM_AGENTS = 2000
AIM_P99_MS = 100.0


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
            print("  slowest seconds of the window (t+s: max/p99 ms, n): " + ", ".join(
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
                reap(p)
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
