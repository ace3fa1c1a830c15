"""`neuranet agent`: run this device's agent (assembled by `neuranet.agent.build.build_agent`).

Also the pure helper behind its --join-token options: reading the token from a file or stdin, so it
never has to appear on a command line where `ps` shows it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import IO, Optional

import typer

from neuranet.cli.common import err, fail, setup_logging
from neuranet.runner import run_service


def agent(
    server: str = typer.Option(..., "--server", envvar="NEURANET_SERVER", help="Coordinator URL."),
    join_token: Optional[str] = typer.Option(None, envvar="NEURANET_JOIN_TOKEN", help="One-time token to enrol "
                                             "this device (first run only); '-' reads it from stdin. On a shared "
                                             "machine prefer '-', --join-token-file or NEURANET_JOIN_TOKEN: "
                                             "a command line is visible to other users."),
    join_token_file: Optional[Path] = typer.Option(None, help="Read the join token from this file."),
    data_dir: Path = typer.Option(None, help="Key and state (default: ~/.neuranet/agent)."),
    name: Optional[str] = typer.Option(None, help="Device name (default: hostname)."),
    ca_cert: Optional[Path] = typer.Option(None, help="CA certificate to trust for wss://."),
    server_fingerprint: Optional[str] = typer.Option(
        None, help="The coordinator's fingerprint as `neuranet server` prints it (SHA256:...): its self-signed "
        "certificate's over https (pinned instead of trusting a CA), its identity key's over http. Without it the "
        "agent pins what it meets at enrolment."),
    listen_host: str = typer.Option("0.0.0.0", help="Address for direct peer links."),
    listen_port: int = typer.Option(0, help="Port for direct peer links (0: any)."),
    measure: bool = typer.Option(True, help="Measure matmul speed and bandwidth on connect."),
    direct: bool = typer.Option(True, help="Offer direct peer links (--no-direct: always relay)."),
    allow_owner_code: bool = typer.Option(False, "--allow-owner-code", help="Run model files of this device's "
                                          "owner (`train --model my.py`: their Python code, with this agent's "
                                          "rights). Off: built-in models only."),
    storage: str = typer.Option("0", help="Disk space offered to the owner's files, e.g. 20G (default: none)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run this device's agent: one outbound connection to the coordinator, reconnecting until the
    server answers something no retry can change (wrong URL, refused device, other version)."""
    from neuranet.agent.build import build_agent
    from neuranet.agent.chunk_store import parse_size
    from neuranet.agent.runtime import ServerRefused
    from neuranet.errors import Invalid

    setup_logging(verbose)
    try:
        storage_bytes = parse_size(storage)
        join_token = read_join_token(join_token, join_token_file, sys.stdin)
        the_agent = build_agent(server, data_dir, name=name, join_token=join_token, ca_cert=ca_cert,
                                server_fingerprint=server_fingerprint, listen_host=listen_host,
                                listen_port=listen_port, measure=measure, direct=direct,
                                allow_owner_code=allow_owner_code, storage_bytes=storage_bytes)
    except (ValueError, Invalid) as exc:
        fail(ValueError(_as_flag(exc)))

    async def main() -> None:
        # A signal sets an event rather than cancelling a task once: Python 3.11 can swallow a single
        # cancellation inside wait_for, and Agent.stop cancels until the agent has really stopped.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await the_agent.serve_until(stop)

    try:
        run_service(main())
    except ServerRefused as exc:  # one line however wide the message (a log tail or a service manager reads it)
        err.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _as_flag(exc: Exception) -> str:
    """The message, naming the command's flag where it names `build_agent`'s argument (``--name ...``)."""
    text, argument = str(exc), getattr(exc, "argument", None)  # InvalidArgument names it
    if argument and text.startswith(argument):
        return "--" + argument.replace("_", "-") + text[len(argument):]
    return text


def read_join_token(value: str | None, file: Path | None, stdin: IO[str]) -> str | None:
    """The join token from ``--join-token`` (``-``: read stdin) or ``--join-token-file``; None if neither."""
    if value is not None and file is not None:
        raise ValueError("give --join-token or --join-token-file, not both")
    if file is not None:
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the join token from {file}: {exc}") from None
    elif value == "-":
        text = stdin.readline()
    else:
        return value
    token = text.strip()
    if not token:
        raise ValueError(f"no join token in {file or 'stdin'}")
    return token
