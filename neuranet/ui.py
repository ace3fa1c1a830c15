"""Rich renderings shared by the CLI and the demo."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape
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
            escape(d["name"]), d["id"][:8], "[green]online[/]" if d["online"] else "[red]offline[/]", cpu,
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
        table.add_row(escape(label), res.get("path", "-"), ", ".join(res.get("paths_used", [])), human_bytes(res.get("bytes")),
                      rate, f"{res.get('rtt_ms', 0):.2f} ms",
                      "[green]in order, intact[/]" if res.get("ok") else f"[red]{escape(str(res.get('error', 'failed')))}[/]")
    return table


def follow_run(client: Any, run: dict[str, Any], console: Any, timeout: float = 24 * 3600,
               patience: Any = None, interval: float = 0.25) -> dict[str, Any]:
    """Follow a run until it ends, with a progress bar of steps, the latest loss and samples/s; says when
    the run re-plans (why, and the new plan) and rides out a server that stops answering for a while.
    Follows the event stream (``GET /api/v1/events``): the bar moves with each reported loss and the run is
    read again only when its state changes (or the stream reopens); a server without the stream is polled
    every ``interval`` seconds."""
    from rich.progress import BarColumn, Progress, TextColumn

    from neuranet.client import ClientError, Patience, patiently

    patience = patience or Patience()
    deadline = time.monotonic() + timeout
    run_id = run["id"]
    with Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("loss {task.fields[loss]}"),
                  TextColumn("{task.fields[rate]} samples/s"), console=console) as progress:
        shown = _RunShown(progress, console, run)

        def note(text: str) -> None:
            console.print(f"[yellow]{escape(text)}[/]")

        def fetch() -> dict[str, Any]:
            return patiently(lambda: client.run(run_id, timeout=patience.request_timeout), patience, note)

        try:
            return _follow_events(client, shown, fetch, note, patience, deadline)
        except ClientError as exc:
            if not str(exc).startswith("404"):  # 404: a coordinator from before the event stream
                raise
        while shown.run["status"] == "running" and time.monotonic() < deadline:
            time.sleep(interval)
            shown.update(fetch())
    return shown.run


def _follow_events(client: Any, shown: "_RunShown", fetch: Any, note: Any, patience: Any,
                   deadline: float) -> dict[str, Any]:
    from neuranet.server.events import RUN_PROGRESS, RUN_STATE, STREAM_GAP, STREAM_OPEN

    run_id = shown.run["id"]
    stream = client.events(kinds=[RUN_PROGRESS, RUN_STATE], patience=patience, note=note)
    try:
        for event in stream:
            if event.kind in (STREAM_OPEN, STREAM_GAP) or (event.kind == RUN_STATE and event.object_id == run_id):
                shown.update(fetch())  # (re)subscribed, or changed: the run as it is from now on
            elif event.kind == RUN_PROGRESS and event.object_id == run_id:
                shown.step(int(event.data.get("steps_done", 0)), event.data.get("loss"))
            if shown.run["status"] != "running" or time.monotonic() > deadline:
                break
    finally:
        stream.close()
    return shown.run


class _RunShown:
    """A run as the progress bar shows it: steps, latest loss, samples/s (excluding set-up), re-plans."""

    def __init__(self, progress: Any, console: Any, run: dict[str, Any]) -> None:
        self.progress, self.console, self.run = progress, console, run
        self.bar = progress.add_task("train", total=run["steps"], loss="-", rate="-")
        self.first: tuple[float, int] | None = None  # (when, steps) at the first step seen
        self.recoveries = len(run.get("recoveries", []))

    def update(self, run: dict[str, Any]) -> None:
        self.run = run
        for recovery in run.get("recoveries", [])[self.recoveries:]:
            self.console.print(f"[yellow]re-planned, {escape(recovery)}[/]")
        if len(run.get("recoveries", [])) > self.recoveries:
            self.recoveries = len(run["recoveries"])
            self.console.print(escape(run["plan"]), soft_wrap=True)
        losses = run["losses"]
        self.step(len(losses), losses[-1] if losses else None)

    def step(self, steps: int, loss: float | None) -> None:
        now = time.monotonic()
        if steps and self.first is None:
            self.first = (now, steps)
        rate = "-"
        if self.first is not None and steps > self.first[1] and now > self.first[0]:
            rate = f"{(steps - self.first[1]) * self.run['batch_size'] / (now - self.first[0]):.0f}"
        self.progress.update(self.bar, completed=steps, loss=f"{loss:.4f}" if loss is not None else "-", rate=rate)


def runs_table(runs: list[dict[str, Any]]) -> Table:
    """Runs and deployments, newest first; the id whole (`runs fetch` and `runs follow` take it)."""
    from rich import box

    table = Table(title="Runs", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)  # fits 80 columns
    for col in ("id", "kind", "state", "step", "devices", "created"):
        table.add_column(col, no_wrap=col in ("id", "step"), overflow="fold")
    for r in runs:
        step = "-" if r.get("step") is None else f"{r['step']}/{r['steps']}" if r.get("steps") else str(r["step"])
        table.add_row(r["id"], escape(r["kind"]), escape(r["state"]), step, escape(", ".join(r["devices"])) or "-",
                      ago(r["created"]))
    return table


TIMELINE_SLOTS = 24


def timeline(history: list[list[float | None]], start: float, end: float, slots: int = TIMELINE_SLOTS) -> str:
    """Online intervals as one text line from ``start`` to ``end``: '█' online most of a slot, '·' not."""
    width = (end - start) / slots
    chars = []
    for i in range(slots):
        a, b = start + i * width, start + (i + 1) * width
        online = sum(max(0.0, min(b, e if e is not None else end) - max(a, s)) for s, e in history)  # type: ignore[arg-type]
        chars.append("█" if online >= width / 2 else "·")
    return "".join(chars)


def _horizon_label(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds < 3600 else f"{seconds / 3600:.0f}h"


def forecast_table(forecasts: list[dict[str, Any]]) -> Table:
    """Devices' P(online) per horizon, expected remaining online time, and the last 24 h as a timeline."""
    horizons = [h["seconds"] for h in forecasts[0]["horizons"]] if forecasts else []
    table = Table(title="Availability forecast: P(online) ahead; last 24 h, one mark per hour (█ online)")
    table.add_column("device", no_wrap=True)
    table.add_column("now")
    for h in horizons:
        table.add_column(_horizon_label(h), justify="right")
    table.add_column("E[online]", justify="right")
    table.add_column("last 24 h → now", no_wrap=True)
    for f in forecasts:
        end = f["at"]
        table.add_row(
            escape(f["name"]), "[green]online[/]" if f["online"] else "[red]offline[/]",
            *(f"{h['p_online']:.2f}" for h in f["horizons"]),
            "-" if f.get("expected_online_seconds") is None else f"{f['expected_online_seconds'] / 3600:.1f} h",
            timeline(f["history"], end - 86400, end),
        )
    return table


