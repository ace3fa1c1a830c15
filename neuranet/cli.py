"""The ``neuranet`` command line: thin wrappers over the server, agent and REST client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from neuranet.client import Client, ClientError, load_client_config, save_client_config
from neuranet.config import ClientConfig, ServerConfig, default_home
from neuranet.runner import run_service

app = typer.Typer(help="NeuraNet: one fabric of the computers you own.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
users_app = typer.Typer(help="Users (admin only).", no_args_is_help=True)
links_app = typer.Typer(help="PeerLinks between your devices.", no_args_is_help=True)
runs_app = typer.Typer(help="Training runs.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(users_app, name="users")
app.add_typer(links_app, name="links")
app.add_typer(runs_app, name="runs")
console = Console()
err = Console(stderr=True)

ServerOpt = typer.Option(None, "--server", envvar="NEURANET_SERVER", help="Coordinator URL (default: saved login).")
TokenOpt = typer.Option(None, "--token", envvar="NEURANET_TOKEN", help="API token (default: saved login).")


def _client(server: str | None, token: str | None, timeout: float = 30.0) -> Client:
    try:
        return Client(load_client_config(server, token), timeout=timeout)
    except ClientError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _fail(exc: Exception) -> NoReturn:
    # Escaped: messages quote user input and hints like 'neuranet[x]'; unwrapped: one line, whole.
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(1)


T = TypeVar("T")


def _ask(server: str | None, token: str | None, call: Callable[[Client], T], timeout: float = 30.0) -> T:
    """``call(client)`` against the coordinator; a refusal ends the command with its reason."""
    with _client(server, token, timeout) as c:
        try:
            return call(c)
        except ClientError as exc:
            _fail(exc)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")


@app.command()
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

    _logging(verbose)
    home = data_dir or default_home() / "server"
    if (tls_cert is None) != (tls_key is None):
        _fail(ValueError("--tls-cert and --tls-key go together"))
    if self_signed and tls_cert is not None:
        _fail(ValueError("--self-signed makes its own certificate: drop --tls-cert/--tls-key, or --self-signed"))
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            _fail(FileNotFoundError(f"{p} does not exist"))
    try:
        if self_signed:
            tls_cert, tls_key = self_signed_certificate(home, host)
        pin = agent_pin(tls_cert, CoordinatorIdentity.load_or_create(home))
    except (OSError, ValueError) as exc:
        _fail(exc)
    try:
        options = json.loads(forecast_options)
        if not isinstance(options, dict):
            raise ValueError("it must be a JSON object")
        from neuranet.forecast.model import ForecastConfig

        ForecastConfig(**options)
    except (ValueError, TypeError) as exc:
        _fail(ValueError(f"--forecast-options: {exc}"))
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
        _fail(exc)


@app.command()
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
            _fail(exc)
        cfg = ClientConfig(cfg.server_url, token, cert, pinned=True)
    with Client(cfg) as c:
        try:
            me = c.me()
        except ClientError as exc:
            _fail(exc)
    path = save_client_config(cfg)
    console.print(f"Logged in as [cyan]{escape(me['name'])}[/]; saved to {escape(str(path))}")


@app.command("join-token")
def join_token(ttl: float = typer.Option(86400, help="Seconds the token stays valid."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Create a one-time token that enrols one device as yours."""
    with _client(server, token) as c:
        try:
            jt = c.create_join_token(ttl)
        except ClientError as exc:
            _fail(exc)
        console.print(jt["join_token"], markup=False, highlight=False)
        try:
            pin = c.health().get("fingerprint")
        except ClientError:
            pin = None
        pinning = f" --server-fingerprint {pin}" if pin else ""
        # Not `--join-token TOKEN`: a command line is visible to every user of the machine (`ps`).
        err.print(f"Enrol a device with:  neuranet agent --server {c.base_url} --join-token -{pinning}   "
                  "(then paste the token), or --join-token-file FILE", markup=False, highlight=False)


@app.command()
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
    from neuranet.identity_cli import read_join_token

    _logging(verbose)
    try:
        storage_bytes = parse_size(storage)
        join_token = read_join_token(join_token, join_token_file, sys.stdin)
        the_agent = build_agent(server, data_dir, name=name, join_token=join_token, ca_cert=ca_cert,
                                server_fingerprint=server_fingerprint, listen_host=listen_host,
                                listen_port=listen_port, measure=measure, direct=direct,
                                allow_owner_code=allow_owner_code, storage_bytes=storage_bytes)
    except (ValueError, Invalid) as exc:
        _fail(ValueError(_as_flag(exc)))

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


