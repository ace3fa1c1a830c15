"""What every command shares: the consoles, the --server/--token options, and the one way to reach the
coordinator and to end a command with an error."""

from __future__ import annotations

import logging
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from neuranet.client import Client, ClientError, load_client_config

console = Console()
err = Console(stderr=True)

ServerOpt = typer.Option(None, "--server", envvar="NEURANET_SERVER", help="Coordinator URL (default: saved login).")
TokenOpt = typer.Option(None, "--token", envvar="NEURANET_TOKEN", help="API token (default: saved login).")

T = TypeVar("T")


def fail(exc: Exception) -> NoReturn:
    """End the command with ``error: <exc>`` on stderr and exit status 1."""
    # Escaped: messages quote user input and hints like 'neuranet[x]'; unwrapped: one line, whole.
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(1)


def connect(server: str | None, token: str | None, timeout: float = 30.0) -> Client:
    """A client of the coordinator (--server/--token, else the saved login); exit status 2 without one."""
    try:
        return Client(load_client_config(server, token), timeout=timeout)
    except ClientError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def ask(server: str | None, token: str | None, call: Callable[[Client], T], timeout: float = 30.0) -> T:
    """``call(client)`` against the coordinator; a refusal ends the command with its reason."""
    with connect(server, token, timeout) as c:
        try:
            return call(c)
        except ClientError as exc:
            fail(exc)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