def forecast_method(model: dict[str, Any]) -> str:
    """One line on what answered: the trained model, or persistence before the first fit (and when that is)."""
    if model.get("kind") == "mlp":
        return f"model: mlp, trained {ago(model.get('trained_at'))} on {model.get('devices', 0)} devices"
    when = model.get("next_fit_at")
    due = "" if when is None else f" (next fit {'now' if when <= time.time() else f'in {when - time.time():.0f} s'})"
    hours = (model.get("min_history_seconds") or 0) / 3600
    return (f"no forecast model trained yet{due}: it needs a device with {hours:.0f} h of history; showing "
            "persistence (each device stays as it is now), with no estimate of online time")


def plot_forecast(f: dict[str, Any], path: Any) -> None:
    """A PNG of one device's recent history (shaded when online) and its forecast P(online) ahead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    now = f["at"]
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    first = min([now - 3 * 86400] + [s for s, _ in f["history"]])
    for s, e in f["history"]:
        ax.axvspan((s - now) / 3600, ((e if e is not None else now) - now) / 3600, color="tab:green", alpha=0.35, lw=0)
    curve = f.get("curve") or [{"seconds": h["seconds"], "p_online": h["p_online"]} for h in f["horizons"]]
    xs = [0.0] + [c["seconds"] / 3600 for c in curve]
    ys = [1.0 if f["online"] else 0.0] + [c["p_online"] for c in curve]
    ax.plot(xs, ys, color="tab:blue", marker="o", ms=3, label="forecast P(online)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(max((first - now) / 3600, -72), xs[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("hours from now")
    ax.set_ylabel("online")
    ax.set_title(f"{f['name']}: history (shaded = online) and forecast")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
