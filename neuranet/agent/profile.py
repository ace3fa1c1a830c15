"""What a device offers: OS, CPU, memory, disk, GPUs and a measured matmul speed."""

from __future__ import annotations

import hashlib
import os
import platform
import uuid
import shutil
import time
from pathlib import Path
from typing import Any

import psutil


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


def machine_id(files: tuple[Path, ...] = MACHINE_ID_FILES) -> str:
    """An opaque id of this machine (hashed, so the OS's own id is not passed on), shared by every agent
    on it: with the address it connects from, it tells the coordinator which peers share a loopback."""
    raw = ""
    for f in files:
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw:
            break
    raw = raw or f"{platform.node()}/{uuid.getnode():x}"  # no machine-id (macOS, Windows): host name and MAC
    return hashlib.sha256(b"neuranet-machine\x00" + raw.encode()).hexdigest()[:32]


def gpus() -> list[dict[str, Any]]:
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "memory_bytes": p.total_memory, "backend": "cuda"})
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append({"index": 0, "name": "Apple MPS", "memory_bytes": psutil.virtual_memory().total, "backend": "mps"})
    return out


def matmul_gflops(size: int = 512, seconds: float = 0.3, device: str = "cpu") -> float:
    """Measured fp32 matmul throughput: what the pipeline planner sizes stages by."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            break
    return 2 * size**3 * n / elapsed / 1e9


def collect_profile(data_dir: Path, measure: bool = True) -> dict[str, Any]:
    """Static facts about this machine (runs a short benchmark when ``measure``)."""
    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(data_dir if data_dir.exists() else Path.cwd())
    gpu_list = gpus()
    profile: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "machine_id": machine_id(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "cpu_threads": os.cpu_count() or 1,
        "ram_bytes": vm.total,
        "ram_available_bytes": vm.available,
        "disk_free_bytes": disk.free,
        "gpus": gpu_list,
    }
    if measure:
        profile["cpu_gflops"] = round(matmul_gflops(), 2)
        if gpu_list and gpu_list[0]["backend"] == "cuda":
            profile["gpu_gflops"] = round(matmul_gflops(2048, device="cuda"), 2)
    return profile
