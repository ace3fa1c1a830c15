#!/usr/bin/env python
"""Pipeline training benchmark: the real 2-agent pipeline against one process, and the pipeline bubble.

    python bench/pipeline.py              # full run (about 2 minutes on 2 cores)
    python bench/pipeline.py --quick      # short run
    python bench/pipeline.py --repeat 3   # 3 rounds of paired throughput measurements

Everything is measured in this run, on this machine, and printed side by side.

1. Throughput (samples/s), compute-bound model (mlp-digits, hidden 1024, depth 8,
   batch 512 split in 16 micro-batches of 32, SGD; 16 micro-batches keep the
   theoretical bubble of two stages at 5.9%):
     a. one process, ``torch.set_num_threads(1)``: a plain loop with the same
        gradient accumulation the pipeline does (loss of each micro-batch weighted
        by its share of the batch, one optimiser step per batch);
     a'. the same loop with 2 torch threads (for reference: the other way to use
        both cores);
     b. the real pipeline: a ``LocalFabric`` coordinator and 2 agent processes
        (OMP_NUM_THREADS=MKL_NUM_THREADS=1), a run started over REST with
        ``use_all_devices=True`` and no intermediate checkpoints, once with 1F1B
        and once with GPipe. The run's losses are polled over REST (every 20 ms
        near the window's ends, every 250 ms in between, so that polling takes
        little CPU from the agents); samples/s = (steps seen in the window) *
        batch / window, the window starting once 2 steps are done (link set-up and
        first-step costs excluded) and ending at the last step.
     c. torch.distributed.pipelining on the same model, split (the one the run
        above was planned with), data, batch and micro-batches: 2 processes
        (spawned, each in a session of its own as the agents are), gloo on
        127.0.0.1, one torch thread each, ``PipelineStage`` +
        ``Schedule1F1B`` / ``ScheduleGPipe`` (mean loss: ``scale_grads``), SGD
        stepped after each batch; the last rank stamps the end of every step and
        the window is taken the same way as in (b).
   This machine's speed drifts by 10-30% within a minute (a shared virtual
   machine: the same one-thread loop measured back to back ranges over 850-1100
   samples/s), so a ratio between figures taken minutes apart says little. Every
   measurement of b, a' and c is therefore taken between two measurements of the
   one-process, 1-thread loop (a), and its ratio is to the mean of those two.
   A round measures every configuration once (a before, between and after them);
   ``--repeat N`` runs N rounds (default 2) and each configuration's ratio is the
   median of its rounds' ratios, printed with their range. Next to each figure:
   how many cores processes outside this benchmark used meanwhile (a pipeline that
   waits for its neighbour loses the CPU to them).

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
import queue
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

from _procs import machine_busy, process_cpu_seconds, procs_cpu  # noqa: E402

from neuranet.pipeline.data import batches, load_dataset  # noqa: E402
from neuranet.pipeline.models import build_model  # noqa: E402
from neuranet.pipeline.schedules import bubble_fraction, schedule, simulate  # noqa: E402

MODEL = "mlp-digits"
AGENTS = ["p0", "p1"]
WARM_STEPS = 2  # steps excluded from the start of every measured window
RUN_TIMEOUT = 90.0  # no pipeline run may take longer than this
POLL_FAST, POLL_SLOW = 0.02, 0.25  # seconds between polls of a run near the window's ends / in between
POLL_FAST_TAIL = 4  # poll fast once this many steps or fewer are left
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ONE = "one process, 1 thread"


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
                              model_options=opts, checkpoint_every=0)
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
            # Poll often only near the window's ends: each poll costs the server (and this process)
            # CPU time that the agents would otherwise have on this 2-core machine.
            time.sleep(POLL_FAST if n < WARM_STEPS or n >= steps - POLL_FAST_TAIL else POLL_SLOW)
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


# --- torch.distributed.pipelining, for comparison -------------------------------------------


def _torch_pipe_worker(rank: int, port: int, sched: str, opts: dict[str, Any], bounds: list[tuple[int, int]],
                       batch: int, micro: int, steps: int, out: Any) -> None:
    """One rank of torch's own pipeline: gloo on loopback, one torch thread, the same model, split and data."""
    # A session of its own, as each agent of the fabric has: the kernel's autogroup scheduling then
    # shares the CPUs between these ranks and other processes the same way as between the agents and them.
    os.setsid()
    os.environ.update(THREAD_ENV)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(bounds))
        model = build_model(MODEL, 0, **opts)
        start, stop = bounds[rank]
        stage = PipelineStage(model.stage(start, stop), rank, len(bounds), torch.device("cpu"))
        last = rank == len(bounds) - 1
        # Every rank gets the loss function: a schedule without one runs forward only (no gradients).
        # scale_grads (the default) divides the summed gradients by M: the same mean loss as ours.
        cls = Schedule1F1B if sched == "1f1b" else ScheduleGPipe
        pipe = cls(stage, micro, loss_fn=model.loss_fn)
        opt = torch.optim.SGD(stage.submod.parameters(), lr=0.01)
        data = batches(load_dataset(model.dataset, **model.data_options), batch, 0)
        stamps = []
        for _ in range(steps):
            x, y = next(data)
            opt.zero_grad(set_to_none=True)
            if rank == 0:
                pipe.step(x)
            elif last:
                pipe.step(target=y, losses=[])
            else:
                pipe.step()
            opt.step()
            stamps.append(time.perf_counter())
        dist.barrier()
        out.put((rank, stamps, None))
        dist.destroy_process_group()
    except BaseException as exc:  # report, so that the parent does not wait for nothing
        out.put((rank, [], f"{type(exc).__name__}: {exc}"))
        raise


