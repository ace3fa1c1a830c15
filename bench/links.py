#!/usr/bin/env python
"""Loopback benchmark: PeerLink (direct and relayed) against raw-socket baselines, in one run.

    python bench/links.py            # full run (about 2-3 minutes on 2 cores)
    python bench/links.py --quick    # short run

Every figure is measured in this run and reported as a ratio of the baselines
measured next to it, so the numbers mean something on any machine:

  a. blocking socket   two processes, sendall of each message / recv_into a
                       preallocated buffer, parsed in place: the machine's
                       practical limit;
  b. asyncio stream    two processes, StreamReader/StreamWriter, length-prefixed
                       messages;
  c. direct frames,    two processes, neuranet.net.framing.FrameProtocol over TCP
     plain             (the direct path's framing, without a link on top) in
                       plaintext, as direct paths ran before they were encrypted;
  d. direct frames,    the same after the switch to TLS 1.3 that every direct
     TLS               path makes (device certificates, each side pinned to the
                       other's): c. against d. is what the encryption costs;
  e. PeerLink direct   two agent processes enrolled to a real coordinator
                       (``LocalFabric``); the link runs on the direct path (TLS);
  f. PeerLink relay    the same with ``advertise=()``: frames go through the
                       coordinator's WebSocket relay.

Then the hub's aggregate relayed throughput with 8 pairs sending at once
(one process holds the 8 senders, another the 8 receivers).

Throughput: one-way stream of N messages of the size, timed from the first
send until the 8-byte ack of the last one arrives; each figure is the median of
several trials, and the trials of the six transports are interleaved (order
rotated every round) so that load from other processes on the machine hits them
alike. Connection set-up (c. vs d.): a new connection, its handshake and one
round trip of one byte. RTT: one message of the size sent, answered by an 8-byte ack (so it is
one transfer of the size plus a small reply). MB = 10**6 bytes. For every
throughput trial the CPU time of each process (sender, receiver, coordinator)
is reported per wall second and per GB moved.

Allocator settings: with glibc's default malloc settings, a process that
allocates and frees MiB-sized buffers (asyncio's 256 KiB recv chunks, the
StreamReader bytearray and the copies readexactly makes, websockets' frame
buffers) may hand them back to the kernel on free and fault them in again on
the next allocation. How much depends on the heap's state, so it differs from
process to process and run to run: the bare asyncio receiver takes 550-800
minor page faults per MB and spends most of its CPU on them, an agent process
anywhere from 1 to 200. That made the asyncio baseline look slower than PeerLink
direct, which is built on it. By default every process here therefore runs with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised (no such churn anywhere),
so the ratios compare code paths like for like; ``--malloc default`` measures
with glibc's own settings instead. The minor faults per MB of each process are
printed with the progress lines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from neuranet.runner import loop_name

# Run as a script, this directory is sys.path[0] already; imported some other way, it may not be. Spawned
# worker processes inherit sys.path, which is how they import the functions they run.
_BENCH_DIR = str(Path(__file__).resolve().parent)
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

from _links_workers import (  # noqa: E402
    agent_process, asyncio_driver, asyncio_responder, blocking_driver, blocking_responder, frames_driver,
    frames_responder,
)
from _procs import cpu_seconds, minor_faults, reap  # noqa: E402
from _stats import MB, KiB, MiB, pct, size_name  # noqa: E402

CMD_TIMEOUT = 120.0  # no command to a worker process may take longer than this
KINDS = ("blocking", "asyncio", "frames", "frames_tls", "direct", "relay")  # the table's rows, per size
AIMS = {"direct": 0.70, "relay": 0.40}  # fraction of the asyncio stream, at 1 MiB and above
AIM_MIN_SIZE = MiB
N_PAIRS = 8


def plans(quick: bool) -> dict[str, Any]:
    """Message sizes with their byte budgets and sample counts; every loop is also time-capped."""
    if quick:
        return {
            "sizes": [(4 * KiB, 2 * MiB, 100), (MiB, 16 * MiB, 20), (16 * MiB, 32 * MiB, 4)],
            "rounds": 2, "trial_s": 1.5, "rtt_s": 2.0, "agg_bytes": 64 * MiB, "agg_s": 4.0, "handshakes": 20,
        }
    return {
        # (size, bytes per throughput trial, RTT samples in all); every case gets `rounds` trials
        "sizes": [(4 * KiB, 8 * MiB, 400), (MiB, 64 * MiB, 100), (16 * MiB, 64 * MiB, 12)],
        "rounds": 4, "trial_s": 3.0, "rtt_s": 6.0, "agg_bytes": 256 * MiB, "agg_s": 6.0, "handshakes": 50,
    }


# --- the parent: processes, commands, CPU accounting ----------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """A child process driven by commands; every reply is awaited with a deadline."""

    def __init__(self, ctx: Any, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.cmd_q = ctx.Queue()
        self.out_q = ctx.Queue()
        self.proc = ctx.Process(target=target, args=(*args, self.cmd_q, self.out_q), name=name, daemon=True)
        self.proc.start()

    def reply(self, timeout: float = CMD_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                tag, value = self.out_q.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise WorkerError(f"{self.name} exited with code {self.proc.exitcode}") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"{self.name} did not answer within {timeout:.0f}s") from None
                continue
            if tag == "error":
                raise WorkerError(f"{self.name} failed:\n{value}")
            return value

    def call(self, *cmd: Any, timeout: float = CMD_TIMEOUT) -> Any:
        self.cmd_q.put(cmd)
        return self.reply(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.cmd_q.put(("stop",))
            self.proc.join(10)
        reap(self.proc)


@dataclasses.dataclass
class Transport:
    name: str  # blocking / asyncio / direct / relay
    worker: Worker
    key: str
    pids: dict[str, int]


def start_raw(ctx: Any, kind: str, max_size: int, stack: contextlib.ExitStack) -> Transport:
    responder = blocking_responder if kind == "blocking" else asyncio_responder
    driver = blocking_driver if kind == "blocking" else asyncio_driver
    port_q = ctx.Queue()
    rproc = ctx.Process(target=responder, args=(port_q, max_size), name=f"{kind}-responder", daemon=True)
    rproc.start()
    stack.callback(reap, rproc)
    port = port_q.get(timeout=60)
    drv = Worker(ctx, f"{kind}-driver", driver, port)
    stack.callback(drv.stop)
    drv.reply(60)
    return Transport(kind, drv, kind, {"tx": drv.proc.pid, "rx": rproc.pid})


def link_credentials(root: Path) -> dict[str, Any]:
    """Two devices' direct-link credentials, each pinned by the other (as a link grant pins them)."""
    from neuranet.agent.identity import Identity
    from neuranet.net.tls import PeerPin

    out: dict[str, Any] = {}
    for side in ("tx", "rx"):
        ident = Identity.load_or_create(root / f"tls-{side}")
        out[side] = ident.tls_credentials()
        out[f"{side}_pin"] = PeerPin(ident.public_key, out[side].cert)
    return out


