#!/usr/bin/env python
"""File availability on the real SETI@home trace: where replicas go, and moving them ahead of outages.

    python bench/placement.py            # 1,000 files, k = 2, 3, 5 (a few minutes)
    python bench/placement.py --quick    # 200 files, k = 3 only

A trace-driven simulation that uses the product's own code: `neuranet.storage.placement`
(`place`, `plan_moves`) and `neuranet.forecast` (`AvailabilityForecast`). The trace's hosts
(shared/data/boinc-seti-availability-dev.csv, 104 hosts over 12.3 days) are the devices; a host
is online when the trace says so and gone after its history ends. Files are stored at the start
of day 4 (what came before is the history placement may learn from) and followed every 15 minutes
to the end of the trace. A file is one chunk (sizes drawn log-normally); it is retrievable at a
time when at least one of its holders is online then. Every device offers the same quota:
``--slack`` times its share of all replicas' bytes (so the best hosts cannot take everything).

Policies, each at k = 2, 3 and 5 replicas:
  random               k distinct random devices with room; never moves.
  best past            the devices with the highest online fraction before day 4, best first
                       while they have room; never moves.
  forecast             `place` on the forecaster's P(online) at 15 min / 1 h / 6 h / 24 h
                       (fitted on days 0-4 only, refitted every ``--refit-hours`` on what is
                       known by then), then every 15 minutes `plan_moves`: repair for devices
                       gone or offline past ``--deadline-hours``, and migration of files whose
                       predicted availability is below ``--target``; copies only between
                       online devices, at most ``--rate`` stored bytes per stored byte per day
                       (spread evenly over the day's steps).

Two reference rows that are not policies, since they look at the evaluated days themselves (the
future): "hindsight*" places statically on the hosts with the highest online fraction over those
days; "hindsight**" greedily on the hosts that together cover most of them (it knows *when* each
host is online). They bound what knowing each host's future availability, and knowing the future
outright, would give.

Reported per policy and k: mean over files of the fraction of time retrievable, the worst 1% of
files (1st percentile), and bytes copied per stored byte per day. Aim (issue 6): forecast at k = 3
mean >= 0.95, worst 1% >= 0.8, at most 1 byte moved per stored byte per day. At k = 3 the share of
files readable is also split between the trace's recording gaps (no host changes for over a day;
every host holds its state at the gap's first moment) and the rest of the time, with where the
hosts online through the longest gap ranked by their online fraction before it.

Then (``--transfer-mib``, 0 to skip) the real thing on loopback: a coordinator and three agents
(``--no-direct``, so PeerLinks between them relay through the coordinator), a file of that size
put with one replica on the two that offer storage and got back (`neuranet.storage.transfer`) both
through the REST API and through the third agent, "this machine's" (`files put` / `get` when an
agent runs here: each chunk over a PeerLink to or from its holder, relayed here), next to the same number of
bytes copied from one agent to another as plain PeerLink bytes through the relay (a link test,
1 MiB messages). Then the same with direct PeerLinks between the agents (the agent rows now skip
the coordinator for the bytes; put and get without an agent still go through it), next to direct
PeerLink bytes. Each figure is the median of three, interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's neuranet

from neuranet.forecast.model import AvailabilityForecast, ForecastConfig  # noqa: E402
from neuranet.forecast.trace import DAY, HOUR, DeviceHistory, read_trace, recording_gaps  # noqa: E402
from neuranet.storage.placement import DEFAULT_WEIGHTS, ChunkState, DeviceView, place, plan_moves  # noqa: E402

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "boinc-seti-availability-dev.csv"
STEP = 900.0
START_DAY = 4


@dataclass
class World:
    """The trace on the simulation's clock: who is online at each step, who is gone, what is known."""

    histories: list[DeviceHistory]
    times: np.ndarray  # [steps]
    online: np.ndarray  # bool [hosts, steps]
    gone: np.ndarray  # bool [hosts, steps]: the host's history has ended
    past_fraction: np.ndarray  # [hosts] online fraction before the start

    @property
    def ids(self) -> list[str]:
        return [h.device_id for h in self.histories]