def torch_pipeline(sched: str, opts: dict[str, Any], bounds: list[tuple[int, int]], batch: int, micro: int,
                   steps: int) -> dict[str, Any]:
    """Samples/s of torch.distributed.pipelining with one process per stage, measured like ours:
    the window runs from the end of step WARM_STEPS to the end of the last step on the last stage."""
    import socket

    import torch.multiprocessing as mp

    from _procs import reap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_torch_pipe_worker, args=(r, port, sched, opts, bounds, batch, micro, steps, out),
                         daemon=True) for r in range(len(bounds))]
    for pr in procs:
        pr.start()
    try:
        results = {}
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(results) < len(procs):
            try:
                rank, stamps, err = out.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, pr in enumerate(procs) if pr.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"torch pipelining ({sched}): rank {dead[0]} exited with "
                                       f"{procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"torch pipelining ({sched}) did not finish in {RUN_TIMEOUT:.0f}s") from None
                continue
            if err:
                raise RuntimeError(f"torch pipelining ({sched}) rank {rank} failed: {err}")
            results[rank] = stamps
        for pr in procs:
            pr.join(10)
    finally:
        for pr in procs:
            reap(pr)
    stamps = results[len(bounds) - 1]
    window = stamps[-1] - stamps[WARM_STEPS - 1]
    n_steps = len(stamps) - WARM_STEPS
    return {"samples_s": n_steps * batch / window, "step_s": window / n_steps, "steps": n_steps}


# --- main ----------------------------------------------------------------------------


