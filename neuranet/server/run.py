"""Run the coordinator under uvicorn and publish where it listens (``server.json``)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Callable

import uvicorn

from neuranet.config import ServerConfig
from neuranet.server.app import FirstAdmin, StartupError, create_app, open_store
from neuranet.server.identity import CoordinatorIdentity, agent_pin
from neuranet.server.store import Store
from neuranet.tasks import OwnedTasks


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public address


def check_exposure(config: ServerConfig) -> None:
    """Refuse plain HTTP where other hosts can reach it: tokens, data and agent traffic would cross
    the network in the clear, and agents could not tell this coordinator from an impostor's TLS."""
    if config.tls_cert is None and not config.insecure and not is_loopback(config.host):
        raise StartupError(
            f"refusing to serve plain HTTP on {config.host}, which other hosts can reach: give a certificate "
            "(--tls-cert FILE --tls-key FILE), let the coordinator make its own (--self-signed; agents pin its "
            "fingerprint), or accept the risk on a trusted network with --insecure")


def _bind(config: ServerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto=IPPROTO_TCP matters: accepted sockets inherit it, and asyncio only sets TCP_NODELAY on
    # sockets whose proto is IPPROTO_TCP. With proto 0 every response written in two parts (HTTP
    # headers, then body) waited ~40 ms for the peer's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_url(config: ServerConfig, port: int) -> str:
    scheme = "https" if config.tls_cert else "http"
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class CoordinatorServer(uvicorn.Server):
    """uvicorn's server, ending the clients' event streams first when it stops: it waits for open
    responses before the app's shutdown, and an event stream does not end on its own."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        coordinator = getattr(getattr(self.config.app, "state", None), "coordinator", None)
        if coordinator is not None:
            coordinator.events.close()  # each stream sends what it holds and ends
        await super().shutdown(sockets)


def uvicorn_config(config: ServerConfig, on_first_admin: FirstAdmin | None = None,
                   store: Store | None = None, identity: CoordinatorIdentity | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(config, on_first_admin, store, identity),
        log_level=os.environ.get("NEURANET_LOG_LEVEL", "warning"),
        ws="websockets-sansio",
        ws_max_size=2 * config.limits.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=config.offline_after,  # the liveness rule: a probe unanswered this long (see Liveness)
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )


async def serve(config: ServerConfig, on_first_admin: FirstAdmin | None = None,
                on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled or signalled; writes ``server.json`` with the URL once listening."""
    check_exposure(config)
    try:
        identity = CoordinatorIdentity.load_or_create(config.data_dir)
        pin = agent_pin(config.tls_cert, identity)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot load the coordinator's identity: {exc}") from None
    store = await open_store(config)  # fail here, with a clear message, before listening
    try:
        sock = _bind(config)
    except OSError as exc:
        await store.close()
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    server = CoordinatorServer(uvicorn_config(config, on_first_admin, store, identity))
    url = server_url(config, port)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        # Everything alive now (imported modules, torch, the app) lives as long as the process. Freezing
        # it keeps the collector from re-walking those few hundred thousand objects in every full
        # collection: with 2,000 agents connected a full collection otherwise stalls the event loop
        # for ~0.4 s, which every agent sees as heartbeat latency.
        gc.collect()
        gc.freeze()
        if on_listening:
            on_listening(url)
        # Last, so whoever waits for server.json also finds what on_listening wrote (the saved login).
        _write_json(config.data_dir / "server.json", {"url": url, "pid": os.getpid(), "port": port,
                                                      "fingerprint": pin})

    announcer = OwnedTasks("server")
    announcer.spawn(announce(), name="announce")  # a failure (say, server.json not writable) is logged
    try:
        await server.serve(sockets=[sock])
    finally:
        await announcer.close()
        sock.close()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
