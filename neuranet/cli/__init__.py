"""The ``neuranet`` command line: thin wrappers over the server, agent and REST client.

One module per command group defines its commands (and its sub-app, if it has one); this root names
them, in the order ``neuranet --help`` lists them. A new command group is a module and its lines here.
What the commands share (consoles, --server/--token, reaching the coordinator, failing) is
`neuranet.cli.common`.
"""

from __future__ import annotations

import os

import typer

from neuranet.cli import agent, demo, files, forecast, identity, links, runs, server

app = typer.Typer(help="NeuraNet: one fabric of the computers you own.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

app.command()(server.server)
app.command()(identity.login)
app.command("join-token")(identity.join_token)
app.command()(agent.agent)
app.command()(runs.train)
app.command()(runs.infer)
app.command()(demo.demo)
app.command()(forecast.forecast)

app.add_typer(identity.token_app, name="token")
app.add_typer(identity.users_app, name="users")
app.add_typer(links.links_app, name="links")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(forecast.trace_app, name="trace")
app.add_typer(identity.devices_app, name="devices")
app.add_typer(files.files_app, name="files")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