def load_world(path: Path) -> World:
    trace = read_trace(path)
    histories = [trace[k] for k in trace]
    start = trace.start + START_DAY * DAY
    times = np.arange(start, trace.end, STEP)
    states = np.stack([h.states_at(times) for h in histories])
    gone = np.stack([times >= h.end for h in histories])
    return World(histories, times, states == 1.0, gone, online_fraction(histories, trace.start, start))


def online_fraction(histories: list[DeviceHistory], start: float, end: float) -> np.ndarray:
    """Each host's online share of the time its state is known in [start, end)."""
    return np.array([float(h.online_seconds(start, end)) / max(float(h.known_seconds(start, end)), 1.0)
                     for h in histories])


def forecasts(world: World, refit_hours: float, config: ForecastConfig) -> np.ndarray:
    """P(online at t + h) for every host, step and horizon, each from a model fitted only on what was
    known before its step's refit time, and each host's history up to the step."""
    steps = len(world.times)
    out = np.zeros((len(world.histories), steps, len(config.features.horizons)))
    refit_every = max(1, int(refit_hours * HOUR / STEP))
    for first in range(0, steps, refit_every):
        t_fit = world.times[first]
        t0 = time.perf_counter()
        model = AvailabilityForecast(config).fit([h.clipped(end=t_fit) for h in world.histories], until=t_fit)
        block = slice(first, min(steps, first + refit_every))
        for i, h in enumerate(world.histories):
            known = ~np.isnan(h.states_at(world.times[block]))
            if known.any():
                rows = np.flatnonzero(known) + first
                out[i, rows] = model.predict_many(h.clipped(end=world.times[rows][-1]), world.times[rows])
        print(f"  forecaster fitted on the trace before day {t_fit / DAY:.1f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return out


@dataclass
class Outcome:
    available: np.ndarray  # [files] fraction of steps retrievable
    moved_per_stored_day: float
    per_step: np.ndarray | None = None  # [steps] fraction of files retrievable
    moved_at: np.ndarray | None = None  # [steps] bytes copied / stored bytes


def capacities(sizes: np.ndarray, k: int, hosts: int, slack: float) -> np.ndarray:
    # At least the largest file, so that a few big files still fit somewhere.
    return np.full(hosts, max(int(slack * sizes.sum() * k / hosts), int(sizes.max())))


def static_outcome(world: World, holders: list[list[int]], sizes: np.ndarray) -> Outcome:
    readable = np.stack([world.online[h].any(axis=0) for h in holders])  # [files, steps]
    return Outcome(readable.mean(axis=1), 0.0, readable.mean(axis=0))


def random_placement(world: World, sizes: np.ndarray, k: int, slack: float, rng: np.random.Generator) -> Outcome:
    free = capacities(sizes, k, len(world.histories), slack)
    holders = []
    for size in sizes:
        room = np.flatnonzero(free >= size)
        chosen = rng.choice(room, size=min(k, len(room)), replace=False)
        free[chosen] -= size
        holders.append(list(chosen))
    return static_outcome(world, holders, sizes)


def best_past_placement(world: World, sizes: np.ndarray, k: int, slack: float) -> Outcome:
    free = capacities(sizes, k, len(world.histories), slack)
    order = np.argsort(-world.past_fraction, kind="stable")
    holders = []
    for size in sizes:
        chosen = [i for i in order if free[i] >= size][:k]
        free[chosen] -= size
        holders.append(chosen)
    return static_outcome(world, holders, sizes)


def hindsight_placement(world: World, sizes: np.ndarray, k: int, slack: float, joint: bool) -> Outcome:
    """Not a policy: static placement that knows the evaluation window, for reference. ``joint``
    False: each host's own online fraction over the window (its future availability, not when);
    True: greedily the hosts that cover most of the window's steps together (when each is online)."""
    free = capacities(sizes, k, len(world.histories), slack)
    ahead = world.online.mean(axis=1)
    holders = []
    for size in sizes:
        chosen: list[int] = []
        covered = np.zeros(world.online.shape[1], dtype=bool)
        for _ in range(k):
            room = np.flatnonzero(free >= size)
            room = room[~np.isin(room, chosen)]
            if not len(room):
                break
            gain = (world.online[room] & ~covered).sum(axis=1) if joint else ahead[room]
            best = room[np.lexsort((free[room], gain))[-1]]
            chosen.append(int(best))
            covered |= world.online[best]
        free[chosen] -= size
        holders.append(chosen)
    return static_outcome(world, holders, sizes)


def gap_report(world: World, results: dict[tuple[str, int], Outcome], k: int) -> None:
    """How the policies fare inside the trace's recording gaps (no host changes for over a day: every
    host frozen in its state at the gap's first moment) and outside them, and who was online then."""
    gaps = [(a, b) for a, b in recording_gaps(world.histories) if b > world.times[0]]
    inside = np.zeros(len(world.times), dtype=bool)
    for a, b in gaps:
        inside |= (world.times >= a) & (world.times < b)
    print("\nrecording gaps in the evaluated days: "
          + ", ".join(f"{max(a, world.times[0]) / DAY:.2f}-{b / DAY:.2f} d" for a, b in gaps)
          + f" ({inside.mean():.0%} of the evaluated time)")
    print(f"{'k = ' + str(k):12} {'in gaps':>8} {'outside':>8}")
    for (name, kk), o in results.items():
        if kk == k and o.per_step is not None:
            print(f"{name:12} {o.per_step[inside].mean():8.3f} {o.per_step[~inside].mean():8.3f}")
    if not gaps:
        return
    a, b = max(((max(a, world.times[0]), b) for a, b in gaps), key=lambda g: g[1] - g[0])
    step = int(np.searchsorted(world.times, a, side="right"))
    frozen = set(np.flatnonzero(world.online[:, min(step, len(world.times) - 1)]))
    before = online_fraction(world.histories, min(h.start for h in world.histories), a)
    order = list(np.argsort(-before, kind="stable"))
    ranks = sorted(order.index(i) + 1 for i in frozen)
    print(f"longest gap in them, {a / DAY:.2f}-{b / DAY:.2f} d: {len(frozen)} hosts online through it, ranked "
          f"{', '.join(map(str, ranks))} of {len(order)} by their online fraction over the trace before it "
          f"(the top {ranks[0] - 1 if ranks else len(order)} are offline throughout)")


def forecast_placement(world: World, p: np.ndarray, sizes: np.ndarray, k: int, args: argparse.Namespace) -> Outcome:
    ids = world.ids
    index = {d: i for i, d in enumerate(ids)}
    hosts, steps = world.online.shape
    free = capacities(sizes, k, hosts, args.slack)
    names = [f"f{j}" for j in range(len(sizes))]

    def views(s: int) -> list[DeviceView]:
        return [DeviceView(ids[i], bool(world.online[i, s]), tuple(np.clip(p[i, s], 0.0, 1.0)), int(free[i]))
                for i in range(hosts) if not world.gone[i, s]]

    first = views(0)
    holders: list[list[int]] = []
    for size in sizes:
        chosen = place(int(size), k, first, online_only=False, free={d: int(free[index[d]]) for d in ids},
                       weights=args.weights)
        for d in chosen:
            free[index[d]] -= size
        holders.append([index[d] for d in chosen])
    stored = float(sum(sizes[j] * len(h) for j, h in enumerate(holders)))
    # A token bucket: ``rate`` stored bytes per stored byte per day on average, bursts of at most
    # ``burst_hours`` of it (what a device can copy ahead of an outage without flooding its links).
    refill = args.rate * stored * STEP / DAY
    capacity = args.rate * stored * args.burst_hours * HOUR / DAY
    bucket = 0.0
    deadline = int(args.deadline_hours * HOUR / STEP)
    offline_for = np.zeros(hosts, dtype=np.int64)
    available = np.zeros(len(sizes))
    per_step = np.zeros(steps)
    moved_at = np.zeros(steps)
    moved = 0.0
    for s in range(steps):
        online = world.online[:, s]
        offline_for = np.where(online, 0, offline_for + 1)
        now = np.array([online[h].any() for h in holders])
        available += now
        per_step[s] = now.mean()
        lost = {ids[i] for i in range(hosts) if world.gone[i, s] or offline_for[i] > deadline}
        chunks = [ChunkState(names[j], int(sizes[j]), tuple(ids[i] for i in h), replicas=k, target=args.target)
                  for j, h in enumerate(holders)]
        bucket = min(capacity, bucket + refill)
        for m in plan_moves(chunks, views(s), int(bucket), lost=lost, weights=args.weights):
            bucket -= sizes[int(m.chunk[1:])]
            j = int(m.chunk[1:])
            t, drop = index[m.target], (index[m.drop] if m.drop is not None else None)
            holders[j].append(t)
            free[t] -= sizes[j]
            if drop is not None:
                holders[j].remove(drop)
                free[drop] += sizes[j]
            moved += sizes[j]
            moved_at[s] += sizes[j] / stored
    days = steps * STEP / DAY
    return Outcome(available / steps, moved / (stored * days), per_step, moved_at)


def transfer(mib: int, direct: bool) -> None:
    """files put / get throughput next to plain PeerLink bytes, on loopback: with ``direct`` False the
    agents' PeerLinks relay through the coordinator, else they connect directly."""
    import statistics
    import tempfile

    from neuranet.net.local_api import LocalAgent
    from neuranet.fabric import LocalFabric
    from neuranet.storage.transfer import download, upload

    size = mib * 2 ** 20
    way = "direct" if direct else "relay"
    flags = ["--no-measure"] + ([] if direct else ["--no-direct"])
    with tempfile.TemporaryDirectory(prefix="neuranet-bench-files-") as tmp, LocalFabric(Path(tmp)) as fab:
        fab.start_server()
        for name in ("a", "b"):
            fab.start_agent(name, extra=[*flags, "--storage", f"{4 * mib}M"])
        fab.start_agent("here", extra=flags)  # this machine's agent, no storage
        devices = fab.wait_online(["a", "b", "here"])
        here = LocalAgent(Path(tmp) / "agents" / "here")
        # Two payloads: chunks are kept once per user, so the same bytes put twice would not move.
        src, other = Path(tmp) / "payload.bin", Path(tmp) / "other.bin"
        for path in (src, other):
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(2 ** 20))
        rates: dict[str, list[float]] = {"files put": [], "put via agent": [], "files get": [], "get via agent": [],
                                         f"{way} PeerLink": []}

        def timed(name: str, run: Any) -> Any:
            t0 = time.perf_counter()
            out = run()
            rates[name].append(size / (time.perf_counter() - t0))
            paths = out.get("paths", {}) if isinstance(out, dict) else {}
            if name.endswith("via agent") and set(paths) != {way}:
                print(f"  ({name}: chunks went {paths})")
            return out

        with fab.client() as c:
            for trial in range(3):
                with open(src, "rb") as f:
                    timed("files put", lambda: upload(c, f, f"payload-{trial}", replicas=1))
                with open(other, "rb") as f:
                    timed("put via agent", lambda: upload(c, f, f"other-{trial}", replicas=1, agent=here))
                c.delete_file(f"other-{trial}")
                timed("files get", lambda: download(c, f"payload-{trial}", Path(tmp) / "back.bin"))
                timed("get via agent", lambda: download(c, f"payload-{trial}", Path(tmp) / "back.bin", agent=here))
                c.delete_file(f"payload-{trial}")
                state = c.start_linktest(devices["a"]["id"], devices["b"]["id"], size, 2 ** 20)
                deadline = time.monotonic() + 300
                while not state["done"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                    state = c.linktest(state["id"])
                result = state.get("result") or {}
                if not result.get("ok") or not result.get("seconds"):
                    raise RuntimeError(f"link test failed: {state}")
                if result.get("path") != way:
                    print(f"  (link test took the {result.get('path')!r} path)")
                rates[f"{way} PeerLink"].append(result["bytes"] / result["seconds"])
    base = statistics.median(rates[f"{way} PeerLink"])
    print(f"\ntransfer on loopback, agents' PeerLinks {way}, {mib} MiB, median of 3 (MB = 10^6 bytes):")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"  {name:16s} {med / 1e6:8.1f} MB/s   {med / base:5.2f}x {way} PeerLink")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--slack", type=float, default=5.0, help="each device's quota over its even share (default 5)")
    ap.add_argument("--target", type=float, default=0.95, help="predicted availability a file should keep")
    ap.add_argument("--rate", type=float, default=1.0, help="most bytes copied per stored byte per day")
    ap.add_argument("--burst-hours", type=float, default=2.0,
                    help="copies may use up to this many hours' worth of the rate at once (token bucket)")
    ap.add_argument("--weights", type=float, nargs=4, default=list(DEFAULT_WEIGHTS),
                    help="weights of the 15 min / 1 h / 6 h / 24 h forecasts in predicted availability")
    ap.add_argument("--deadline-hours", type=float, default=72.0, help="offline this long counts as lost")
    ap.add_argument("--refit-hours", type=float, default=24.0, help="refit the forecaster this often")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forecasts", type=Path, help="reuse the forecasts saved in this .npz (written if missing)")
    ap.add_argument("--quick", action="store_true", help="200 files, k = 3 only")
    ap.add_argument("--transfer-mib", type=int, default=64, help="size of the put/get transfer test (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # One network instead of three: the forecaster is refitted every day of the simulation.
    config = replace(ForecastConfig(seed=args.seed), members=1)
    if args.quick:
        args.files, args.replicas = 200, [3]

    t_start = time.perf_counter()
    world = load_world(args.trace)
    rng = np.random.default_rng(args.seed)
    sizes = (np.clip(rng.lognormal(np.log(64.0), 1.0, size=args.files), 1.0, 4096.0).round() * 2 ** 20).astype(np.int64)
    print(f"{len(world.histories)} hosts, {len(world.times)} steps of {STEP / 60:.0f} min from day {START_DAY}; "
          f"{args.files} files, {sizes.sum() / 2 ** 30:.1f} GiB; quota {args.slack}x the even share")
    if args.forecasts and args.forecasts.exists():
        p = np.load(args.forecasts)["p"]
    else:
        p = forecasts(world, args.refit_hours, config)
        if args.forecasts:
            np.savez_compressed(args.forecasts, p=p)

    print(f"\n{'policy':12} {'k':>2} {'mean':>7} {'worst 1%':>9} {'moved/stored/day':>17}")
    results = {}
    for k in args.replicas:
        rows = {"random": random_placement(world, sizes, k, args.slack, np.random.default_rng(args.seed)),
                "best past": best_past_placement(world, sizes, k, args.slack),
                "hindsight*": hindsight_placement(world, sizes, k, args.slack, joint=False),
                "hindsight**": hindsight_placement(world, sizes, k, args.slack, joint=True)}
        t0 = time.perf_counter()
        rows["forecast"] = forecast_placement(world, p, sizes, k, args)
        for name, o in rows.items():
            results[name, k] = o
            print(f"{name:12} {k:>2} {o.available.mean():7.3f} {np.percentile(o.available, 1):9.3f} "
                  f"{o.moved_per_stored_day:17.3f}", flush=True)
        print(f"{'':12} (forecast policy simulated in {time.perf_counter() - t0:.0f} s)")
    print("* not a policy: each host's own online fraction over the evaluated days (the future), best first\n"
          "** not a policy: the hosts that together are online most of the evaluated days (the future)")
    if 3 in args.replicas:
        gap_report(world, results, 3)
        o = results["forecast", 3]
        mean, worst = o.available.mean(), np.percentile(o.available, 1)
        met = mean >= 0.95 and worst >= 0.8 and o.moved_per_stored_day <= 1.0
        print(f"\naim, forecast at k = 3: mean {mean:.3f} (>= 0.95), worst 1% {worst:.3f} (>= 0.8), moved "
              f"{o.moved_per_stored_day:.3f} (<= 1) -> {'met' if met else 'NOT met'}")
    if args.transfer_mib > 0:
        for direct in (False, True):
            transfer(16 if args.quick else args.transfer_mib, direct)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
