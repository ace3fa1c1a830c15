"""``neuranet demo``: a server and three agents on this machine, tensors sent around the ring."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from neuranet.client import Client, ClientError
from neuranet.fabric import FabricError, LocalFabric
from neuranet.ui import devices_table, follow_run, linktests_table

AGENTS = ["demo-a", "demo-b", "demo-c"]


def run_linktests(client: Client, pairs: list[tuple[dict[str, Any], dict[str, Any]]], total_bytes: int,
                  message_bytes: int, console: Console, timeout: float = 600.0) -> list[tuple[str, dict[str, Any]]]:
    """Run link tests one after another with a progress bar each; returns (label, final state)."""
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("{task.fields[path]}"), TimeRemainingColumn(), console=console) as progress:
        for src, dst in pairs:
            label = f"{src['name']} → {dst['name']}"
            bar = progress.add_task(escape(label), total=total_bytes, path="")
            state = client.start_linktest(src["id"], dst["id"], total_bytes, message_bytes)
            deadline = time.monotonic() + timeout
            while not state["done"] and time.monotonic() < deadline:
                time.sleep(0.1)
                state = client.linktest(state["id"])
                progress.update(bar, completed=state["sent_bytes"], path=state["path"])
            if not state["done"]:
                state["result"] = {"ok": False, "error": f"no result after {timeout:.0f}s"}
            progress.update(bar, completed=state["sent_bytes"], path=state["result"].get("path", ""))
            rows.append((label, state))
    return rows


DEMO_RUN = dict(model="mlp-digits", devices=AGENTS, use_all_devices=True, steps=80, batch_size=64, microbatches=4, schedule="1f1b",
                optimizer="adamw", lr=2e-3, model_options={"hidden": 512, "depth": 6})


def train_across(client: Client, console: Console) -> bool:
    """Train a digits classifier split over the demo's agents and show the loss fall."""
    console.rule("training mlp-digits across the agents (1F1B pipeline)")
    run = client.start_run(**DEMO_RUN)
    console.print(escape(run["plan"]), soft_wrap=True)
    run = follow_run(client, run, console)
    losses = run["losses"]
    if run["status"] != "finished" or not losses:
        console.print(f"[red]training {run['status']}:[/] {escape(str(run['errors']))}")
        return False
    console.print(f"loss {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses)} steps on {len(run['stages'])} devices")
    return losses[-1] < losses[0]


def run_demo(console: Console, mib: int = 96, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="neuranet-demo-"))
    console.rule("[bold]NeuraNet demo")
    try:
        with LocalFabric(root) as fabric:
            url = fabric.start_server()
            console.print(f"coordinator up at [bold]{url}[/] (data in {root})")
            for name in AGENTS:
                fabric.start_agent(name, extra=["--listen-host", "127.0.0.1"])
            with console.status("waiting for three agents to enrol, measure themselves and come online…"):
                devices = fabric.wait_online(AGENTS, timeout=120)
            with fabric.client() as c:
                console.print(devices_table(c.devices()))
                ring = [(devices[AGENTS[i]], devices[AGENTS[(i + 1) % 3]]) for i in range(3)]
                console.print(f"sending {mib} MiB of float32 tensors over each link of the ring…")
                rows = run_linktests(c, ring, mib * 2**20, 2**20, console)
            console.print(linktests_table(rows))
            ok = all(r["result"].get("ok") for _, r in rows)
            console.print("[green]all links delivered every tensor in order[/]" if ok else "[red]some links failed[/]")
            with fabric.client() as c:
                trained = train_across(c, console)
            return 0 if ok and trained else 1
    except (FabricError, ClientError) as exc:
        console.print(f"[red]demo failed:[/] {escape(str(exc))}")
        return 1
    finally:
        if keep:
            console.print(f"demo data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
