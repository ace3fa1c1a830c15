#!/usr/bin/env python
"""Pipeline training benchmark: the real 2-agent pipeline against one process, and the pipeline bubble.

    python bench/pipeline.py            # full run (about 2 minutes on 2 cores)
    python bench/pipeline.py --quick    # short run

Everything is measured in this run, on this machine, and printed side by side.

1. Throughput (samples/s), compute-bound model (mlp-digits, hidden 1024, depth 8,
   batch 256 split in 8 micro-batches, SGD):
     a. one process, ``torch.set_num_threads(1)``: a plain loop with the same
        gradient accumulation the pipeline does (loss of each micro-batch weighted
        by its share of the batch, one optimiser step per batch);
     a'. the same loop with 2 torch threads (for reference: the other way to use
        both cores);
     b. the real pipeline: a ``LocalFabric`` coordinator and 2 agent processes
        (OMP_NUM_THREADS=MKL_NUM_THREADS=1), a run started over REST with
        ``use_all_devices=True``, once with 1F1B and once with GPipe. The run's
        losses are polled over REST; samples/s = (steps seen in the window) *
        batch / window, the window starting once 2 steps are done (link set-up and
        first-step costs excluded) and ending at the last step.
   The one-process loop (a) is measured before and after the pipeline runs; the
   mean of the two is the baseline of the ratio.

2. Bubble (idle fraction of stage-time in a step), next to the theory (K-1)/(M+K-1):
     * "sim": ``schedules.simulate`` of each schedule for K = 2..4 stages, fed with
       the forward and backward time of one micro-batch measured on this machine
       for the real stages of this model cut in K (mean over the stages;
       simulate assumes uniform stages, so the imbalance max/mean is printed too);
     * "real, CPU": for the 2-agent run, 1 - (CPU seconds of both agent
       processes in the window) / (2 * window). Communication and framework work
       count as busy here, so this under-states the compute bubble;
     * "real, compute": 1 - M * (F+B of stage 0 + F+B of stage 1) / (2 * step time),
       with F and B measured in one process for the run's own split: the share of
       stage-time not spent on the model's arithmetic (bubble + transport +
       per-op overheads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

_BENCH_DIR = str(Path(__file__).resolve().parent)
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

from _procs import machine_busy, process_cpu_seconds  # noqa: E402

from neuranet.pipeline.data import batches, load_dataset  # noqa: E402
from neuranet.pipeline.models import build_model  # noqa: E402
from neuranet.pipeline.schedules import bubble_fraction, schedule, simulate  # noqa: E402

MODEL = "mlp-digits"
AGENTS = ["p0", "p1"]
WARM_STEPS = 2  # steps excluded from the start of every measured window
RUN_TIMEOUT = 90.0  # no pipeline run may take longer than this
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- one process -----------------------------------------------------------------------


def one_process(opts: dict[str, Any], batch: int, micro: int, steps: int, max_s: float, threads: int) -> float:
    """Samples/s of a plain accumulate-then-step loop in this process with ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(MODEL, 0, **opts)
        net = model.sequential()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        data = batches(load_dataset(model.dataset, **model.data_options), batch, 0)
        done, t0 = 0, 0.0
        for i in range(steps + WARM_STEPS):
            if i == WARM_STEPS:
                t0 = time.perf_counter()
            x, y = next(data)
            opt.zero_grad(set_to_none=True)
            for xs, ys in zip(x.tensor_split(micro), y.tensor_split(micro)):
                (model.loss_fn(net(xs), ys) * (len(ys) / batch)).backward()
            opt.step()
            if i >= WARM_STEPS:
                done += 1
                if time.perf_counter() - t0 > max_s:
                    break
        return done * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


# --- per-stage forward / backward times ------------------------------------------------


