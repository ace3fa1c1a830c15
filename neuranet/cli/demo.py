"""`neuranet demo`: a server and three agents on this machine."""

from __future__ import annotations

import sys

import typer

from neuranet.cli.common import console


def demo(mib: int = typer.Option(96, help="MiB sent over each of the three links."),
         keep: bool = typer.Option(False, help="Keep the demo's data directory.")) -> None:
    """Start a server and three agents locally and move tensors around the ring."""
    from neuranet.demo import run_demo

    sys.exit(run_demo(console, mib, keep))
