"""Rich renderings shared by the CLI and the demo."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def devices_table(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="Devices")
    for col in ("name", "id", "state", "cpu", "ram", "gpu", "disk free", "GFLOP/s", "rtt", "last seen"):
        table.add_column(col, justify="right" if col in ("ram", "disk free", "GFLOP/s", "rtt") else "left")
    for d in devices:
        p = d.get("profile") or {}
        gpus = ", ".join(g.get("name", "?") for g in p.get("gpus") or []) or "-"
        cpu = f"{p.get('cpu_cores', '?')} cores" if p else "-"
        rtt = p.get("server_rtt_ms")
        table.add_row(
            d["name"], d["id"][:8], "[green]online[/]" if d["online"] else "[red]offline[/]", cpu,
            human_bytes(p.get("ram_bytes")), gpus, human_bytes(p.get("disk_free_bytes")),
            f"{p['cpu_gflops']:.1f}" if p.get("cpu_gflops") else "-", f"{rtt:.2f} ms" if rtt else "-",
            "now" if d["online"] else ago(d.get("last_seen")),
        )
    return table


def linktests_table(rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title="PeerLink transfers")
    for col in ("link", "path", "paths used", "data", "throughput", "rtt", "check"):
        table.add_column(col)
    for label, r in rows:
        res = r.get("result") or {}
        secs = res.get("seconds") or 0
        rate = f"{res.get('bytes', 0) / secs / 1e6:.0f} MB/s" if secs else "-"
        table.add_row(label, res.get("path", "-"), ", ".join(res.get("paths_used", [])), human_bytes(res.get("bytes")),
                      rate, f"{res.get('rtt_ms', 0):.2f} ms",
                      "[green]in order, intact[/]" if res.get("ok") else f"[red]{res.get('error', 'failed')}[/]")
    return table


def follow_run(client: Any, run: dict[str, Any], console: Any, timeout: float = 24 * 3600) -> dict[str, Any]:
    """Poll a run until it ends, with a progress bar of steps, the latest loss and samples/s."""
    from rich.progress import BarColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None  # (when, steps) at the first step seen: rate excludes set-up
    with Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("loss {task.fields[loss]}"),
                  TextColumn("{task.fields[rate]} samples/s"), console=console) as progress:
        bar = progress.add_task("train", total=run["steps"], loss="-", rate="-")
        while run["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.25)
            run = client.run(run["id"])
            losses, now = run["losses"], time.monotonic()
            if losses and first is None:
                first = (now, len(losses))
            rate = "-"
            if first is not None and len(losses) > first[1] and now > first[0]:
                rate = f"{(len(losses) - first[1]) * run['batch_size'] / (now - first[0]):.0f}"
            progress.update(bar, completed=len(losses), loss=f"{losses[-1]:.4f}" if losses else "-", rate=rate)
    return run