@links_app.command("test")
def links_test(src: str, dst: str, mib: int = typer.Option(64, help="MiB to send."),
               message_mib: float = typer.Option(1.0, help="Size of each message in MiB."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Send tensors from SRC to DST over a PeerLink and report throughput and path."""
    from neuranet.demo import run_linktests
    from neuranet.ui import linktests_table

    with _client(server, token) as c:
        try:
            a, b = c.resolve_device(src), c.resolve_device(dst)
            rows = run_linktests(c, [(a, b)], mib * 2**20, int(message_mib * 2**20), console)
        except ClientError as exc:
            _fail(exc)
    console.print(linktests_table(rows))
    if not all(r["result"].get("ok") for _, r in rows):
        raise typer.Exit(1)


PollTimeoutOpt = typer.Option(10.0, "--poll-timeout", min=0.1, help="Seconds each progress poll waits for the "
                              "server before trying again (for up to 5 minutes without an answer).")


@app.command()
def train(
    model: str = typer.Option(..., help="Built-in model (mlp-digits, cnn-digits, gpt-char) or a .py file of "
                              "yours defining build(seed) -> LayerModel (runs on your own devices only)."),
    data: Optional[str] = typer.Option(None, help="Dataset: digits or stdlib (default: the model's own)."),
    devices: str = typer.Option("auto", help="'auto', a count, or comma-separated device names/ids."),
    steps: int = typer.Option(100), batch_size: int = typer.Option(32), microbatches: int = typer.Option(4),
    schedule: str = typer.Option("1f1b", help="1f1b or gpipe."), optimizer: str = typer.Option("sgd"),
    lr: float = typer.Option(0.05), seed: int = typer.Option(0),
    all_devices: bool = typer.Option(False, "--all-devices", help="Use every chosen device, in the order given."),
    poll_timeout: float = PollTimeoutOpt,
    server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt,
) -> None:
    """Train a model split across your devices; shows the plan and the loss as it falls."""
    chosen: object = None if devices == "auto" else int(devices) if devices.isdigit() else devices.split(",")
    user_model = None
    request = dict(model=model, devices=chosen, steps=steps, batch_size=batch_size, microbatches=microbatches,
                   schedule=schedule, optimizer=optimizer, lr=lr, seed=seed, use_all_devices=all_devices, data=data)
    _check_run_request(request)  # before measuring a model file: one line per mistake, nothing started
    if model.endswith(".py") or Path(model).is_file():
        from neuranet.pipeline.models import UserModelError
        from neuranet.pipeline.profile_layers import user_model_spec

        try:
            user_model = user_model_spec(model, seed, max(1, batch_size // microbatches))
        except (UserModelError, ValueError, OSError) as exc:
            _fail(exc)
        request.update(model=Path(model).stem[:64] or "user-model", user_model=user_model)
    with _client(server, token) as c:
        try:
            run = c.start_run(**request)
        except ClientError as exc:
            _fail(exc)
        _follow(c, run, poll_timeout)


def _check_run_request(request: dict[str, Any]) -> None:
    """Refuse what the server would refuse, naming the flag (the server's request model is the one rule)."""
    from pydantic import ValidationError

    from neuranet.client import validation_message
    from neuranet.server.runs import RunRequest

    flags = {name: f"--{name.replace('_', '-')}" for name in request} | {"use_all_devices": "--all-devices"}
    try:
        RunRequest.model_validate({**request, "model": request["model"][-64:]})  # a model file's name is cut
    except ValidationError as exc:
        _fail(ValueError(validation_message(exc.errors(), flags)))


def _follow(c: Client, run: dict[str, Any], poll_timeout: float, started: bool = True) -> None:
    """Print the run's id and plan first (so it can be found again), follow it, and say how it ended."""
    from neuranet.client import Patience, ServerUnreachable
    from neuranet.ui import follow_run

    if started:
        console.print(f"run {run['id']} started (`neuranet runs follow {run['id']}` follows it again)")
    else:
        console.print(f"following run {run['id']} (attempt {run['attempt']}, {len(run['losses'])} steps done)")
    console.print(escape(run["plan"]), soft_wrap=True)
    try:
        run = follow_run(c, run, console, patience=Patience(request_timeout=poll_timeout))
    except ServerUnreachable as exc:
        _fail(ServerUnreachable(f"{exc}; run {run['id']} goes on at the coordinator: follow it again with "
                                f"`neuranet runs follow {run['id']}`"))
    except ClientError as exc:
        _fail(exc)
    if run["status"] != "finished":
        _fail(RuntimeError(f"run {run['id']} {run['status']}: {run['errors']}"))
    console.print(f"run {run['id']} finished; fetch its weights with `neuranet runs fetch {run['id']}`")


def _infer_inputs(texts: list[str], input_file: Path | None, json_lines: bool) -> list[Any]:
    """Inputs from --text and --input FILE (one per line; a JSON value per line with --json-lines)."""
    inputs: list[Any] = list(texts)
    if input_file is not None:
        try:
            lines = [ln for ln in input_file.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            _fail(ValueError(f"cannot read {input_file}: {exc}"))
        for n, line in enumerate(lines, 1):
            try:
                inputs.append(json.loads(line) if json_lines else line)
            except json.JSONDecodeError as exc:
                _fail(ValueError(f"{input_file}:{n}: not JSON: {exc}"))
    return inputs


@app.command()
def infer(
    model: Optional[str] = typer.Option(None, help="Built-in model, e.g. all-minilm-l6-v2 (sentence embeddings)."),
    run: Optional[str] = typer.Option(None, "--run", help="Serve the final weights of this finished training run."),
    devices: str = typer.Option("auto", help="'auto', a count, or comma-separated device names/ids."),
    all_devices: bool = typer.Option(False, "--all-devices", help="Use every chosen device, in the order given."),
    text: list[str] = typer.Option([], "--text", "-t", help="An input text (repeatable)."),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i", help="Inputs, one per line."),
    json_lines: bool = typer.Option(False, "--json-lines", help="Each input line is a JSON value (e.g. a row)."),
    batch_size: int = typer.Option(32, help="Inputs per request."),
    generate: Optional[str] = typer.Option(None, "--generate", "-g", help="Prompt to continue (gpt-char)."),
    tokens: int = typer.Option(200, help="Characters to generate."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    seed: int = typer.Option(0, help="Model seed for a built-in model, and the sampling seed."),
    output: Optional[Path] = typer.Option(None, "-o", help="Write outputs here (JSON lines) instead of stdout."),
    deployment: Optional[str] = typer.Option(None, help="Use this running deployment instead of deploying."),
    keep: bool = typer.Option(False, help="Leave the deployment running (reuse it with --deployment)."),
    server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt,
) -> None:
    """Run a model across your devices for inference: batches in, outputs back, or text generated token by token."""
    inputs = _infer_inputs(text, input_file, json_lines)
    if not inputs and generate is None:
        _fail(ValueError("give inputs (--text, --input) or a prompt (--generate)"))
    if batch_size < 1:
        _fail(ValueError("--batch-size must be at least 1"))
    chosen: object = None if devices == "auto" else int(devices) if devices.isdigit() else devices.split(",")
    with _client(server, token, timeout=600.0) as c:
        try:
            dep = c.deployment(deployment) if deployment else c.deploy(
                model=model, run=run, devices=chosen, seed=seed, batch_size=min(batch_size, max(1, len(inputs))),
                use_all_devices=all_devices)
            if not deployment:
                err.print(escape(dep["plan"]), soft_wrap=True)  # a table: wrapping would break it
            while dep["status"] == "loading":
                dep = c.deployment(dep["id"], wait=30)
            if dep["status"] != "ready":
                _fail(RuntimeError(f"deployment {dep['id']} {dep['status']}: {dep['error']}"))
            out = output.open("w") if output else None
            try:
                if generate is not None:
                    console.print(c.generate(dep["id"], generate, max_new_tokens=tokens, temperature=temperature,
                                             seed=seed), markup=False, highlight=False)
                for i in range(0, len(inputs), batch_size):
                    for row in c.infer(dep["id"], inputs[i:i + batch_size]):
                        print(json.dumps(row), file=out or sys.stdout)
            finally:
                if out:
                    out.close()
        except (ClientError, OSError) as exc:
            _fail(exc)
        finally:
            if not keep and not deployment and "dep" in locals():
                c.stop_deployment(dep["id"])
    if output:
        err.print(f"wrote {len(inputs)} outputs to {escape(str(output))}")
    if keep:
        err.print(f"deployment {dep['id']} is still running")


@runs_app.command("ls")
def runs_ls(as_json: bool = typer.Option(False, "--json"), server: Optional[str] = ServerOpt,
            token: Optional[str] = TokenOpt) -> None:
    """Your training runs and deployments, newest first: state, devices, step."""
    from neuranet.ui import runs_table

    rows = _ask(server, token, lambda c: c.runs())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(runs_table(rows))


@runs_app.command("follow")
def runs_follow(run_id: str, poll_timeout: float = PollTimeoutOpt, server: Optional[str] = ServerOpt,
                token: Optional[str] = TokenOpt) -> None:
    """Follow a training run again (after the terminal closed, or the server was away too long)."""
    with _client(server, token) as c:
        try:
            run = c.run(run_id)
        except ClientError as exc:
            _fail(exc)
        _follow(c, run, poll_timeout, started=False)


@runs_app.command("fetch")
def runs_fetch(run_id: str, output: Path = typer.Option(None, "-o", help="Where to write the safetensors file."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Download a finished run's weights (safetensors)."""
    out = output or Path(f"{run_id}.safetensors")
    with _client(server, token) as c:
        try:
            out.write_bytes(c.run_weights(run_id))
        except ClientError as exc:
            _fail(exc)
    console.print(f"wrote {escape(str(out))}")


@app.command()
def demo(mib: int = typer.Option(96, help="MiB sent over each of the three links."),
         keep: bool = typer.Option(False, help="Keep the demo's data directory.")) -> None:
    """Start a server and three agents locally and move tensors around the ring."""
    from neuranet.demo import run_demo

    sys.exit(run_demo(console, mib, keep))


from neuranet.files_cli import files_app  # noqa: E402  (its commands use the helpers above)
from neuranet import forecast_cli  # noqa: E402,F401  (registers forecast and trace commands)
from neuranet import identity_cli  # noqa: E402,F401  (registers token, devices and users commands)

app.add_typer(files_app, name="files")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
