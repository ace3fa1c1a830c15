"""`neuranet train`, `infer` and `runs …`: training runs and inference across your devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from neuranet.cli.common import ServerOpt, TokenOpt, ask, connect, console, err, fail
from neuranet.client import Client, ClientError

runs_app = typer.Typer(help="Training runs.", no_args_is_help=True)

PollTimeoutOpt = typer.Option(10.0, "--poll-timeout", min=0.1, help="Seconds each read of the run's state waits for the "
                              "server before trying again (for up to 5 minutes without an answer).")


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
            fail(exc)
        request.update(model=Path(model).stem[:64] or "user-model", user_model=user_model)
    with connect(server, token) as c:
        try:
            run = c.start_run(**request)
        except ClientError as exc:
            fail(exc)
        _follow(c, run, poll_timeout)


def _check_run_request(request: dict[str, Any]) -> None:
    """Refuse what the server would refuse, naming the flag (the server's request model is the one rule)."""
    from pydantic import ValidationError

    from neuranet.client import validation_message
    from neuranet.api_requests import RunRequest

    flags = {name: f"--{name.replace('_', '-')}" for name in request} | {"use_all_devices": "--all-devices"}
    try:
        RunRequest.model_validate({**request, "model": request["model"][-64:]})  # a model file's name is cut
    except ValidationError as exc:
        fail(ValueError(validation_message(exc.errors(), flags)))


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
        fail(ServerUnreachable(f"{exc}; run {run['id']} goes on at the coordinator: follow it again with "
                                f"`neuranet runs follow {run['id']}`"))
    except ClientError as exc:
        fail(exc)
    if run["status"] != "finished":
        fail(RuntimeError(f"run {run['id']} {run['status']}: {run['errors']}"))
    console.print(f"run {run['id']} finished; fetch its weights with `neuranet runs fetch {run['id']}`")


def _infer_inputs(texts: list[str], input_file: Path | None, json_lines: bool) -> list[Any]:
    """Inputs from --text and --input FILE (one per line; a JSON value per line with --json-lines)."""
    inputs: list[Any] = list(texts)
    if input_file is not None:
        try:
            lines = [ln for ln in input_file.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            fail(ValueError(f"cannot read {input_file}: {exc}"))
        for n, line in enumerate(lines, 1):
            try:
                inputs.append(json.loads(line) if json_lines else line)
            except json.JSONDecodeError as exc:
                fail(ValueError(f"{input_file}:{n}: not JSON: {exc}"))
    return inputs


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
        fail(ValueError("give inputs (--text, --input) or a prompt (--generate)"))
    if batch_size < 1:
        fail(ValueError("--batch-size must be at least 1"))
    chosen: object = None if devices == "auto" else int(devices) if devices.isdigit() else devices.split(",")
    with connect(server, token, timeout=600.0) as c:
        try:
            dep = c.deployment(deployment) if deployment else c.deploy(
                model=model, run=run, devices=chosen, seed=seed, batch_size=min(batch_size, max(1, len(inputs))),
                use_all_devices=all_devices)
            if not deployment:
                err.print(escape(dep["plan"]), soft_wrap=True)  # a table: wrapping would break it
            while dep["status"] == "loading":
                dep = c.deployment(dep["id"], wait=30)
            if dep["status"] != "ready":
                fail(RuntimeError(f"deployment {dep['id']} {dep['status']}: {dep['error']}"))
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
            fail(exc)
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

    rows = ask(server, token, lambda c: c.runs())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(runs_table(rows))


@runs_app.command("follow")
def runs_follow(run_id: str, poll_timeout: float = PollTimeoutOpt, server: Optional[str] = ServerOpt,
                token: Optional[str] = TokenOpt) -> None:
    """Follow a training run again (after the terminal closed, or the server was away too long)."""
    with connect(server, token) as c:
        try:
            run = c.run(run_id)
        except ClientError as exc:
            fail(exc)
        _follow(c, run, poll_timeout, started=False)


@runs_app.command("fetch")
def runs_fetch(run_id: str, output: Path = typer.Option(None, "-o", help="Where to write the safetensors file."),
               server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Download a finished run's weights (safetensors)."""
    out = output or Path(f"{run_id}.safetensors")
    with connect(server, token) as c:
        try:
            out.write_bytes(c.run_weights(run_id))
        except ClientError as exc:
            fail(exc)
    console.print(f"wrote {escape(str(out))}")
