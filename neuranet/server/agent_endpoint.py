"""The ``/agent`` WebSocket: handshake (enrol or signed challenge), then the message loop."""

from __future__ import annotations

import asyncio
import logging
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.websockets import WebSocket, WebSocketDisconnect

from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload
from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame
from neuranet.protocol.errors import (
    AuthenticationFailed,
    MalformedFrame,
    ProtocolError,
    MAX_SHOWN_CHARS,
    QueueLimitExceeded,
    VersionMismatch,
    shown,
)
from neuranet.server.hub import AgentConnection, Hub
from neuranet.server.identity import CoordinatorIdentity
from neuranet.server.store import StoreError

log = logging.getLogger("neuranet.agent_endpoint")
HANDSHAKE_TIMEOUT = 15.0


class _Handshake:
    """Frames exchanged before the agent is trusted; errors here close the socket."""

    def __init__(self, ws: WebSocket, hub: Hub, identity: CoordinatorIdentity) -> None:
        self.ws = ws
        self.hub = hub
        self.identity = identity
        self.public_key = b""  # the device's enrolled key, once it proved it holds it
        self.limit = hub.config.limits.max_message_bytes

    async def recv(self) -> Envelope:
        msg = await asyncio.wait_for(self.ws.receive(), HANDSHAKE_TIMEOUT)
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get("bytes")
        if data is None:
            raise MalformedFrame("text frames are not part of the protocol; send binary frames")
        return decode_frame(data, self.limit)

    async def send(self, msg: m.Message) -> None:
        await self.ws.send_bytes(encode_frame(msg.envelope(src="server")))

    async def _claim(self, hello: m.Hello) -> tuple[Ed25519PublicKey, str, str]:
        """Who the agent says it is: ``(key, device_id, user_id)``, checked against the records (nothing
        written): a known device, or an enrolment the join token would allow."""
        store = self.hub.store
        if hello.enrol is not None:
            try:  # refuse what cannot be a key before any lookup
                key = Ed25519PublicKey.from_public_bytes(hello.enrol.public_key)
            except ValueError:
                raise AuthenticationFailed("enrolment public_key is not an Ed25519 public key") from None
            offer = await store.identity.check_enrolment(hello.enrol.join_token, hello.enrol.public_key, hello.enrol.name)
            return key, offer.device_id, offer.user_id
        if hello.device_id:
            device = await store.identity.device_for_login(hello.device_id)
            return Ed25519PublicKey.from_public_bytes(device.public_key), device.id, device.user_id
        raise AuthenticationFailed("hello needs a device_id or an enrolment")

    async def _prove(self, key: Ed25519PublicKey, device_id: str, agent_nonce: bytes | None) -> None:
        """Challenge the agent to sign a fresh nonce for ``device_id`` with ``key``."""
        nonce = secrets.token_bytes(32)
        await self.send(self.challenge(nonce, device_id, agent_nonce))
        auth = m.parse(await self.recv())
        if not isinstance(auth, m.Auth):
            raise AuthenticationFailed("expected auth after challenge")
        try:
            key.verify(auth.signature, auth_payload(nonce, device_id))
        except InvalidSignature:
            raise AuthenticationFailed("bad signature: this agent does not hold the device's key") from None

    async def _prove_refuser(self, hello: m.Hello) -> None:
        """Before refusing a device (unknown, removed, its owner disabled), prove this coordinator is
        the one refusing: over plain HTTP anyone at its address could send a refusal, so an enrolled
        agent believes one (and stops) only after the challenge it checks against its pin."""
        if hello.enrol is None and hello.device_id and hello.server_nonce:
            await self.send(self.challenge(secrets.token_bytes(32), hello.device_id, hello.server_nonce))
            await self.recv()  # its auth, which changes nothing; then the refusal

    async def run(self) -> tuple[str, str]:
        """Return ``(device_id, user_id)`` of an authenticated agent."""
        hello = m.parse(await self.recv())
        if not isinstance(hello, m.Hello):
            raise AuthenticationFailed("the first message must be hello")
        if hello.version != PROTOCOL_VERSION:
            raise VersionMismatch(f"agent speaks protocol {hello.version}, server speaks {PROTOCOL_VERSION}")
        store = self.hub.store
        try:
            try:
                key, device_id, user_id = await self._claim(hello)
            except StoreError:
                await self._prove_refuser(hello)
                raise
            await self._prove(key, device_id, hello.server_nonce)
            limits = self.hub.config.limits
            if self.hub.connections_of(user_id) >= limits.max_connections_per_user and device_id not in self.hub.conns:
                raise QueueLimitExceeded(f"user already has {limits.max_connections_per_user} devices connected")
            if hello.enrol is None:
                device = await store.identity.device_for_login(device_id)
            else:
                # Only now, with the key proven: spend the join token and create the device, in one
                # transaction (a hello that never answers the challenge leaves nothing behind).
                e = hello.enrol
                device = await store.identity.enrol_device(e.join_token, e.public_key, e.name, device_id)
        except StoreError as exc:
            raise AuthenticationFailed(str(exc)) from None
        self.public_key = device.public_key
        await self.send(m.Welcome(
            device_id=device.id, user_id=device.user_id,
            heartbeat_interval=self.hub.config.heartbeat_interval, offline_after=self.hub.config.offline_after,
            max_message_bytes=limits.max_message_bytes, max_queued_bytes=limits.max_queued_bytes_per_peer,
        ))
        return device.id, device.user_id

    def challenge(self, nonce: bytes, device_id: str, agent_nonce: bytes | None) -> m.Challenge:
        """The challenge, with this coordinator's proof of identity over the agent's nonce."""
        proof = self.identity.prove(agent_nonce, nonce, device_id) if agent_nonce else None
        return m.Challenge(nonce=nonce, device_id=device_id, server_key=self.identity.public_key,
                           server_signature=proof)