def start_frames(ctx: Any, kind: str, max_size: int, tls: dict[str, Any] | None, stack: contextlib.ExitStack) -> Transport:
    """The direct path's framing over TCP, in plaintext (``frames``) or after the TLS switch (``frames_tls``)."""
    port_q = ctx.Queue()
    rproc = ctx.Process(target=frames_responder, args=(port_q, max_size, tls), name=f"{kind}-responder", daemon=True)
    rproc.start()
    stack.callback(reap, rproc)
    port = port_q.get(timeout=60)
    drv = Worker(ctx, f"{kind}-driver", frames_driver, port, tls)
    stack.callback(drv.stop)
    drv.reply(60)
    return Transport(kind, drv, kind, {"tx": drv.proc.pid, "rx": rproc.pid})


def start_server(fab: Any, timeout: float = 30.0) -> None:
    """``fab.start_server()``, tolerating the window where server.json exists but client.json does not yet."""
    from neuranet.client import ClientError, load_client_config

    try:
        fab.start_server()
    except ClientError:
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(0.05)
            try:
                fab.token = load_client_config(None, None, fab.root).token
                return
            except ClientError:
                if time.monotonic() > deadline or fab.server is None or fab.server.poll() is not None:
                    raise


def wait_profiles(fab: Any, ids: list[str], timeout: float = 60.0) -> None:
    """The hub must know every agent's listen addresses before a link is granted."""
    deadline = time.monotonic() + timeout
    with fab.client() as c:
        while True:
            devs = {d["id"]: d for d in c.devices()}
            if all(i in devs and devs[i].get("online") and "listen_addrs" in (devs[i].get("profile") or {}) for i in ids):
                return
            if time.monotonic() > deadline:
                raise WorkerError("agents did not report their profiles in time")
            time.sleep(0.1)


