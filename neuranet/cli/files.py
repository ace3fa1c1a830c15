"""`neuranet files …`: put, get, list, inspect and delete files kept on your devices."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from neuranet.cli.common import ServerOpt, TokenOpt, ask, connect, console, fail
from neuranet.client import ClientError
from neuranet.config import default_home
from neuranet.storage.chunks import MAX_FILE_BYTES

files_app = typer.Typer(help="Files kept on your devices.", no_args_is_help=True)
PASSPHRASE_ENV = "NEURANET_PASSPHRASE"


def _passphrase(confirm: bool) -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        fail(ValueError("the passphrases differ"))
    return first


def _bar() -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


AgentDirOpt = typer.Option(None, "--agent-dir", help="Data dir of this machine's agent (default: "
                           "~/.neuranet/agent when its agent runs).")
NoAgentOpt = typer.Option(False, "--no-agent", help="Go through the coordinator even when this machine runs "
                          "an agent.")


@files_app.command("put")
def put(path: Path = typer.Argument(..., help="The file to store."),
        name: Optional[str] = typer.Option(None, "--name", help="Its name on the fabric (default: the file's name)."),
        replicas: int = typer.Option(3, "--replicas", "-k", min=1, max=16, help="Copies of each chunk."),
        encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt on this machine before upload."),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="Encrypt with this key file "
                                                "(else a passphrase: prompted, or $NEURANET_PASSPHRASE)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a file of the same name."),
        agent_dir: Optional[Path] = AgentDirOpt, no_agent: bool = NoAgentOpt,
        server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Store a file on your devices, chunk by chunk, each chunk on REPLICAS devices.

    When this machine runs an agent of yours, chunks go through it: it keeps them or sends them to the
    chosen devices over PeerLinks (direct when possible). Otherwise through the coordinator."""
    from neuranet.storage.sealing import Sealer, SealingError
    from neuranet.storage.transfer import upload

    if not path.is_file():
        fail(FileNotFoundError(f"{path} is not a readable file"))
    if path.stat().st_size > MAX_FILE_BYTES:  # said now, not after uploading all that the coordinator would refuse
        fail(ValueError(f"{path} is {_size(path.stat().st_size)}; files are stored up to {_size(MAX_FILE_BYTES)}"))
    try:
        sealer = (Sealer.new(key_file=key_file) if key_file else Sealer.new(passphrase=_passphrase(True))) \
            if (encrypt or key_file) else None
    except SealingError as exc:
        fail(exc)
    with connect(server, token, timeout=120.0) as c, _bar() as bar, open(path, "rb") as f:
        task = bar.add_task(f"put {escape(path.name)}", total=path.stat().st_size)
        try:
            agent = None if no_agent else _local_agent(c, agent_dir)
            out = upload(c, f, name or path.name, replicas, sealer, overwrite, lambda n: bar.advance(task, n),
                         agent=agent)
        except (ClientError, OSError) as exc:
            fail(exc)
    console.print(f"stored {escape(out['name'])}: {_size(out['plaintext_size'])} in {out['chunks']} chunk(s), "
                  f"{_replicas(out)}{', encrypted' if out['encrypted'] else ''} ({_ways(out['paths'])})")
    _repair_note(out)


def _replicas(out: dict[str, Any]) -> str:
    """"3 replicas", or as many as its least-copied chunk has now when some chunks are short."""
    wanted, short = out["replicas"], out.get("chunks_short", 0)
    if not short:
        return f"{wanted} replicas"
    return f"{out['replicas_now']} of {wanted} replicas now ({short} of {out['chunks']} chunks short)"


def _repair_note(out: dict[str, Any]) -> None:
    if out.get("chunks_short"):
        console.print(f"repair adds the missing copies when another device with space is online (checked every "
                      f"{out['repair_interval']:.0f} s)")


