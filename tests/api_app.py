"""A real coordinator app in-process (real SQLite store, real hub) for REST and agent-socket tests.

Starlette's TestClient runs the app's lifespan and speaks HTTP and WebSocket to it without a
network, so a test gets the whole coordinator in well under a second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient, WebSocketTestSession

from neuranet.config import Limits, ServerConfig
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, decode_frame, encode_frame
from neuranet.server.app import create_app
from neuranet.server.run import CoordinatorServer


@contextlib.contextmanager
def api_app(data_dir: Path, limits: Limits | None = None) -> Iterator[TestClient]:
    """The app, started, with a client that authenticates as its first admin. Server errors come back
    as 500 answers (not raised), so a test sees what a user would."""
    tokens: list[str] = []
    config = ServerConfig(data_dir=data_dir, limits=limits or Limits(), forecast_retrain_interval=1e9,
                          file_repair_interval=1e9, offline_after=600.0)  # a raw agent sends no heartbeats
    app = create_app(config, on_first_admin=lambda _name, token: tokens.append(token))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {tokens[0]}"
        yield client


def recv(ws: WebSocketTestSession) -> m.Message:
    return m.parse(decode_frame(ws.receive_bytes()))


def send(ws: WebSocketTestSession, msg: m.Message, payload: bytes = b"", src: str = "") -> None:
    """Send ``msg``; after the handshake ``src`` must be the agent's device id."""
    ws.send_bytes(encode_frame(msg.envelope(payload=payload, src=src)))


@contextlib.contextmanager
def raw_agent(client: TestClient, name: str = "raw") -> Iterator[tuple[WebSocketTestSession, str]]:
    """A hand-driven agent that enrols a fresh key through the real handshake: (socket, device id)."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    join_token = client.post("/api/v1/join-tokens").json()["join_token"]
    with client.websocket_connect("/agent") as ws:
        send(ws, m.Hello(version=PROTOCOL_VERSION, enrol=m.Enrolment(join_token=join_token, public_key=pub, name=name)))
        challenge = recv(ws)
        assert isinstance(challenge, m.Challenge), challenge
        send(ws, m.Auth(signature=key.sign(auth_payload(challenge.nonce, challenge.device_id))))
        welcome = recv(ws)
        assert isinstance(welcome, m.Welcome), welcome
        yield ws, welcome.device_id


@contextlib.contextmanager
def served_app(data_dir: Path, limits: Limits | None = None, send_buffer: int | None = None) -> Iterator[tuple[str, str]]:
    """The app behind a real uvicorn on a loopback port, in a thread: (base URL, first admin's token).
    ``send_buffer``: each connection's kernel send buffer in bytes (default: the kernel's, which grows to MiBs),
    so a client that does not read fills it soon."""
    import socket
    import threading

    import uvicorn

    tokens: list[str] = []
    config = ServerConfig(data_dir=data_dir, limits=limits or Limits(), forecast_retrain_interval=1e9,
                          file_repair_interval=1e9)
    app = create_app(config, on_first_admin=lambda _name, token: tokens.append(token))
    # as the coordinator's own server (run.py): event streams end first, anything else open is cut after 3 s
    server = CoordinatorServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=3))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted connections inherit it
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        started = threading.Event()
        for _ in range(600):  # up to 60 s for a busy machine to start it
            if server.started or not thread.is_alive():
                break
            started.wait(0.1)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", tokens[0]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