def timed_call(t: Transport, *cmd: Any) -> dict[str, Any]:
    """Run a throughput command and add each process's CPU use (and minor page faults) over its wall time."""
    faults, before, t0 = minor_faults(t.pids), cpu_seconds(t.pids), time.perf_counter()
    res = t.worker.call(*cmd)
    wall = time.perf_counter() - t0
    after = cpu_seconds(t.pids)
    res["faults_per_mb"] = {n: (f - faults[n]) / (res["bytes"] / MB) for n, f in minor_faults(t.pids).items()}
    res["cpu"] = {n: (after[n] - before[n]) / wall for n in t.pids}  # share of one core
    res["cpu_s_per_gb"] = {n: (after[n] - before[n]) / (res["bytes"] / 1e9) for n in t.pids}
    return res


def measure(transports: list[Transport], plan: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """For each size: interleaved throughput trials (order rotated per round), then interleaved RTT samples."""
    rounds = plan["rounds"]
    out: dict[str, dict[int, dict[str, Any]]] = {t.name: {} for t in transports}
    for size, trial_bytes, rtt_count in plan["sizes"]:
        for t in transports:
            t.worker.call("prep", t.key, size)
        trials: dict[str, list[dict[str, Any]]] = {t.name: [] for t in transports}
        rtts: dict[str, list[float]] = {t.name: [] for t in transports}
        for r in range(rounds):
            for t in transports[r % len(transports):] + transports[: r % len(transports)]:
                trials[t.name].append(timed_call(t, "tput", t.key, max(1, trial_bytes // size), plan["trial_s"]))
        for r in range(rounds):
            for t in transports[r % len(transports):] + transports[: r % len(transports)]:
                rtts[t.name] += t.worker.call("rtt", t.key, max(1, rtt_count // rounds), plan["rtt_s"] / rounds)
        for t in transports:
            ts = trials[t.name]
            rates = [x["mbps"] for x in ts]
            res = {
                "mbps": statistics.median(rates), "mbps_min": min(rates), "mbps_max": max(rates), "trials": ts,
                "msgs": sum(x["msgs"] for x in ts), "bytes": sum(x["bytes"] for x in ts), "rtt_ms": rtts[t.name],
                "cpu": {n: statistics.median(x["cpu"][n] for x in ts) for n in t.pids},
                "cpu_s_per_gb": {n: statistics.median(x["cpu_s_per_gb"][n] for x in ts) for n in t.pids},
                "faults_per_mb": {n: statistics.median(x["faults_per_mb"][n] for x in ts) for n in t.pids},
                "path": ts[-1].get("path", "tcp"), "paths_used": sorted({p for x in ts for p in x.get("paths_used", [])}),
            }
            out[t.name][size] = res
            print(f"  {t.name:<9} {size_name(size):>7}: {res['mbps']:8.1f} MB/s (trials {res['mbps_min']:.0f}-"
                  f"{res['mbps_max']:.0f})  RTT p50 {pct(res['rtt_ms'], 50):8.3f} ms  path {res['path']}  "
                  f"minor faults/MB " + "/".join(f"{k} {v:.0f}" for k, v in res["faults_per_mb"].items()), flush=True)
    return out


def run_all(ctx: Any, root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    from neuranet.fabric import LocalFabric

    max_size = max(s for s, _, _ in plan["sizes"])
    with contextlib.ExitStack() as stack:
        print("starting: blocking, asyncio and direct-path (plaintext, TLS) socket pairs, coordinator, two agent "
              "processes", flush=True)
        tls = link_credentials(root)
        transports = [start_raw(ctx, "blocking", max_size, stack), start_raw(ctx, "asyncio", max_size, stack),
                      start_frames(ctx, "frames", max_size, None, stack),
                      start_frames(ctx, "frames_tls", max_size, tls, stack)]
        fab = stack.enter_context(LocalFabric(root / "fabric"))
        start_server(fab)
        assert fab.server is not None
        n_agents = 1 + N_PAIRS  # per side: one direct-capable agent and N_PAIRS relay-only agents
        with fab.client() as c:
            tokens = [c.create_join_token()["join_token"] for _ in range(2 * n_agents)]
        workers = []
        for side in ("tx", "rx"):
            specs = []
            for i in range(n_agents):
                name = f"{side}-direct" if i == 0 else f"{side}-relay{i}"
                specs.append({"name": name, "data_dir": str(root / "agents" / name), "join_token": tokens.pop(),
                              "advertise": None if i == 0 else ()})
            w = Worker(ctx, f"agents-{side}", agent_process, side, fab.url, specs)
            stack.callback(w.stop)
            workers.append(w)
        tx, rx = workers
        tx_ids, rx_ids = tx.reply(120), rx.reply(120)
        wait_profiles(fab, tx_ids + rx_ids)
        pids = {"tx": tx.proc.pid, "rx": rx.proc.pid, "server": fab.server.pid}
        for key, i in (("direct", 0), ("relay", 1)):
            opened = tx.call("open", key, i, rx_ids[i], key)
            if opened["path"] != key:
                raise WorkerError(f"the {key} link came up on path {opened['path']!r}")
            transports.append(Transport(key, tx, key, pids))

        print(f"measuring ({plan['rounds']} interleaved rounds per size)", flush=True)
        results: dict[str, Any] = measure(transports, plan)
        for t in transports[2:4]:  # connection set-up, plaintext vs TLS, alternating
            results.setdefault("handshake_ms", {})[t.name] = []
        for _ in range(plan["handshakes"]):
            for t in transports[2:4]:
                results["handshake_ms"][t.name] += t.worker.call("handshake", 1)
        hs = results["handshake_ms"]
        print(f"  new connection + one round trip: plaintext p50 {pct(hs['frames'], 50):.2f} ms, "
              f"TLS p50 {pct(hs['frames_tls'], 50):.2f} ms", flush=True)
        for key, i in (("direct", 0), ("relay", 1)):
            rx_paths = rx.call("paths", i)
            results[key + "_rx_paths"] = rx_paths[-1] if rx_paths else None
        tx.call("close", "direct")

        # the hub's aggregate: N_PAIRS relayed links sending at once (pair 1 is the relay link above)
        keys = ["relay"] + [f"relay{i}" for i in range(2, N_PAIRS + 1)]
        for i, key in enumerate(keys[1:], start=2):
            opened = tx.call("open", key, i, rx_ids[i], "relay")
            if opened["path"] != "relay":
                raise WorkerError(f"aggregate pair {i} came up on path {opened['path']!r}")
        agg_t = Transport("aggregate", tx, "", pids)
        per_link = max(1, plan["agg_bytes"] // plan["rounds"] // N_PAIRS // MiB)
        aggs = [timed_call(agg_t, "agg", keys, MiB, per_link, plan["agg_s"]) for _ in range(plan["rounds"])]
        aggs.sort(key=lambda a: a["mbps"])
        agg = aggs[len(aggs) // 2]
        agg["trials"] = [a["mbps"] for a in aggs]
        results["aggregate"] = agg
        print(f"  hub aggregate, {N_PAIRS} pairs x 1 MiB: {agg['mbps']:8.1f} MB/s (trials "
              f"{aggs[0]['mbps']:.0f}-{aggs[-1]['mbps']:.0f})", flush=True)
    return results


# --- report ---------------------------------------------------------------------------------


def render(results: dict[str, Any], plan: dict[str, Any], quick: bool, elapsed: float) -> str:
    rows = [("size", "transport", "path (tx: used / rx: used)", "MB/s", "trials min-max", "of asyncio", "of blocking",
             "RTT p50 ms", "RTT p99 ms", "rtts", "CPU% tx/rx/srv", "CPU s/GB tx/rx/srv", "aim (of asyncio)")]
    names = {"blocking": "a. blocking socket", "asyncio": "b. asyncio stream", "frames": "c. direct frames, plain",
             "frames_tls": "d. direct frames, TLS", "direct": "e. PeerLink direct", "relay": "f. PeerLink relay"}
    path_problems = []
    for size, _, _ in plan["sizes"]:
        base_a = results["asyncio"][size]["mbps"]
        base_b = results["blocking"][size]["mbps"]
        for i, kind in enumerate(KINDS):
            r = results[kind][size]
            if kind in ("direct", "relay"):
                rx = results[kind + "_rx_paths"] or {"path": "?", "paths_used": []}
                path = f"{r['path']}: {'+'.join(r['paths_used']) or '-'} / {rx['path']}: {'+'.join(rx['paths_used']) or '-'}"
                if r["paths_used"] != [kind] or rx["paths_used"] != [kind] or r["path"] != kind or rx["path"] != kind:
                    path_problems.append(f"{names[kind]} at {size_name(size)}: {path}")
            else:
                path = "tls 1.3" if kind == "frames_tls" else "tcp"
            aim = ""
            if kind in AIMS and size >= AIM_MIN_SIZE:
                frac = r["mbps"] / base_a
                aim = f">={AIMS[kind]:.0%} {'MET' if frac >= AIMS[kind] else 'MISSED'}"
            cpu = r["cpu"]
            cpu_s = f"{cpu['tx'] * 100:.0f}/{cpu['rx'] * 100:.0f}/" + (f"{cpu['server'] * 100:.0f}" if "server" in cpu else "-")
            gb = r["cpu_s_per_gb"]
            gb_s = f"{gb['tx']:.2f}/{gb['rx']:.2f}/" + (f"{gb['server']:.2f}" if "server" in gb else "-")
            rows.append((size_name(size) if i == 0 else "", names[kind], path, f"{r['mbps']:.1f}",
                         f"{r['mbps_min']:.0f}-{r['mbps_max']:.0f}", f"{r['mbps'] / base_a:.0%}",
                         f"{r['mbps'] / base_b:.0%}", f"{pct(r['rtt_ms'], 50):.3f}", f"{pct(r['rtt_ms'], 99):.3f}",
                         str(len(r["rtt_ms"])), cpu_s, gb_s, aim))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    right = {3, 4, 5, 6, 7, 8, 9, 10, 11}

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(cell.rjust(widths[c]) if c in right else cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip()

    sizes_desc = ", ".join(f"{size_name(s)}: {plan['rounds']} x {b // MiB} MiB" for s, b, _ in plan["sizes"])
    lines = [
        f"NeuraNet link benchmark ({'quick' if quick else 'full'} run, loopback, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load avg {os.getloadavg()[0]:.2f}, {elapsed:.0f}s)",
        f"throughput: median of {plan['rounds']} interleaved trials, each a one-way stream of messages timed until the "
        f"8-byte ack of the last ({sizes_desc}; each trial also capped at {plan['trial_s']:.1f}s)",
        f"event loop: {loop_name()} in the asyncio-stream and agent processes (neuranet.runner.run_service, as the CLI runs agents)",
        f"glibc malloc: {'tuned (MALLOC_MMAP_THRESHOLD_=64MiB, MALLOC_TRIM_THRESHOLD_=256MiB)' if os.environ.get('MALLOC_MMAP_THRESHOLD_') else 'default settings'} in every process",
        "RTT: one message of the size answered by an 8-byte ack. MB = 10^6 bytes. "
        "CPU% / CPU s/GB: median over the trials of each process's CPU time per wall time (100 = one core) "
        "and per GB moved",
        "",
        fmt(rows[0]),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows[1:]:
        if row[0] and lines[-1][:1] != "-":
            lines.append("")
        lines.append(fmt(row))
    agg = results["aggregate"]
    single = results["relay"].get(MiB)
    per = sorted(p["mbps"] for p in agg["per_link"])
    paths = sorted({p["path"] for p in agg["paths"]} | {u for p in agg["paths"] for u in p["paths_used"]})
    cpu = agg["cpu"]
    lines += [
        "",
        f"Hub aggregate relay: {N_PAIRS} pairs sending 1 MiB messages at once (one process holds the {N_PAIRS} senders, "
        f"another the {N_PAIRS} receivers; paths: {'+'.join(paths)})",
        f"  total {agg['mbps']:.1f} MB/s through the server (median of {len(agg['trials'])} trials: "
        f"{', '.join(f'{x:.0f}' for x in agg['trials'])}; median trial moved {agg['bytes'] / MiB:.0f} MiB in "
        f"{agg['wall']:.2f}s; per pair min {per[0]:.1f} / median {statistics.median(per):.1f} / max {per[-1]:.1f} MB/s)",
    ]
    if single:
        lines.append(f"  = {agg['mbps'] / single['mbps']:.2f}x one relayed pair at 1 MiB, "
                     f"{agg['mbps'] / results['asyncio'][MiB]['mbps']:.0%} of one asyncio stream at 1 MiB")
    gb = agg["cpu_s_per_gb"]
    lines.append(f"  CPU% (s/GB): server {cpu['server'] * 100:.0f} ({gb['server']:.2f}), senders' process "
                 f"{cpu['tx'] * 100:.0f} ({gb['tx']:.2f}), receivers' process {cpu['rx'] * 100:.0f} ({gb['rx']:.2f})")
    lines += ["", "What encryption costs the direct path (c. plaintext vs d. TLS 1.3, the same framing; e. runs on d.):"]
    for size, _, _ in plan["sizes"]:
        plain, tls = results["frames"][size], results["frames_tls"][size]
        lines.append(f"  {size_name(size):>6}: {plain['mbps']:8.1f} -> {tls['mbps']:8.1f} MB/s ({tls['mbps'] / plain['mbps']:6.1%}); "
                     f"CPU s/GB tx {plain['cpu_s_per_gb']['tx']:.2f} -> {tls['cpu_s_per_gb']['tx']:.2f}, "
                     f"rx {plain['cpu_s_per_gb']['rx']:.2f} -> {tls['cpu_s_per_gb']['rx']:.2f}; "
                     f"RTT p50 {pct(plain['rtt_ms'], 50):.3f} -> {pct(tls['rtt_ms'], 50):.3f} ms")
    hs = results["handshake_ms"]
    lines.append(f"  new connection and first round trip: p50 {pct(hs['frames'], 50):.2f} -> {pct(hs['frames_tls'], 50):.2f} ms, "
                 f"p99 {pct(hs['frames'], 99):.2f} -> {pct(hs['frames_tls'], 99):.2f} ms ({len(hs['frames_tls'])} each)")
    lines += ["", "Aims (issue): PeerLink direct >= 70% and relayed >= 40% of the asyncio stream at 1 MiB and above."]
    for kind in ("direct", "relay"):
        for size, _, _ in plan["sizes"]:
            if size >= AIM_MIN_SIZE:
                frac = results[kind][size]["mbps"] / results["asyncio"][size]["mbps"]
                lines.append(f"  {kind:<6} {size_name(size):>6}: {frac:6.1%} of asyncio (aim {AIMS[kind]:.0%})  "
                             f"{'MET' if frac >= AIMS[kind] else 'MISSED'}")
    if path_problems:
        lines += ["", "WARNING: paths not as expected:"] + [f"  {p}" for p in path_problems]
    else:
        lines += ["", "Paths verified: e. used only the direct path and f. only the relay, on both ends "
                      "(link.path and link.paths_used)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (fewer bytes, trials and samples)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (server and agent logs)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned (default): every process runs with glibc MALLOC_MMAP_THRESHOLD_=64MiB and "
                         "MALLOC_TRIM_THRESHOLD_=256MiB, so no process pays mmap/munmap churn for transient "
                         "MiB-sized buffers; default: glibc's own settings (see the module docstring)")
    args = ap.parse_args()
    if args.malloc == "tuned":  # inherited by every process started below: baselines, coordinator, agents
        os.environ.update(MALLOC_MMAP_THRESHOLD_=str(64 * MiB), MALLOC_TRIM_THRESHOLD_=str(256 * MiB))
    else:
        for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            os.environ.pop(var, None)
    plan = plans(args.quick)
    # SIGTERM unwinds like Ctrl-C, so every process started below is still stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ctx = mp.get_context("spawn")
    root = Path(tempfile.mkdtemp(prefix="neuranet-bench-"))
    start = time.perf_counter()
    try:
        results = run_all(ctx, root, plan)
    except BaseException:
        for log in sorted(root.glob("fabric/*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            if tail:
                print(f"--- {log.name} (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(render(results, plan, args.quick, time.perf_counter() - start))
    if args.json:
        args.json.write_text(json.dumps(results, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
