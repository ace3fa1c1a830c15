"""`neuranet links …`: PeerLinks between your devices."""

from __future__ import annotations

from typing import Optional

import typer

from neuranet.cli.common import ServerOpt, TokenOpt, connect, console, fail
from neuranet.client import ClientError

links_app = typer.Typer(help="PeerLinks between your devices.", no_args_is_help=True)


@links_app.command("test")
def links_test(src: str, dst: str, mib: int = typer.Option(64, help="MiB to send."),
               message_mib: float = typer.Option(1.0, help="Size of each message in MiB."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Send tensors from SRC to DST over a PeerLink and report throughput and path."""
    from neuranet.demo import run_linktests
    from neuranet.ui import linktests_table

    with connect(server, token) as c:
        try:
            a, b = c.resolve_device(src), c.resolve_device(dst)
            rows = run_linktests(c, [(a, b)], mib * 2**20, int(message_mib * 2**20), console)
        except ClientError as exc:
            fail(exc)
    console.print(linktests_table(rows))
    if not all(r["result"].get("ok") for _, r in rows):
        raise typer.Exit(1)
