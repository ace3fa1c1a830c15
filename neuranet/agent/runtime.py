"""The agent's life: connect out, authenticate, report, heartbeat, relay links; reconnect forever."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import ssl
import statistics
import time
from collections.abc import Coroutine
from typing import Any, Awaitable, Callable, TypeVar

import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect

from neuranet import __version__
from neuranet.agent import coordinator_trust as trust
from neuranet.agent.identity import Identity
from neuranet.net.local_api import LocalApi
from neuranet.agent.profile import collect_profile
from neuranet.agent.reconnect import (  # noqa: F401  (EnrolmentError, backoff_delay: public here too)
    Clock,
    EnrolmentError,
    ReconnectBackoff,
    ServerRefused,
    SystemClock,
    backoff_delay,
    final_refusal,
)
from neuranet.agent.telemetry import TelemetrySampler
from neuranet.config import AgentConfig, MiB
from neuranet.net.addresses import local_addresses
from neuranet.net.direct import DirectListener
from neuranet.net.links import LinkManager
from neuranet.net.peerlink import RelayUnavailable
from neuranet.protocol import messages as m
from neuranet.protocol.auth import auth_payload, fingerprint
from neuranet.protocol.envelope import PROTOCOL_VERSION, Envelope, decode_frame, encode_frame
from neuranet.protocol.liveness import Liveness
from neuranet.protocol.errors import AuthenticationFailed, ProtocolError, error_from_code
from neuranet.tasks import OwnedTasks

log = logging.getLogger("neuranet.agent")
T = TypeVar("T")
# A live server answers a close at once; one that is gone never does, and the agent should be dialling
# again rather than waiting for it (the WebSocket default is 10 s).
CLOSE_TIMEOUT = 2.0
OUTBOX = 256  # reports kept while disconnected (`Agent.report`); past it the oldest are dropped

ControlHandler = Callable[["Agent", m.Message, bytes], Coroutine[Any, Any, None]]  # (agent, message, payload)


async def run_until_first_failure(*coros: Awaitable[Any]) -> None:
    """Run tasks together until one fails (or all end); cancel and await the rest, re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Agent:
    """One device's agent. ``async with Agent(cfg) as a`` runs it in the background."""

    def __init__(self, config: AgentConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()  # paces reconnects (tests pass one that does not wait)
        self.backoff = ReconnectBackoff(config.backoff_base, config.backoff_cap, config.backoff_reset_after)
        self.identity = Identity.load_or_create(config.data_dir)
        self.tls = self.identity.tls_credentials()
        self.links = LinkManager(config, self.tls, self._relay_send, self.send)
        self.listener = DirectListener(self.links.lookup, self.tls, config.frame_bytes * 2)
        self.local = LocalApi(lambda: self.device_id)  # programs on this machine (the CLI) use the agent
        self.connected = asyncio.Event()
        self.welcome: m.Welcome | None = None
        self.server_rtt_ms: float | None = None
        self.server_bandwidth_bps: float | None = None
        self.connections = 0  # successful handshakes so far
        self._next_id = 0  # message ids, so the server's error replies can name the message
        self._ws: ClientConnection | None = None
        self._liveness = Liveness(timeout=12.0, probe_after=3.0, heard_at=0.0)  # the server's; reset per connection
        self._echoes: collections.deque[asyncio.Future[float]] = collections.deque()
        self._outbox: collections.deque[m.Message] = collections.deque()  # see `report`
        self._static: dict[str, Any] | None = None
        self._handlers: dict[type[m.Message], ControlHandler] = {}
        self._on_connected: list[Callable[[], Awaitable[None]]] = []
        self._on_disconnected: list[Callable[[], None]] = []
        self._connection_changed = asyncio.Event()  # set (and replaced) when a connection comes up or goes
        # Handlers, sends, workers' side work; a send for a connection that is gone is no failure.
        self._tasks = OwnedTasks("agent", expected=(RelayUnavailable,))
        self._runner: asyncio.Task[None] | None = None
        self._sampler = TelemetrySampler()

    @property
    def device_id(self) -> str | None:
        return self.identity.device_id

    @property
    def name(self) -> str:
        """The name this device enrols with: its hostname unless one was given."""
        return self.config.name or (self._static or {}).get("hostname") or "device"

    def on(self, msg_type: type[m.Message], handler: ControlHandler) -> None:
        """Handle server instructions of one type (e.g. link tests)."""
        self._handlers[msg_type] = handler

    def on_connected(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook()`` after the profile is sent on every new connection (e.g. report stored chunks)."""
        self._on_connected.append(hook)

    def on_disconnected(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` as soon as a connection is lost, e.g. to fail the questions asked on it (their
        answers went with it) rather than let them wait out their timeouts."""
        self._on_disconnected.append(hook)

    async def wait_connection(self, after: int, timeout: float) -> None:
        """Wait until connection number ``after + 1`` or a later one is up (`connections` counts them);
        TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not (self.connected.is_set() and self.connections > after):
                await self._connection_changed.wait()

    def _connection_change(self) -> None:
        self._connection_changed.set()
        self._connection_changed = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> "Agent":
        self._runner = asyncio.create_task(self.run(), name="agent")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (a signal handler sets it), then stop for sure (see ``stop``);
        raises ServerRefused if the agent gave up first."""
        async with self:
            assert self._runner is not None
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({stopper, self._runner}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if self._runner.done() and not self._runner.cancelled():
                self._runner.result()

    async def wait_connected(self, timeout: float = 30.0) -> None:
        waiter = asyncio.ensure_future(self.connected.wait())
        pending = {waiter} | ({self._runner} if self._runner else set())
        done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._runner in done:
            self._runner.result()  # re-raise why the agent stopped
        if not self.connected.is_set():
            raise TimeoutError(f"agent did not connect to {self.config.server_url} within {timeout:.0f}s")

    async def stop(self) -> None:
        if self._runner is not None:
            # Cancelled again while it runs: Python 3.11's wait_for can swallow a cancellation that
            # arrives as its inner wait completes, and the agent would carry on.
            while not self._runner.done():
                self._runner.cancel()
                await asyncio.wait({self._runner}, timeout=1.0)
            await asyncio.gather(self._runner, return_exceptions=True)

    async def run(self) -> None:
        """Connect and serve until cancelled; raises ServerRefused (EnrolmentError when the server refused
        this device) when retrying cannot help."""
        await self.listener.start(self.config.listen_host, self.config.listen_port)
        if self.local.ops:
            await self.local.start(self.config.data_dir)
        try:
            self._static = await asyncio.to_thread(collect_profile, self.config.data_dir, self.config.measure)
            while True:
                try:
                    await self._connect_once()
                except (OSError, asyncio.TimeoutError, websockets.WebSocketException, ProtocolError) as exc:
                    refusal = final_refusal(exc, self.config.server_url)
                    if refusal is not None:
                        raise refusal from None
                    log.warning("connection to %s failed or was lost: %s", self.config.server_url, exc or type(exc).__name__)
                await self.clock.sleep(self.backoff.next_delay(self.clock.now()))
        finally:
            await self.links.close()
            await self.listener.close()
            await self.local.close()
            self._tasks.cancel()
            await self._tasks.join()

    # --- one connection -------------------------------------------------------------

    def _tls_pin(self) -> tuple[str | None, str]:
        """The certificate fingerprint to expect (None: ask a CA) and where it came from."""
        if not self.config.ws_url.startswith("wss://"):
            return None, ""
        if self.config.server_fingerprint:
            return self.config.server_fingerprint, "given with --server-fingerprint"
        if self.identity.tls_fingerprint and self.identity.server_url == self.config.server_url:
            return self.identity.tls_fingerprint, "pinned at enrolment"
        return None, ""

    async def _connect_once(self) -> None:
        url, ws_url = self.config.server_url, self.config.ws_url
        pin, source = self._tls_pin()
        ca = str(self.config.ca_cert) if self.config.ca_cert else None
        try:
            ws = await connect(ws_url, ssl=trust.tls_context(ws_url, ca, pin),
                               create_connection=trust.pinned_connection(url, pin, source) if pin else None,
                               max_size=8 * MiB + 64 * 1024, compression=None, open_timeout=10, ping_interval=20,
                               ping_timeout=20, max_queue=64, write_limit=2 * MiB, close_timeout=CLOSE_TIMEOUT)
        except ssl.SSLCertVerificationError as exc:
            raise await trust.untrusted_certificate(url, ws_url, exc) from None
        async with ws:
            await self._handshake(ws, pin)
            self._ws = ws
            self.links.me = self.device_id or ""
            self.connections += 1
            self.backoff.connected(self.clock.now())
            self.connected.set()
            self._connection_change()
            log.info("connected to %s as device %s", self.config.server_url, self.device_id)
            try:
                await run_until_first_failure(
                    self._read_loop(ws), self._heartbeat_loop(ws), self._telemetry_loop(), self._introduce()
                )
            finally:
                self._ws = None
                self.connected.clear()
                self.links.on_disconnected()
                for hook in self._on_disconnected:
                    hook()
                self._connection_change()
                # Echo replies lost with this connection will never come: without this, the next
                # connection's replies would be matched to these stale (cancelled) futures.
                for waiter in self._echoes:
                    waiter.cancel()
                self._echoes.clear()

    async def _recv(self, ws: ClientConnection, timeout: float = 15.0) -> m.Message:
        env = decode_frame(await asyncio.wait_for(ws.recv(), timeout))
        msg = m.parse(env)
        if isinstance(msg, m.Error):
            raise error_from_code(msg.code, msg.message)
        return msg

    async def _handshake(self, ws: ClientConnection, tls_pin: str | None) -> None:
        ident = self.identity
        moved = ident.server_url is not None and ident.server_url != self.config.server_url
        nonce = secrets.token_bytes(32)  # the coordinator signs it: proof it holds the key we pinned
        if ident.device_id and not (moved and self.config.join_token):
            hello = m.Hello(version=PROTOCOL_VERSION, device_id=ident.device_id, agent_version=__version__,
                            server_nonce=nonce)
        elif self.config.join_token:
            try:
                enrol = m.Enrolment(join_token=self.config.join_token, public_key=ident.public_key,
                                    name=self.name[:100])
            except ValidationError:
                raise EnrolmentError("that is not a join token (8 to 256 characters, from `neuranet join-token`)") from None
            hello = m.Hello(version=PROTOCOL_VERSION, agent_version=__version__, server_nonce=nonce, enrol=enrol)
        else:
            raise AuthenticationFailed("this agent is not enrolled yet: pass --join-token (from `neuranet join-token`)")
        await ws.send(encode_frame(hello.envelope()))
        key_fp = self.config.server_fingerprint if not self.config.ws_url.startswith("wss://") else None
        pinned = ident.server_key if hello.enrol is None and key_fp is None else None
        try:
            challenge = await self._recv(ws)
        except ProtocolError as exc:
            # A refusal before the challenge proves nothing over plain HTTP (over TLS the certificate
            # did): from anyone at the address it must not stop an enrolled device for good.
            if hello.enrol is None and (pinned or key_fp) and not self.config.ws_url.startswith("wss://"):
                raise ProtocolError(f"{self.config.server_url} refused this device ({exc.code}: {exc}) before proving "
                                    "it is the coordinator this device enrolled with; retrying") from None
            raise
        if not isinstance(challenge, m.Challenge):
            raise ProtocolError(f"expected challenge, got {challenge.TYPE}")
        # Nothing the coordinator sends is acted on before this check: an impostor stops here.
        server_key = trust.verify_coordinator(self.config.server_url, challenge, nonce, pinned, key_fp)
        await ws.send(encode_frame(m.Auth(signature=ident.sign(auth_payload(challenge.nonce, challenge.device_id))).envelope()))
        welcome = await self._recv(ws)
        if not isinstance(welcome, m.Welcome):
            raise ProtocolError(f"expected welcome, got {welcome.TYPE}")
        self._pin_coordinator(hello.enrol is not None, welcome.device_id, server_key, tls_pin)
        self.welcome = welcome
        # Both ends follow one liveness rule, with the server's offline_after as the timeout: the server
        # counts as gone only once a heartbeat has gone unanswered that long (the WebSocket's own pings
        # wait as long), so a server stalled for less drops nobody.
        self._liveness = Liveness(timeout=welcome.offline_after, probe_after=welcome.heartbeat_interval,
                                  heard_at=time.monotonic())
        ws.ping_timeout = welcome.offline_after

    def _pin_coordinator(self, enrolled_now: bool, device_id: str, server_key: bytes, tls_pin: str | None) -> None:
        """Record the coordinator this device now trusts: at enrolment, or when --server-fingerprint
        named a new one, or (once) for a record made before coordinators had an identity key."""
        ident = self.identity
        if enrolled_now:
            ident.save_enrolment(device_id, self.config.server_url, server_key, tls_pin)
        elif (ident.server_key, ident.tls_fingerprint) != (server_key, tls_pin):
            if ident.server_key is None:
                log.warning("pinned coordinator key %s (this device was enrolled before coordinators proved "
                            "their identity)", fingerprint(server_key))
            ident.save_enrolment(ident.device_id or device_id, ident.server_url or self.config.server_url,
                                 server_key, tls_pin)

    async def send(self, msg: m.Message, payload: bytes = b"") -> None:
        ws = self._ws
        if ws is None:
            raise RelayUnavailable("not connected to the server")
        self._next_id += 1
        try:
            await ws.send(encode_frame(msg.envelope(id=self._next_id, src=self.device_id or "", dst="server",
                                                    payload=payload)))
        except websockets.ConnectionClosed as exc:
            raise RelayUnavailable(f"connection to the server lost: {exc}") from None

    async def _relay_send(self, frame: bytes) -> None:
        ws = self._ws
        if ws is None:
            raise RelayUnavailable("not connected to the server")
        try:
            await ws.send(frame)
        except websockets.ConnectionClosed as exc:
            raise RelayUnavailable(str(exc)) from None

    async def _read_loop(self, ws: ClientConnection) -> None:
        async for data in ws:
            self._liveness.heard(time.monotonic())
            if isinstance(data, str):
                continue
            try:
                env = decode_frame(data)
                if env.src != "server":
                    self.links.on_relayed(env)
                else:
                    self._dispatch(env)
            except ProtocolError as exc:
                log.warning("bad frame from server: %s", exc)
        raise ConnectionError("server closed the connection")

    def _dispatch(self, env: Envelope) -> None:
        msg = m.parse(env)
        if isinstance(msg, m.Echo):
            if self._echoes:
                waiter = self._echoes.popleft()
                if not waiter.done():  # its _echo may have timed out and been cancelled
                    waiter.set_result(time.perf_counter())
        elif isinstance(msg, (m.LinkGrant, m.LinkRefusedMsg, m.PeerDown)):
            self.links.on_control(msg)
        elif isinstance(msg, m.Error):
            log.warning("server reported %s: %s", msg.code, msg.message)
        elif isinstance(msg, m.Heartbeat):  # the server's probe: it has not heard from us for a while
            self.spawn(self.send(m.HeartbeatAck(seq=msg.seq)), name="heartbeat-ack")
        elif type(msg) in self._handlers:
            self.spawn(self._handlers[type(msg)](self, msg, bytes(env.payload)), name=f"on-{msg.TYPE}")

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in a task this agent owns: cancelled and awaited when it stops, its failure logged
        with its traceback (a RelayUnavailable, a message for a connection that is gone, in one line)."""
        return self._tasks.spawn(coro, name=name)

    async def report(self, msg: m.Message) -> None:
        """Send a message the server must get even if the connection is down now (a stage's result): it
        is kept and sent first thing on the next connection."""
        try:
            await self.send(msg)
        except RelayUnavailable:
            if len(self._outbox) >= OUTBOX:
                log.warning("dropping an undelivered %s: %d reports already wait for the server",
                            self._outbox[0].TYPE, OUTBOX)
                self._outbox.popleft()
            self._outbox.append(msg)

    async def _send_outbox(self) -> None:
        while self._outbox:
            await self.send(self._outbox[0])  # sent, then dropped: a failure leaves it for the next connection
            self._outbox.popleft()

    async def _heartbeat_loop(self, ws: ClientConnection) -> None:
        """A heartbeat every interval, each one a probe (see `Liveness`); gives up on the server once one
        has gone unanswered for offline_after."""
        assert self.welcome is not None
        interval, live = self.welcome.heartbeat_interval, self._liveness
        seq = 0
        next_beat = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, min(next_beat, live.deadline) - time.monotonic()))
            now = time.monotonic()
            if live.gone(now):
                # No close handshake: a server that is gone would never answer it.
                ws.transport.abort()
                raise ConnectionError(f"the server left a heartbeat unanswered for {live.timeout:.0f}s")
            if now >= next_beat:
                seq += 1
                live.probed(now)
                next_beat = now + interval
                try:  # bounded: a send into a full buffer must not keep the deadline from being seen
                    await asyncio.wait_for(self.send(m.Heartbeat(seq=seq)), live.deadline - now)
                except asyncio.TimeoutError:
                    continue

    async def _telemetry_loop(self) -> None:
        while True:
            await self.send(m.Telemetry(samples=[self._sampler.sample()]))
            await asyncio.sleep(self.config.telemetry_interval)

    async def _introduce(self) -> None:
        """Tell the server what this device is, renew links, then measure the path to it."""
        await self.send(m.Profile(profile=self.profile(), tls_cert=self.tls.cert))
        await self._send_outbox()
        for hook in self._on_connected:
            await hook()
        await self.links.on_connected()
        if self.config.measure:
            await self._measure_server_path()
            await self.send(m.Profile(profile=self.profile(), tls_cert=self.tls.cert))

    def profile(self) -> dict[str, Any]:
        addrs = self.config.advertise if self.config.advertise is not None else local_addresses(self.listener.port, self.config.listen_host)
        return {
            **(self._static or {}),
            "listen_addrs": [list(a) for a in addrs],
            "server_rtt_ms": self.server_rtt_ms,
            "server_bandwidth_bps": self.server_bandwidth_bps,
        }

    async def _echo(self, payloads: list[bytes]) -> float:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in payloads]
        self._echoes.extend(futures)
        start = time.perf_counter()
        for p in payloads:
            await self.send(m.Echo(), payload=p)
        done = await asyncio.wait_for(asyncio.gather(*futures), 15.0)
        return max(done) - start

    async def _measure_server_path(self) -> None:
        rtts = [await self._echo([b"x"]) for _ in range(5)]
        self.server_rtt_ms = round(statistics.median(rtts) * 1000, 3)
        blob = random.randbytes(MiB)
        elapsed = await self._echo([blob] * 4)
        self.server_bandwidth_bps = round(4 * MiB * 8 / elapsed, 1)
