"""Processes the benchmarks start or watch: their CPU time, page faults, and stopping them for sure."""

from __future__ import annotations

import math
from typing import Any


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process; NaN if it is gone or unreadable."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process (NaN for one that cannot be read)."""
    return {name: process_cpu_seconds(pid) for name, pid in pids.items()}


def procs_cpu(pids: list[int]) -> float:
    """Total CPU seconds of the processes that can still be read."""
    return sum(x for x in map(process_cpu_seconds, pids) if not math.isnan(x))


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def minor_faults(pids: dict[str, int]) -> dict[str, float]:
    """Minor page faults so far of each named process, from /proc (NaN where unreadable)."""
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[name] = float(f.read().rsplit(")", 1)[1].split()[7])
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    return out


def reap(proc: Any) -> None:
    """Stop a multiprocessing child that is still running: terminate, then kill, each waited for."""
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
