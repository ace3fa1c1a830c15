#!/usr/bin/env python
"""Pipeline planner quality on simulated heterogeneous devices, against simple splits and brute force.

    python bench/planner.py                 # 200 scenarios per objective (about 15 s)
    python bench/planner.py --scenarios 50  # quicker

A scenario is 2-8 devices whose speeds are real SETI@home hosts
(``shared/data/boinc-seti-hosts.csv``: cores x GFLOPS per core), with free
memory log-uniform in 2-16 GiB, and every ordered pair of devices linked at a
bandwidth uniform in 10-1000 Mbit/s and a latency uniform in 1-50 ms.
Scenarios where no split fits at all are redrawn (and counted).

  throughput  training GPT-2 small (embedding, 12 blocks, head) in fp32 on
              256-token samples, 8 micro-batches of 4 a step;
  latency     serving a LLaMA-7B-shaped model (embedding, 32 blocks, head) in
              fp16, one generated token, which no single device here can hold.

Every figure is the planner's own predicted step time (``CostModel.predict``),
so what is compared is the choice of split, not the cost model. Ratios are
baseline / ours (above 1: ours is faster) and ours / brute force (1.0000: optimal):

  even, all devices    equal layer counts on every device, in the order given
  even, our devices    equal layer counts on the devices our plan uses, in its order
  memory-proportional  exo's RingMemoryWeightedPartitioningStrategy: devices by free
                       memory, largest first, layer shares proportional to it
  brute force          every ordered subset of devices x every contiguous split,
                       where there are at most BRUTE_FORCE_PLANS of them

A baseline that does not fit in memory counts as infeasible and is left out of
its ratios. Then: planning time for 48 layers on 8 devices (exact search), and
the heuristic used beyond ``EXACT_DEVICE_LIMIT`` devices against exact search.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import time
from pathlib import Path

import numpy as np

from neuranet.pipeline.partition import CostModel, plan
from neuranet.pipeline.profiles import GiB, DeviceProfile, LayerProfile, Link, PlanError, Workload

HOSTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "boinc-seti-hosts.csv"
BRUTE_FORCE_PLANS = 12_000  # brute force where a scenario has at most this many splits


def gpt2_small(blocks: int = 12, d: int = 768, heads: int = 12, seq: int = 256, vocab: int = 50257) -> list[LayerProfile]:
    """GPT-2 small in fp32 for training, per sample of `seq` tokens."""
    act = seq * d * 4
    # saved for backward: ~34 s d + 5 heads s^2 values per block (Korthikanti et al. 2022), 4 bytes each
    block_saved = (34 * seq * d + 5 * heads * seq * seq) * 4
    block_flops = seq * 24 * d * d + 4 * seq * seq * d
    layers = [LayerProfile("embed", seq * d, act, (vocab + seq) * d * 4)]
    layers += [LayerProfile(f"block.{i}", block_flops, act, 12 * d * d * 4, block_saved) for i in range(blocks)]
    logits = seq * vocab * 4
    layers.append(LayerProfile("head", 2 * seq * d * vocab, logits, vocab * d * 4, 2 * logits))
    return layers


def llama_7b(blocks: int = 32, d: int = 4096, ffn: int = 11008, vocab: int = 32000) -> list[LayerProfile]:
    """A LLaMA-7B-shaped model in fp16 for serving, per generated token (KV cache not modelled)."""
    block_params = 4 * d * d + 3 * d * ffn
    layers = [LayerProfile("embed", d, d * 2, vocab * d * 2)]
    layers += [LayerProfile(f"block.{i}", 2 * block_params, d * 2, block_params * 2) for i in range(blocks)]
    layers.append(LayerProfile("head", 2 * d * vocab, vocab * 2, vocab * d * 2))
    return layers


# objective -> (what it runs, model, workload)
CASES = {
    "throughput": ("training GPT-2 small fp32, 256-token samples", gpt2_small(), Workload(micro_batch=4, micro_batches=8)),
    "latency": ("serving LLaMA-7B-shaped fp16, one token", llama_7b(), Workload(micro_batch=1)),
}


def load_host_speeds(path: Path) -> np.ndarray:
    with path.open() as f:
        return np.array([int(r["cores"]) * float(r["cpu_speed"]) for r in csv.DictReader(f)])


def random_devices(rng: np.random.Generator, speeds: np.ndarray, count: int) -> list[DeviceProfile]:
    ids = [f"dev{i}" for i in range(count)]
    devices = []
    for me, gflops in zip(ids, rng.choice(speeds, count)):
        links = {
            peer: Link(rng.uniform(10, 1000) * 1e6 / 8, rng.uniform(0.001, 0.050))
            for peer in ids if peer != me
        }
        free = int(GiB * math.exp(rng.uniform(math.log(2), math.log(16))))
        devices.append(DeviceProfile(me, float(gflops), free, links))
    return devices


def even_ranges(n: int, count: int) -> list[tuple[int, int]]:
    bounds = [round(n * k / count) for k in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def memory_split(n: int, devices: list[DeviceProfile]) -> tuple[list[int], list[tuple[int, int]]]:
    """exo's split: largest memory first, shares proportional to memory, empty shards dropped."""
    order = sorted(range(len(devices)), key=lambda d: (-devices[d].free_bytes, devices[d].id))
    total, acc, bounds = sum(d.free_bytes for d in devices), 0.0, [0]
    for d in order:
        acc += devices[d].free_bytes / total
        bounds.append(n if d == order[-1] else int(acc * n))
    kept = [(d, (a, b)) for d, a, b in zip(order, bounds, bounds[1:]) if b > a]
    return [d for d, _ in kept], [r for _, r in kept]