class Meter:
    """Runs measurements and says how many cores processes outside this benchmark used during each."""

    def __init__(self, fabric_pids: list[int]) -> None:
        self.fabric_pids = fabric_pids

    def _snap(self) -> tuple[float, float, float]:
        ours = own_cpu_seconds() + procs_cpu(self.fabric_pids)
        return time.perf_counter(), machine_busy() - psutil.cpu_times().steal, ours

    def measure(self, fn: Any, *args: Any) -> tuple[Any, float]:
        """``fn(*args)`` and the cores that other processes used while it ran."""
        t0, busy0, ours0 = self._snap()
        result = fn(*args)
        t1, busy1, ours1 = self._snap()
        return result, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (torch pipelining's ranks)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (fewer steps)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds of throughput measurements (the median ratio is reported)")
    args = ap.parse_args(argv)
    opts = {"hidden": args.hidden, "depth": args.depth}
    B, M = args.batch, args.microbatches
    pipe_steps = 12 if args.quick else 40
    single_steps, single_s = (6, 3.0) if args.quick else (12, 5.0)
    reps = 5 if args.quick else 20

    from neuranet.fabric import LocalFabric

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; model {MODEL} {opts}, batch {B}, "
          f"{M} micro-batches of {B // M}; pipeline {pipe_steps} steps, window starts after {WARM_STEPS}")
    t_start = time.monotonic()
    busy0, own0, steal0 = machine_busy(), own_cpu_seconds(), psutil.cpu_times().steal
    with tempfile.TemporaryDirectory(prefix="neuranet-bench-pipeline-") as tmp:
        with LocalFabric(Path(tmp), env=THREAD_ENV) as fabric:
            fabric.start_server()
            for name in AGENTS:
                fabric.start_agent(name, extra=["--listen-host", "127.0.0.1", "--no-measure"])
            fabric.wait_online(AGENTS)
            fabric_pids = [pr.pid for pr in [fabric.server, *fabric.agents.values()] if pr]
            measure = Meter(fabric_pids).measure

            runs: dict[str, list[tuple[float, float, dict[str, Any]]]] = {}  # name -> [(samples/s, others, detail)]

            def record(name: str, fn: Any, *fn_args: Any) -> dict[str, Any]:
                out, others = measure(fn, *fn_args)
                detail = out if isinstance(out, dict) else {"samples_s": out}
                runs.setdefault(name, []).append((detail["samples_s"], others, detail))
                print(f"  {name:34s} {detail['samples_s']:8.1f} samples/s   (others {others:4.2f})", flush=True)
                return detail

            run_split: list[tuple[int, int]] = []
            ratios: dict[str, list[float]] = {}  # name -> its ratio to the adjacent one-thread loops, per round
            configs: list[tuple[str, Any, tuple[Any, ...]]] = [
                ("one process, 2 threads", one_process, (opts, B, M, single_steps, single_s, 2)),
                *((f"pipeline, 2 agents, {sched}", pipeline_run, (fabric, sched, opts, B, M, pipe_steps))
                  for sched in ("1f1b", "gpipe"))]
            for _ in range(args.repeat):
                before = record(ONE, one_process, opts, B, M, single_steps, single_s, 1)["samples_s"]
                for name, fn, fn_args in configs:
                    got = record(name, fn, *fn_args)
                    run_split = run_split or got.get("bounds", [])
                    after = record(ONE, one_process, opts, B, M, single_steps, single_s, 1)["samples_s"]
                    ratios.setdefault(name, []).append(got["samples_s"] / ((before + after) / 2))
                    before = after
                    if name == "pipeline, 2 agents, gpipe" and len(configs) == 3:  # torch's, on the run's split
                        configs += [(f"torch pipelining, gloo, {sched}", torch_pipeline,
                                     (sched, opts, run_split, B, M, pipe_steps)) for sched in ("1f1b", "gpipe")]
            times_2 = stage_times(opts, run_split, B // M, reps)  # while the fabric's CPU time is readable
            fabric_cpu = procs_cpu(fabric_pids)
            busy1, own1, steal1 = machine_busy(), own_cpu_seconds(), psutil.cpu_times().steal
            wall = time.monotonic() - t_start
        # the fabric is closed here: server and agents stopped
    best = {name: max(ms, key=lambda m: m[0]) for name, ms in runs.items()}
    ones = [m[0] for m in runs[ONE]]

    print()
    print(f"1. throughput: ratio to the one-process, 1-thread loop measured just before and after (median of "
          f"{args.repeat} round(s), and the range), best samples/s, and 'others': cores that processes outside this "
          "benchmark used during that best measurement")
    print(f"   {ONE:32s} {'1.00x':>6s}   {'':9s}   {max(ones):7.1f} samples/s   "
          f"(range {min(ones):.0f}-{max(ones):.0f} over {len(ones)} measurements)")
    for name, rs in ratios.items():
        rate, others, detail = best[name]
        spread = f"{min(rs):.2f}-{max(rs):.2f}" if len(rs) > 1 else "-"
        note = f"step {detail['step_s'] * 1000:.0f} ms over {detail['steps']} steps" if "step_s" in detail else ""
        print(f"   {name:32s} {statistics.median(rs):5.2f}x   {spread:>9s}   {rate:7.1f} samples/s   "
              f"others {others:4.2f}   {note}")
    ours, theirs = (statistics.median(ratios[f"{who}, 1f1b"]) for who in ("pipeline, 2 agents", "torch pipelining, gloo"))
    print(f"   aim: 1f1b >= 1.60x and ahead of torch's 1f1b: {ours:.2f}x vs {theirs:.2f}x -> "
          f"{'met' if ours >= 1.6 and ours > theirs else 'NOT met'}")
    pipes = {sched: best[f"pipeline, 2 agents, {sched}"][2] for sched in ("1f1b", "gpipe")}

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
    print(f"   real 2-agent run (K=2, stages {run_split}, theory {bubble_fraction(2, M):.1%}):")
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