@files_app.command("get")
def get(name: str = typer.Argument(..., help="The file's name on the fabric."),
        output: Optional[Path] = typer.Option(None, "-o", help="Where to write it (default: ./NAME)."),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="Key file of an encrypted file."),
        agent_dir: Optional[Path] = AgentDirOpt, no_agent: bool = NoAgentOpt,
        server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Fetch a file from your devices (each chunk from an online replica, checked by its hash).

    When this machine runs an agent of yours, chunks come through it: from its own disk, or from the
    devices holding them over PeerLinks (direct when possible). Otherwise through the coordinator."""
    from neuranet.storage.sealing import Sealer, SealingError
    from neuranet.storage.transfer import TransferError, download, plaintext_size

    target = output or Path(Path(name).name)
    if target.is_dir():
        target = target / Path(name).name

    def opener(sealing: dict[str, Any]) -> Sealer:
        return Sealer.for_file(sealing, key_file=key_file) if sealing.get("kdf") is None \
            else Sealer.for_file(sealing, passphrase=_passphrase(False))

    with connect(server, token, timeout=120.0) as c, _bar() as bar:
        try:
            agent = None if no_agent else _local_agent(c, agent_dir)
            size = plaintext_size(c.file_info(name))
            task = bar.add_task(f"get {escape(name)}", total=size)
            info = download(c, name, target, opener, lambda n: bar.advance(task, n), agent=agent)
        except (ClientError, SealingError, TransferError, OSError) as exc:
            fail(exc)
    console.print(f"wrote {escape(str(target))} ({_size(size)}; {_ways(info['paths'])})")


def _ways(paths: dict[str, int]) -> str:
    """How chunks travelled, e.g. "chunks: 3 direct, 1 local"."""
    return "chunks: " + (", ".join(f"{n} {way}" for way, n in sorted(paths.items())) or "none")


def _local_agent(c: Any, agent_dir: Optional[Path]) -> Any:
    """This machine's agent, when it runs and is one of the user's devices; else None (an explicit
    ``--agent-dir`` that does not answer is an error)."""
    from neuranet.net.local_api import LocalAgent

    agent = LocalAgent.find(agent_dir or default_home() / "agent")
    if agent is None:
        if agent_dir is not None:
            raise OSError(f"no agent answers at {agent_dir} (is `neuranet agent --data-dir {agent_dir}` running?)")
        return None
    if agent.device not in {d["id"] for d in c.devices()}:
        if agent_dir is not None:
            raise OSError(f"the agent at {agent_dir} is not one of your devices")
        return None
    return agent


@files_app.command("ls")
def ls(server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Your files."""
    rows = ask(server, token, lambda c: c.files())
    table = Table("name", "size", "replicas", "encrypted")
    for r in rows:
        table.add_row(escape(r["name"]), _size(r["size"]), str(r["replicas"]), "yes" if r["encrypted"] else "")
    console.print(table)


@files_app.command("info")
def info(name: str, server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Which devices hold which chunks, and the predicted chance the file is retrievable over the next day."""
    from neuranet.storage.transfer import plaintext_size

    out = ask(server, token, lambda c: c.file_info(name))
    console.print(f"{escape(out['name'])}: {_size(plaintext_size(out))}, {out['chunks']} chunk(s), {_replicas(out)}"
                  f"{', encrypted' if out['encrypted'] else ''}; retrievable now: "
                  f"{'yes' if out['retrievable_now'] else 'NO'}; P(retrievable, next 24 h): "
                  f"{out['p_retrievable_24h']:.3f}")
    _repair_note(out)
    table = Table("#", "chunk", "size", "holders (online in green)")
    for i, ch in enumerate(out["chunk_list"]):
        holders = ", ".join(f"[green]{escape(h['name'])}[/]" if h["online"] else f"[dim]{escape(h['name'])}[/]" for h in ch["holders"])
        table.add_row(str(i), ch["id"][:12], _size(ch["size"]), holders or "[red]none[/]")
    console.print(table)


@files_app.command("rm")
def rm(name: str, server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Delete a file; its chunks are freed on every device (offline ones when they return)."""
    out = ask(server, token, lambda c: c.delete_file(name))
    console.print(f"deleted {escape(str(out['deleted']))} ({out['replicas_freed']} chunk replicas freed)")


@files_app.command("held")
def held(device: str = typer.Argument(..., help="A device name or id."),
         server: Optional[str] = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """What one of your devices holds for the fabric."""
    out = ask(server, token, lambda c: c.device_chunks(c.resolve_device(device)["id"]))
    quota = _size(out["quota_bytes"]) if out["quota_bytes"] is not None else "unknown (offline)"
    console.print(f"{escape(out['name'])}: {out['chunks']} chunk(s), {_size(out['bytes'])}; quota {quota}")
