"""`neuranet login`, `join-token`, `token …`, `devices …`, `users …`: logins, API tokens, enrolment,
devices and user accounts.

Also the pure helper behind ``--expires``: durations (``30d``).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from neuranet.cli.common import ServerOpt, TokenOpt, ask, connect, console, err, fail
from neuranet.client import Client, ClientError, save_client_config
from neuranet.config import ClientConfig

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
users_app = typer.Typer(help="Users (admin only).", no_args_is_help=True)
devices_app = typer.Typer(help="Your devices: list them (the default) or remove one.")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwy])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float | None:
    """Seconds in ``30d``, ``12h``, ``90m``, ``2w``, ``1y`` or ``3600`` (seconds); None for ``never``."""
    if text.strip().lower() == "never":
        return None
    found = _DURATION.match(text)
    seconds = float(found.group(1)) * _UNITS[found.group(2).lower()] if found else None
    if seconds is None:
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a duration: write e.g. 30d, 12h, 90m, 3600 or never") from None
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return seconds


def _when(ts: float | None) -> str:
    return "never" if ts is None else f"{datetime.datetime.fromtimestamp(ts):%Y-%m-%d %H:%M}"


# --- logging in, enrolling ---------------------------------------------------------------


def login(server: str = typer.Option(..., "--server"), token: str = typer.Option(..., "--token"),
          ca_cert: Optional[Path] = typer.Option(None, help="CA certificate to trust for https."),
          server_fingerprint: Optional[str] = typer.Option(
              None, help="Trust exactly the server's self-signed certificate with this fingerprint (SHA256:..., "
              "as `neuranet server --self-signed` prints it).")) -> None:
    """Save the server URL and token for later commands."""
    from neuranet.client import pin_server_certificate
    from neuranet.protocol.auth import parse_fingerprint

    cfg = ClientConfig(server.rstrip("/"), token, ca_cert)
    if server_fingerprint is not None:
        try:
            cert = pin_server_certificate(cfg.server_url, parse_fingerprint(server_fingerprint))
        except (ValueError, ClientError) as exc:
            fail(exc)
        cfg = ClientConfig(cfg.server_url, token, cert, pinned=True)
    with Client(cfg) as c:
        try:
            me = c.me()
        except ClientError as exc:
            fail(exc)
    path = save_client_config(cfg)
    console.print(f"Logged in as [cyan]{escape(me['name'])}[/]; saved to {escape(str(path))}")


def join_token(ttl: float = typer.Option(86400, help="Seconds the token stays valid."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Create a one-time token that enrols one device as yours."""
    with connect(server, token) as c:
        try:
            jt = c.create_join_token(ttl)
        except ClientError as exc:
            fail(exc)
        console.print(jt["join_token"], markup=False, highlight=False)
        try:
            pin = c.health().get("fingerprint")
        except ClientError:
            pin = None
        pinning = f" --server-fingerprint {pin}" if pin else ""
        # Not `--join-token TOKEN`: a command line is visible to every user of the machine (`ps`).
        err.print(f"Enrol a device with:  neuranet agent --server {c.base_url} --join-token -{pinning}   "
                  "(then paste the token), or --join-token-file FILE", markup=False, highlight=False)


# --- tokens -----------------------------------------------------------------------------


