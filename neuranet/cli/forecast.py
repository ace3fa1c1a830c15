"""`neuranet forecast` and `neuranet trace …`: when your devices will be online, and traces to try it on."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from neuranet.cli.common import ServerOpt, TokenOpt, ask, connect, console, err, fail
from neuranet.client import ClientError

trace_app = typer.Typer(help="Availability traces.", no_args_is_help=True)


def forecast(
    device: Optional[str] = typer.Argument(None, help="A device name or id (default: all your devices)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the device's history and forecast."),
    simulated: bool = typer.Option(True, help="Include simulated devices (imported traces)."),
    retrain: bool = typer.Option(False, "--retrain", help="Retrain the forecaster first (admin)."),
    as_json: bool = typer.Option(False, "--json"),
    server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt,
) -> None:
    """Probability each device is online 15 min, 1 h, 6 h and 24 h from now, next to its recent history."""
    from neuranet.ui import forecast_method, forecast_table, plot_forecast

    if plot is not None and device is None:
        fail(ValueError("--plot needs a DEVICE"))
    with connect(server, token, timeout=600.0) as c:
        try:
            if retrain:
                info = c.retrain_forecaster()
                err.print(f"forecaster retrained on {info['devices']} devices")
            rows = [c.forecast(c.resolve_device(device)["id"])] if device else c.forecast(simulated=simulated)
        except ClientError as exc:
            fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(forecast_table(rows))
        if rows:
            console.print(escape(forecast_method(rows[0]["model"])), soft_wrap=True)
    if plot is not None:
        try:
            plot_forecast(rows[0], plot)
        except OSError as exc:
            fail(exc)
        err.print(f"wrote {escape(str(plot))}")


@trace_app.command("import")
def trace_import(file: Path, prefix: str = typer.Option("trace", help="Name prefix of the simulated devices."),
                 replace: bool = typer.Option(False, "--replace", help="Replace the devices of an earlier import "
                                                                     "with the same prefix (else it is refused)."),
                 server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Load an availability trace (client_id,event_type,event_start,event_end) as simulated devices' history."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        fail(exc)
    out = ask(server, token, lambda c: c.import_trace(data, prefix, replace), timeout=600.0)
    console.print(f"imported {out['devices']} simulated devices ({out['days']:.1f} days of history, "
                  f"ending {datetime.datetime.fromtimestamp(out['history_end']):%Y-%m-%d %H:%M})")


@trace_app.command("ls")
def trace_ls(server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """The traces you imported: prefix, simulated devices, end of their history."""
    rows = ask(server, token, lambda c: c.traces())
    for r in rows:
        end = datetime.datetime.fromtimestamp(r["history_end"]) if r["history_end"] else None
        print(f"{r['prefix']}\t{r['devices']} devices\thistory ends {end:%Y-%m-%d %H:%M}" if end else
              f"{r['prefix']}\t{r['devices']} devices")
    if not rows:
        err.print("no traces imported")


@trace_app.command("rm")
def trace_rm(prefix: str = typer.Argument(..., help="The prefix the trace was imported with."),
             server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Remove the simulated devices of an imported trace, with their history."""
    out = ask(server, token, lambda c: c.remove_trace(prefix))
    console.print(f"removed {out['removed']} simulated devices of {out['prefix']}", markup=False)