def split_count(n: int, count: int) -> int:
    """Ordered device subsets x contiguous splits: what brute force tries."""
    return sum(math.comb(n - 1, k - 1) * math.perm(count, k) for k in range(1, min(n, count) + 1))


def brute_force(model: CostModel) -> float:
    n, best = model.n, math.inf
    for k in range(1, len(model.devices) + 1):
        for order in itertools.permutations(range(len(model.devices)), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                best = min(best, model.predict(order, list(zip(bounds, bounds[1:]))))
    return best


def run_objective(objective: str, scenarios: int, seed: int, speeds: np.ndarray) -> dict:
    rng, (_, layers, workload) = np.random.default_rng(seed), CASES[objective]
    ratios: dict[str, list[float]] = {"even, all devices": [], "even, our devices": [], "memory-proportional": []}
    infeasible = dict.fromkeys(ratios, 0)
    vs_brute, plan_ms, used, offered, skipped = [], [], [], [], 0
    while len(plan_ms) < scenarios:
        devices = random_devices(rng, speeds, int(rng.integers(2, 9)))
        model = CostModel(layers, devices, objective, workload)
        start = time.perf_counter()
        try:
            ours = plan(layers, devices, objective, workload)
        except PlanError:
            skipped += 1  # nothing fits: no split to compare
            continue
        plan_ms.append((time.perf_counter() - start) * 1000)
        used.append(len(ours.stages))
        offered.append(len(devices))
        ids = [d.id for d in devices]
        mine = [ids.index(i) for i in ours.devices]
        baselines = {
            "even, all devices": model.predict(range(len(devices)), even_ranges(len(layers), len(devices))),
            "even, our devices": model.predict(mine, even_ranges(len(layers), len(mine))),
            "memory-proportional": model.predict(*memory_split(len(layers), devices)),
        }
        for name, t in baselines.items():
            if math.isinf(t):
                infeasible[name] += 1
            else:
                ratios[name].append(t / ours.step_time)
        if split_count(len(layers), len(devices)) <= BRUTE_FORCE_PLANS:
            vs_brute.append(ours.step_time / brute_force(model))
    return dict(ratios=ratios, infeasible=infeasible, vs_brute=vs_brute, plan_ms=plan_ms,
                used=used, offered=offered, skipped=skipped)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    def line(row: list[str]) -> str:
        return "  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join(line(row) for row in rows)


def report(objective: str, r: dict) -> None:
    n = len(r["plan_ms"])
    print(f"\n== {objective}: {CASES[objective][0]}, {n} scenarios"
          f" ({r['skipped']} drawn with no feasible split were redrawn) ==")
    rows = [["baseline / ours", "n", "infeasible", "mean", "geo-mean", "median", "p10", "min", "ours faster"]]
    for name, xs in r["ratios"].items():
        rows.append([
            name, str(len(xs)), str(r["infeasible"][name]), f"{statistics.fmean(xs):.2f}",
            f"{statistics.geometric_mean(xs):.2f}", f"{statistics.median(xs):.2f}",
            f"{np.percentile(xs, 10):.2f}", f"{min(xs):.2f}", f"{np.mean(np.array(xs) > 1 + 1e-9):.0%}",
        ])
    b = r["vs_brute"]
    rows.append(["ours / brute force", str(len(b)), "-", f"{statistics.fmean(b):.4f}", "-",
                 f"{statistics.median(b):.4f}", "-", f"max {max(b):.4f}", f"{np.mean(np.array(b) <= 1.01):.0%} within 1%"])
    print(table(rows))
    print(f"devices used by our plan: mean {statistics.fmean(r['used']):.2f} of {statistics.fmean(r['offered']):.2f} offered;"
          f" planning time mean {statistics.fmean(r['plan_ms']):.1f} ms, max {max(r['plan_ms']):.1f} ms")


def timing_and_heuristic(speeds: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    deep = gpt2_small(blocks=46)  # 48 layers
    rows = [["case", "objective", "runs", "mean", "max", "heuristic / exact"]]
    for objective, (_, _, workload) in CASES.items():
        ms = []
        for _ in range(10):
            devices = random_devices(rng, speeds, 8)
            start = time.perf_counter()
            try:
                plan(deep, devices, objective, workload)
            except PlanError:
                pass
            ms.append((time.perf_counter() - start) * 1000)
        rows.append(["GPT-2, 48 layers, 8 devices, exact", objective, str(len(ms)),
                     f"{statistics.fmean(ms):.0f} ms", f"{max(ms):.0f} ms", "-"])
    for objective, (_, layers, workload) in CASES.items():
        ms, ratio = [], []
        while len(ms) < 6:
            devices = random_devices(rng, speeds, 11)
            try:
                exact = plan(layers, devices, objective, workload, exact_limit=11)
            except PlanError:
                continue
            start = time.perf_counter()
            heuristic = plan(layers, devices, objective, workload)  # default limit 10: heuristic for 11
            ms.append((time.perf_counter() - start) * 1000)
            ratio.append(heuristic.step_time / exact.step_time)
        rows.append([f"{len(layers)} layers, 11 devices, heuristic", objective, str(len(ms)), f"{statistics.fmean(ms):.0f} ms",
                     f"{max(ms):.0f} ms", f"mean {statistics.fmean(ratio):.4f}, max {max(ratio):.4f}"])
    print("\n== planning time ==")
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hosts", type=Path, default=HOSTS)
    args = parser.parse_args()
    speeds = load_host_speeds(args.hosts)
    started = time.perf_counter()
    print(f"device speeds from {len(speeds)} SETI@home hosts (median {np.median(speeds):.0f} GFLOP/s)")
    for objective, (what, layers, workload) in CASES.items():
        params = sum(x.param_bytes for x in layers) / GiB
        print(f"{objective}: {what}: {len(layers)} layers, {params:.1f} GiB of parameters; {workload}")
    for k, objective in enumerate(CASES):
        report(objective, run_objective(objective, args.scenarios, args.seed + k, speeds))
    timing_and_heuristic(speeds, args.seed + 10)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