async def serve_agent(ws: WebSocket, hub: Hub, identity: CoordinatorIdentity) -> None:
    """Serve one agent connection until it closes; never raises."""
    await ws.accept()
    handshake = _Handshake(ws, hub, identity)
    try:
        device_id, user_id = await handshake.run()
    except (ProtocolError, asyncio.TimeoutError) as exc:
        err = exc if isinstance(exc, ProtocolError) else AuthenticationFailed("handshake timed out")
        log.info("agent handshake refused: %s", shown(str(err)))
        try:
            await handshake.send(m.Error(code=err.code, message=str(err)))
            await ws.close(4003 if isinstance(err, AuthenticationFailed) else 4002, str(err)[:120])
        except Exception:
            pass
        return
    except WebSocketDisconnect:
        return
    limits = hub.config.limits
    conn = AgentConnection(device_id, user_id, ws.send_bytes, ws.close, limits.max_queued_bytes_per_peer,
                           limits.relay_stall_timeout, limits.max_queued_bytes_per_connection)
    conn.remote_ip = ws.client.host if ws.client else ""
    conn.public_key = handshake.public_key
    writer = asyncio.create_task(conn.writer(), name=f"writer-{device_id}")
    try:
        # Inside the try: if opening the presence fails, the finally still unregisters the connection.
        await hub.register(conn)
        if await hub.login_revoked(conn):  # removed or disabled while it was shaking hands
            return
        await _message_loop(ws, hub, conn)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("agent %s connection failed", device_id)
    finally:
        await conn.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await hub.unregister(conn)


async def _message_loop(ws: WebSocket, hub: Hub, conn: AgentConnection) -> None:
    limit = hub.config.limits.max_message_bytes
    while not conn.closed:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        hub.seen(conn)
        data = msg.get("bytes")
        env = None
        try:
            if data is None:
                raise MalformedFrame("text frames are not part of the protocol; send binary frames")
            env = decode_frame(data, limit)
            if env.src != conn.device_id:
                raise AuthenticationFailed(f"frame claims source {shown(env.src)} but this connection is {conn.device_id}")
            if env.dst and env.dst != "server":
                await hub.relay(conn, env, data)
            else:
                await hub.dispatch(conn, env)
        except ProtocolError as exc:
            conn.send_error(exc, ref=env.id if env is not None else None)
            if exc.fatal:
                log.info("closing agent %s: %s", conn.device_id, str(exc)[:MAX_SHOWN_CHARS * 4])
                await conn.drained(timeout=1.0)  # let the error frame go out first
                await conn.close(4002, f"{exc.code}: {exc}")
                return