def stage_times(opts: dict[str, Any], bounds: list[tuple[int, int]], micro_batch: int, reps: int) -> list[tuple[float, float]]:
    """Median (forward, backward) seconds of one micro-batch through each stage, one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(MODEL, 0, **opts)
        x = next(batches(load_dataset(model.dataset, **model.data_options), micro_batch, 0))[0]
        out = []
        for start, stop in bounds:
            stage = model.stage(start, stop)
            with torch.no_grad():
                sample = model.stage(0, start)(x) if start else x
            fs, bs = [], []
            for _ in range(reps + 1):
                inp = sample.detach().requires_grad_(start > 0)
                t0 = time.perf_counter()
                y = stage(inp)
                t1 = time.perf_counter()
                y.backward(torch.ones_like(y))
                t2 = time.perf_counter()
                fs.append(t1 - t0)
                bs.append(t2 - t1)
            out.append((statistics.median(fs[1:]), statistics.median(bs[1:])))
            stage.zero_grad(set_to_none=True)
        return out
    finally:
        torch.set_num_threads(old)


def even_bounds(n_layers: int, k: int) -> list[tuple[int, int]]:
    cuts = [round(i * n_layers / k) for i in range(k + 1)]
    return list(zip(cuts, cuts[1:]))


# --- the real pipeline ---------------------------------------------------------------


def pipeline_run(fabric: Any, sched: str, opts: dict[str, Any], batch: int, micro: int, steps: int) -> dict[str, Any]:
    """Start a run over REST and follow it; samples/s and CPU seconds over the steady window."""
    pids = [fabric.agents[n].pid for n in AGENTS]
    with fabric.client() as c:
        started = c.start_run(model=MODEL, devices=AGENTS, use_all_devices=True, steps=steps, batch_size=batch,
                              microbatches=micro, schedule=sched, optimizer="sgd", lr=0.01, seed=0, data_seed=0,
                              model_options=opts)
        marks: list[tuple[float, int, float]] = []  # (time, steps reported, agents' CPU seconds)
        deadline = time.monotonic() + RUN_TIMEOUT
        seen = 0
        while time.monotonic() < deadline:
            run = c.run(started["id"])
            now = time.perf_counter()
            n = len(run["losses"])
            if n > seen:
                seen = n
                marks.append((now, n, sum(process_cpu_seconds(p) for p in pids)))
            if run["status"] != "running":
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{sched} run did not finish in {RUN_TIMEOUT:.0f}s: {run}")
    if run["status"] != "finished":
        raise RuntimeError(f"{sched} run {run['status']}: {run['errors']}")
    first = next(m for m in marks if m[1] >= WARM_STEPS)
    last = marks[-1]
    window = last[0] - first[0]
    n_steps = last[1] - first[1]
    return {"samples_s": n_steps * batch / window, "step_s": window / n_steps,
            "cpu_idle": 1 - (last[2] - first[2]) / (len(AGENTS) * window),
            "bounds": [(s["start"], s["stop"]) for s in run["stages"]], "steps": n_steps}


# --- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer steps)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=8)
    args = ap.parse_args(argv)
    opts = {"hidden": args.hidden, "depth": args.depth}
    B, M = args.batch, args.microbatches
    pipe_steps = 12 if args.quick else 40
    single_steps, single_s = (6, 3.0) if args.quick else (20, 8.0)
    reps = 5 if args.quick else 20

    from neuranet.fabric import LocalFabric

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; model {MODEL} {opts}, batch {B}, "
          f"{M} micro-batches of {B // M}; pipeline {pipe_steps} steps, window starts after {WARM_STEPS}")
    t_start = time.monotonic()
    busy0, own0, steal0 = machine_busy(), time.process_time(), psutil.cpu_times().steal
    with tempfile.TemporaryDirectory(prefix="neuranet-bench-pipeline-") as tmp:
        with LocalFabric(Path(tmp), env=THREAD_ENV) as fabric:
            fabric.start_server()
            for name in AGENTS:
                fabric.start_agent(name, extra=["--listen-host", "127.0.0.1", "--no-measure"])
            fabric.wait_online(AGENTS)

            single = [one_process(opts, B, M, single_steps, single_s, 1)]
            print(f"  one process, 1 thread:   {single[0]:8.1f} samples/s", flush=True)
            single2 = one_process(opts, B, M, single_steps, single_s, 2)
            print(f"  one process, 2 threads:  {single2:8.1f} samples/s", flush=True)
            pipes = {}
            for sched in ("1f1b", "gpipe"):
                pipes[sched] = pipeline_run(fabric, sched, opts, B, M, pipe_steps)
                print(f"  pipeline {sched:5s} 2 agents: {pipes[sched]['samples_s']:8.1f} samples/s "
                      f"(stages {pipes[sched]['bounds']})", flush=True)
            single.append(one_process(opts, B, M, single_steps, single_s, 1))
            print(f"  one process, 1 thread:   {single[1]:8.1f} samples/s (again)", flush=True)
            run_split = pipes["1f1b"]["bounds"]
            times_2 = stage_times(opts, run_split, B // M, reps)  # while the fabric's CPU time is readable
            fabric_cpu = sum(process_cpu_seconds(pr.pid) for pr in [fabric.server, *fabric.agents.values()] if pr)
            busy1, own1, steal1 = machine_busy(), time.process_time(), psutil.cpu_times().steal
            wall = time.monotonic() - t_start
        # the fabric is closed here: server and agents stopped
    base = statistics.mean(single)

    print()
    print("1. throughput (samples/s; ratio to one process, 1 thread, mean of before/after "
          f"{single[0]:.0f}/{single[1]:.0f})")
    print(f"   {'one process, 1 thread':32s} {base:8.1f}   1.00x")
    print(f"   {'one process, 2 threads':32s} {single2:8.1f}   {single2 / base:.2f}x")
    for sched, p in pipes.items():
        print(f"   {'pipeline, 2 agents, ' + sched:32s} {p['samples_s']:8.1f}   {p['samples_s'] / base:.2f}x"
              f"   (step {p['step_s'] * 1000:.0f} ms over {p['steps']} steps)")
    print("   torch.distributed.pipelining (gloo): not measured (left out to keep this script small)")

    print()
    print(f"2. bubble, M={M}: theory (K-1)/(M+K-1) vs simulate() with measured F/B per micro-batch of {B // M}")
    print(f"   {'K':>2} {'theory':>7} {'sim gpipe':>10} {'sim 1f1b':>9} {'F ms':>7} {'B ms':>7} {'imbalance':>10}")
    n_layers = args.depth
    for k in range(2, 5):
        if k > n_layers:
            break
        times = stage_times(opts, even_bounds(n_layers, k), B // M, reps)
        f = statistics.mean(t[0] for t in times)
        b = statistics.mean(t[1] for t in times)
        imb = max(t[0] + t[1] for t in times) / statistics.mean(t[0] + t[1] for t in times)
        sims = {s: simulate(schedule(s, k, M), forward=f, backward=b).bubble for s in ("gpipe", "1f1b")}
        print(f"   {k:>2} {bubble_fraction(k, M):7.1%} {sims['gpipe']:10.1%} {sims['1f1b']:9.1%} "
              f"{f * 1000:7.2f} {b * 1000:7.2f} {imb:9.2f}x")
    print(f"   real 2-agent run (K=2, theory {bubble_fraction(2, M):.1%}):")
    for sched, p in pipes.items():
        times = times_2 if p["bounds"] == run_split else stage_times(opts, p["bounds"], B // M, reps)
        compute = M * sum(fw + bw for fw, bw in times)
        idle = 1 - compute / (len(AGENTS) * p["step_s"])
        sim = simulate(schedule(sched, 2, M), forward=statistics.mean(t[0] for t in times),
                       backward=statistics.mean(t[1] for t in times)).bubble
        print(f"     {sched:5s}: CPU idle {p['cpu_idle']:6.1%}   not-compute {idle:6.1%}   "
              f"(sim for its split {sim:.1%}; F+B per stage {[round((fw + bw) * 1000, 1) for fw, bw in times]} ms)")
    steal = steal1 - steal0
    other = (busy1 - busy0) - steal - (own1 - own0) - fabric_cpu
    print(f"\nnoise over the {wall:.0f} s of measurements ({os.cpu_count()} cores): processes outside this "
          f"benchmark (and the kernel) used {other / wall:.0%} of one core, the hypervisor stole "
          f"{steal / wall:.0%} of one core")
    print(f"total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
