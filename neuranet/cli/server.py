"""`neuranet server`: run the coordinator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from neuranet.cli.common import console, err, fail, setup_logging
from neuranet.client import save_client_config
from neuranet.config import ClientConfig, ServerConfig, default_home
from neuranet.runner import run_service


def server(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8420, help="Port (0 picks a free one)."),
    data_dir: Path = typer.Option(None, help="Database and blobs (default: ~/.neuranet/server)."),
    db_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL, e.g. postgresql+asyncpg://user@host/db."),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate: serve HTTPS/WSS."),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key for --tls-cert."),
    self_signed: bool = typer.Option(False, "--self-signed", help="Serve HTTPS/WSS with a certificate of the "
                                     "coordinator's own (made once, kept in the data dir); agents pin its "
                                     "fingerprint."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP on an address other hosts can "
                                  "reach (only on a network you trust)."),
    offline_after: float = typer.Option(12.0, help="Seconds of silence before a device is marked offline."),
    heartbeat: float = typer.Option(3.0, help="Heartbeat interval agents are told to use."),
    max_connections_per_user: int = typer.Option(256, help="Agent connections one user may hold."),
    relay_stall_timeout: float = typer.Option(10.0, help="Seconds a relaying peer may stay paused behind a "
                                              "destination that does not read before it is cut off."),
    forecast_retrain: float = typer.Option(6 * 3600.0, help="Seconds between retrainings of the availability "
                                           "forecaster."),
    forecast_options: str = typer.Option("{}", help="JSON settings of the forecaster, e.g. "
                                         "'{\"epochs\": 4, \"hidden\": 32}' for a small coordinator."),
    file_repair: float = typer.Option(60.0, help="Seconds between rounds of file chunk repair and migration."),
    file_lost_after: float = typer.Option(24 * 3600.0, help="Seconds offline after which a device's file "
                                          "chunks are copied elsewhere."),
    file_orphan_after: float = typer.Option(24 * 3600.0, help="Seconds after which uploaded chunks that no "
                                            "file uses (an upload never finished) are deleted."),
    telemetry_retention: float = typer.Option(30 * 86400.0, help="Seconds device telemetry is kept."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the coordinator (REST API, agent WebSocket and relay hub)."""
    from neuranet.config import Limits
    from neuranet.server.app import StartupError
    from neuranet.server.run import serve

    from neuranet.server.identity import CoordinatorIdentity, agent_pin, self_signed_certificate

    setup_logging(verbose)
    home = data_dir or default_home() / "server"
    if (tls_cert is None) != (tls_key is None):
        fail(ValueError("--tls-cert and --tls-key go together"))
    if self_signed and tls_cert is not None:
        fail(ValueError("--self-signed makes its own certificate: drop --tls-cert/--tls-key, or --self-signed"))
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            fail(FileNotFoundError(f"{p} does not exist"))
    try:
        if self_signed:
            tls_cert, tls_key = self_signed_certificate(home, host)
        pin = agent_pin(tls_cert, CoordinatorIdentity.load_or_create(home))
    except (OSError, ValueError) as exc:
        fail(exc)
    try:
        options = json.loads(forecast_options)
        if not isinstance(options, dict):
            raise ValueError("it must be a JSON object")
        from neuranet.forecast.model import ForecastConfig

        ForecastConfig(**options)
    except (ValueError, TypeError) as exc:
        fail(ValueError(f"--forecast-options: {exc}"))
    cfg = ServerConfig(data_dir=home, host=host, port=port, db_url=db_url,
                       tls_cert=tls_cert, tls_key=tls_key, insecure=insecure, offline_after=offline_after, heartbeat_interval=heartbeat,
                       forecast_retrain_interval=forecast_retrain, forecast_options=options,
                       file_repair_interval=file_repair, file_lost_after=file_lost_after,
                       file_orphan_after=file_orphan_after, telemetry_retention=telemetry_retention,
                       limits=Limits(max_connections_per_user=max_connections_per_user,
                                     relay_stall_timeout=relay_stall_timeout))

    first_token: list[str] = []

    def first_admin(name: str, token: str) -> None:
        console.print(f"[bold]First start:[/] created user [cyan]{escape(name)}[/] with API token (shown once):\n  {token}")
        first_token.append(token)

    def listening(url: str) -> None:
        console.print(f"NeuraNet coordinator listening on [bold]{url}[/] (data in {escape(str(cfg.data_dir))})")
        if pin:
            what = ("its self-signed TLS certificate (agents enrol with it)" if tls_cert else
                    "its identity key (agents pin it at enrolment; giving it makes sure it is this coordinator)")
            console.print(f"Fingerprint of {what}:\n  --server-fingerprint {pin}", markup=False, highlight=False)
        if insecure and tls_cert is None:
            err.print("warning: --insecure: API tokens and all traffic cross the network in the clear", markup=False)
        if first_token:  # log this machine's CLI in, unless it already has a login
            saved = save_client_config(ClientConfig(url, first_token[0], ca_cert=tls_cert, pinned=self_signed),
                                       overwrite=False)
            if saved:
                console.print(f"Saved this login to {escape(str(saved))} for the CLI on this machine.")

    try:
        run_service(serve(cfg, first_admin, listening))
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        fail(exc)