@token_app.command("create")
def token_create(name: str = typer.Option("cli", help="A label for the token."),
                 expires: str = typer.Option("90d", help="How long it stays valid: 30d, 12h, ... or never."),
                 server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Create a new API token for your user (printed once)."""
    try:
        seconds = parse_duration(expires)
    except ValueError as exc:
        fail(ValueError(f"--expires: {exc}"))
    console.print(ask(server, token, lambda c: c.create_token(name, seconds)), markup=False, highlight=False)


@token_app.command("ls")
def token_ls(as_json: bool = typer.Option(False, "--json"), server: Optional[str] = ServerOpt,
             token: Optional[str] = TokenOpt) -> None:
    """List your API tokens (ids and labels; the secrets are never shown again)."""
    rows = ask(server, token, lambda c: c.tokens())
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="API tokens")
    for col in ("id", "name", "created", "expires", ""):
        table.add_column(col)
    for t in rows:
        table.add_row(t["id"], escape(t["name"]), _when(t["created_at"]), _when(t["expires_at"]),
                      "this one" if t["current"] else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(which: str = typer.Argument(..., help="Token id, id prefix or label (see `neuranet token ls`)."),
                 server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Revoke one of your API tokens: it is refused from now on."""
    def revoke(c: Client) -> dict[str, Any]:
        return c.revoke_token(_match(c.tokens(), which, "token")["id"])

    out = ask(server, token, revoke)
    console.print(f"revoked token {out['revoked']} ({escape(out['name'])})")


def _match(rows: list[dict[str, Any]], which: str, what: str) -> dict[str, Any]:
    exact = [r for r in rows if which in (r["id"], r["name"])]
    found = exact or [r for r in rows if r["id"].startswith(which)]
    if len(found) != 1:
        raise ClientError(f"{'no' if not found else 'more than one'} {what} matches {which!r}"
                          + (": give its id" if found else ""))
    return found[0]


# --- devices ----------------------------------------------------------------------------


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
            watch: bool = typer.Option(False, "--watch", help="Then follow devices going online and offline, as "
                                       "they do (Ctrl-C stops); with --json, one JSON object a line."),
            server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """List your devices: online state, resources, last seen."""
    if ctx.invoked_subcommand is not None:
        return
    from neuranet.ui import devices_table

    if watch:
        with connect(server, token) as c:
            try:
                watch_devices(c, as_json)
            except ClientError as exc:
                fail(exc)
            except KeyboardInterrupt:
                pass
        return
    rows = ask(server, token, lambda c: c.devices())
    if as_json:
        console.print_json(json.dumps(rows))
    else:
        console.print(devices_table(rows))


def watch_devices(c: Client, as_json: bool) -> None:
    """The device list each time the event stream opens (after a reconnect too), then a line per device going
    online or offline, from ``GET /api/v1/events`` (nothing is polled)."""
    from neuranet.server.events import DEVICE_ONLINE, STREAM_GAP, STREAM_OPEN
    from neuranet.ui import devices_table

    names: dict[str, str] = {}
    for event in c.events(kinds=["device"], note=lambda text: err.print(f"[yellow]{escape(text)}[/]")):
        if event.kind in (STREAM_OPEN, STREAM_GAP):  # (re)subscribed: the list as it is from now on
            rows = c.devices()
            names = {d["id"]: d["name"] for d in rows}
            if as_json:
                typer.echo(json.dumps({"devices": rows}))
            else:
                console.print(devices_table(rows))
            continue
        if event.kind.startswith("stream."):
            continue
        if event.object_id not in names:  # enrolled since the list was read
            names = {d["id"]: d["name"] for d in c.devices()}
        name, online = names.get(event.object_id, event.object_id), event.kind == DEVICE_ONLINE
        if as_json:
            typer.echo(json.dumps({"at": event.at, "device": event.object_id, "name": name,
                                   "state": "online" if online else "offline"}))
        else:
            when = datetime.datetime.fromtimestamp(event.at).strftime("%H:%M:%S")
            console.print(f"{when} {escape(name)} {'[green]online[/]' if online else '[red]offline[/]'}")


@devices_app.command("remove")
def devices_remove(device: str = typer.Argument(..., help="Device name, id or id prefix."),
                   force: bool = typer.Option(False, "--force", help="Remove it even if it holds the only copy "
                                              "of some file chunks (those files become unreadable)."),
                   server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Remove a device: its key is refused at once, it is disconnected, its chunks copied elsewhere."""
    def remove(c: Client) -> dict[str, Any]:
        return c.remove_device(c.resolve_device(device)["id"], force)

    out = ask(server, token, remove)
    console.print(f"removed device {escape(out['name'])} ({out['removed']})")
    if out["replicas"]:
        lost = f"; {out['sole_copies']} had no other copy and are lost" if out["sole_copies"] else ""
        err.print(f"{out['replicas']} chunk copies it held are being made on your other devices{lost}")


# --- users ------------------------------------------------------------------------------


@users_app.command("create")
def users_create(name: str, admin: bool = typer.Option(False, "--admin"),
                 server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Create a user and print its first API token."""
    u = ask(server, token, lambda c: c.create_user(name, admin))
    console.print(f"user {escape(u['name'])} ({u['user_id']}) token: {u['token']}")


@users_app.command("ls")
def users_ls(server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """List the users of this coordinator (admin only)."""
    table = Table(title="Users")
    for col in ("name", "id", "admin", "state", "created"):
        table.add_column(col)
    for u in ask(server, token, lambda c: c.users()):
        table.add_row(escape(u["name"]), u["id"], "yes" if u["is_admin"] else "",
                      "[red]disabled[/]" if u["disabled"] else "active", _when(u["created_at"]))
    console.print(table)


@users_app.command("disable")
def users_disable(name: str, server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Disable a user (admin only): its tokens and devices are refused and its devices disconnected."""
    ask(server, token, lambda c: c.set_user_disabled(name, True))
    console.print(f"user {escape(name)} is disabled")


@users_app.command("enable")
def users_enable(name: str, server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Enable a disabled user again (admin only)."""
    ask(server, token, lambda c: c.set_user_disabled(name, False))
    console.print(f"user {escape(name)} is enabled")
