"""Direct links: mutual TLS 1.3 pinned to the granted devices, and only addresses a peer can use."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from fabric_helpers import async_wait_for, free_port
from neuranet.agent.identity import Identity
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig, ServerConfig
from neuranet.fabric import LocalFabric
from neuranet.net.addresses import local_addresses, same_host, usable_by_peer
from neuranet.net.direct import (
    HANDSHAKE_MAX_FRAME, MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_ADDRESS, DirectGrant, DirectListener, DirectPath, dial,
    link_proof,
)
from neuranet.net.framing import FrameProtocol
from neuranet.net.tls import DeviceCredentials, PeerPin, certificate_key, device_certificate, raw_public_key
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import Envelope, decode_frame, encode_frame
from neuranet.protocol.errors import AuthenticationFailed, InvalidMessage
from neuranet.server.hub import AgentConnection, Hub
from neuranet.server.store import Store

LEN = struct.Struct(">I")
MARKER = b"plaintext that must never be seen on the wire " * 64
SECRET = bytes(range(32))


def credentials(root: Path, name: str) -> tuple[Ed25519PrivateKey, DeviceCredentials]:
    ident = Identity.load_or_create(root / name)
    return ident.key, ident.tls_credentials()


def pin_of(key: Ed25519PrivateKey, creds: DeviceCredentials) -> PeerPin:
    return PeerPin(raw_public_key(key.public_key()), creds.cert)


# --- certificates ----------------------------------------------------------------------------


def test_device_certificate_is_deterministic_and_carries_the_key(tmp_path: Path) -> None:
    key, creds = credentials(tmp_path, "a")
    assert device_certificate(key) == device_certificate(key) == creds.cert
    assert certificate_key(creds.cert) == raw_public_key(key.public_key())
    assert device_certificate(Ed25519PrivateKey.generate()) != creds.cert
    # Rebuilt from the key on every start: the file is rewritten if it was damaged.
    creds.cert_file.write_text("junk")
    again = Identity.load_or_create(tmp_path / "a").tls_credentials()
    assert again.cert == creds.cert and creds.cert_file.read_bytes() == ssl.DER_cert_to_PEM_cert(creds.cert).encode()


def test_certificate_key_refuses_garbage_and_keys_other_than_ed25519() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    with pytest.raises(AuthenticationFailed, match="not a valid X.509"):
        certificate_key(b"\x30\x03junk")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ec_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ec_key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .sign(ec_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    with pytest.raises(AuthenticationFailed, match="Ed25519"):
        certificate_key(ec_cert)


def test_a_pin_is_usable_only_when_its_certificate_carries_its_key(tmp_path: Path) -> None:
    key, creds = credentials(tmp_path, "a")
    other, other_creds = credentials(tmp_path, "b")
    assert pin_of(key, creds).usable
    assert not PeerPin(raw_public_key(key.public_key()), other_creds.cert).usable
    assert not PeerPin(raw_public_key(key.public_key()), b"").usable
    assert not PeerPin(b"", creds.cert).usable
    assert not PeerPin(raw_public_key(key.public_key()), b"garbage").usable


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(("addrs", "near", "expected"), [
    ([("192.168.1.5", 7000), ("127.0.0.1", 7000)], False, [("192.168.1.5", 7000)]),
    ([("192.168.1.5", 7000), ("127.0.0.1", 7000)], True, [("192.168.1.5", 7000), ("127.0.0.1", 7000)]),
    ([("127.0.0.2", 1), ("::1", 2), ("::ffff:127.0.0.1", 3), ("localhost", 4)], False, []),
    ([("::ffff:127.0.0.1", 3)], True, [("127.0.0.1", 3)]),
    ([("169.254.3.4", 1), ("fe80::1", 2), ("fe80::1%eth0", 3), ("0.0.0.0", 4), ("::", 5)], True, []),
    ([("224.0.0.1", 1), ("255.255.255.255", 2), ("240.0.0.1", 3), ("ff02::1", 4)], True, []),
    ([("peer.example.com", 1), ("10.0.0.2", 0), ("10.0.0.2", 65536), ("not an address", 5)], True, []),
    ([("10.0.0.2", 7000), ("10.0.0.2", 7000), ("2001:db8::5", 7001), ("100.64.0.9", 7002)], False,
     [("10.0.0.2", 7000), ("2001:db8::5", 7001), ("100.64.0.9", 7002)]),
])
def test_only_addresses_a_peer_can_use_are_handed_out(addrs: list[tuple[str, int]], near: bool,
                                                      expected: list[tuple[str, int]]) -> None:
    assert usable_by_peer(addrs, near) == expected


@given(st.lists(st.tuples(st.ip_addresses().map(str), st.integers(-1, 70000)), max_size=20))
def test_a_peer_elsewhere_is_never_given_a_loopback_or_link_local_address(addrs: list[tuple[str, int]]) -> None:
    import ipaddress

    for host, port in usable_by_peer(addrs, same_host=False):
        ip = ipaddress.ip_address(host)
        assert not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) and 0 < port < 65536


def test_same_host_needs_the_same_address_and_the_same_machine() -> None:
    assert same_host("127.0.0.1", "m1", "127.0.0.1", "m1")
    assert same_host("::ffff:10.0.0.2", "m1", "10.0.0.2", "m1")
    assert same_host("::1", "m1", "127.0.0.1", "m1")  # both on the server's host, one over IPv6
    assert not same_host("::1", "m1", "127.0.0.1", "m2")
    assert not same_host("10.0.0.2", "m1", "10.0.0.3", "m1")  # network namespaces on one machine
    assert not same_host("203.0.113.7", "m1", "203.0.113.7", "m2")  # two machines behind one NAT
    assert not same_host("127.0.0.1", "", "127.0.0.1", "")  # no machine id: never assume
    assert not same_host("", "m1", "", "m1")


def test_an_agent_advertises_no_link_local_address_and_loopback_last() -> None:
    addrs = local_addresses(7000, "0.0.0.0")
    assert addrs[-1] == ("127.0.0.1", 7000)
    assert usable_by_peer(addrs[:-1], same_host=False) == addrs[:-1]
    assert local_addresses(7000, "10.1.2.3") == [("10.1.2.3", 7000)]


# --- the handshake over loopback sockets --------------------------------------------------------


class Recorder:
    """A TCP forwarder that keeps every byte it forwards, both ways (what an eavesdropper sees)."""

    def __init__(self) -> None:
        self.target = 0
        self.seen = bytearray()
        self._server: asyncio.AbstractServer | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> "Recorder":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._pumps:
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._pumps.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                self.seen += data
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


class Accepted:
    """A listener's attach callback: collects the paths it was handed."""

    def __init__(self) -> None:
        self.paths: asyncio.Queue[DirectPath] = asyncio.Queue()

    async def __call__(self, path: DirectPath) -> None:
        await self.paths.put(path)


@pytest.fixture
async def devices(tmp_path: Path) -> AsyncIterator[dict[str, tuple[Ed25519PrivateKey, DeviceCredentials]]]:
    yield {name: credentials(tmp_path, name) for name in ("a", "b", "mallory")}


async def listening(own: DeviceCredentials, grants: dict[str, DirectGrant], timeout: float = 3.0) -> DirectListener:
    async def lookup(link_id: str) -> DirectGrant | None:
        return grants.get(link_id)

    listener = DirectListener(lookup, own, 1 << 20, handshake_timeout=timeout)
    await listener.start("127.0.0.1", 0)
    return listener


async def test_granted_devices_connect_over_tls_13_and_nothing_crosses_in_the_clear(devices) -> None:
    (ka, ca), (kb, cb) = devices["a"], devices["b"]
    accepted = Accepted()
    listener = await listening(cb, {"l-1": DirectGrant("dev-a", SECRET, pin_of(ka, ca), accepted)})
    async with Recorder() as wire:
        wire.target = listener.port
        path = await dial([("127.0.0.1", wire.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), ca, 1 << 20)
        assert path is not None
        other = await asyncio.wait_for(accepted.paths.get(), 10)
        await path.write(MARKER)
        assert bytes(await asyncio.wait_for(other.protocol.read_frame(), 10)) == MARKER
        await other.write(MARKER[::-1])
        assert bytes(await asyncio.wait_for(path.protocol.read_frame(), 10)) == MARKER[::-1]
        for p in (path, other):
            assert p.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert len(wire.seen) > 2 * len(MARKER)
        assert MARKER[:64] not in wire.seen and MARKER[::-1][:64] not in wire.seen
        assert b"direct_hello" not in wire.seen and SECRET not in wire.seen
        path.close()
        other.close()
    await listener.close()


async def test_a_dialer_refuses_a_listener_that_lacks_the_granted_key(devices) -> None:
    # Mallory answers at b's address, knows the link id and even its secret, but not b's key.
    (ka, ca), (kb, cb), (_, cm) = devices["a"], devices["b"], devices["mallory"]
    accepted = Accepted()
    impostor = await listening(cm, {"l-1": DirectGrant("dev-a", SECRET, pin_of(ka, ca), accepted)})
    path = await dial([("127.0.0.1", impostor.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), ca, 1 << 20)
    assert path is None
    assert accepted.paths.empty()
    await impostor.close()


async def test_a_listener_refuses_a_dialer_that_lacks_the_granted_key(devices) -> None:
    (ka, ca), (kb, cb), (_, cm) = devices["a"], devices["b"], devices["mallory"]
    accepted = Accepted()
    listener = await listening(cb, {"l-1": DirectGrant("dev-a", SECRET, pin_of(ka, ca), accepted)})
    # Mallory claims to be a, with the stolen link id and secret, and presents her own certificate.
    path = await dial([("127.0.0.1", listener.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), cm, 1 << 20)
    assert path is None
    assert accepted.paths.empty()
    # The real a still gets through.
    assert await dial([("127.0.0.1", listener.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), ca, 1 << 20) is not None
    await asyncio.wait_for(accepted.paths.get(), 10)
    await listener.close()


async def test_without_a_granted_certificate_there_is_no_direct_path(devices) -> None:
    (ka, ca), (kb, cb) = devices["a"], devices["b"]
    accepted = Accepted()
    listener = await listening(cb, {"l-1": DirectGrant("dev-a", SECRET, PeerPin(raw_public_key(ka.public_key()), b""), accepted)})
    assert await dial([("127.0.0.1", listener.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), ca, 1 << 20) is None
    assert await dial([("127.0.0.1", listener.port)], "l-1", "dev-a", SECRET, PeerPin(b"", b""), ca, 1 << 20) is None
    assert accepted.paths.empty()
    await listener.close()


async def test_bytes_sent_ahead_of_the_tls_switch_refuse_the_connection(devices) -> None:
    (ka, ca), (_, cb) = devices["a"], devices["b"]
    accepted = Accepted()
    listener = await listening(cb, {"l-1": DirectGrant("dev-a", SECRET, pin_of(ka, ca), accepted)})
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    start = encode_frame(m.DirectStartTls(link="l-1").envelope(src="dev-a"))
    writer.write(LEN.pack(len(start)) + start + b"\x16\x03\x01 not yet")  # data before the go-ahead
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a go-ahead
    writer.close()
    assert accepted.paths.empty()
    await listener.close()


async def test_before_authentication_a_large_frame_is_refused_unread(devices) -> None:
    # A link-sized length from a stranger would otherwise have the listener allocate that much and
    # wait out the handshake timeout (long here) for the body.
    listener = await listening(devices["b"][1], {}, timeout=60.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(LEN.pack(HANDSHAKE_MAX_FRAME + 1))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await listener.close()


def _source(i: int) -> str:
    """A loopback source address of its own for each group of connections (Linux routes 127/8 to lo)."""
    return f"127.0.0.{2 + i // MAX_PENDING_PER_ADDRESS}"


async def test_connections_that_never_authenticate_are_capped(devices) -> None:
    listener = await listening(devices["b"][1], {}, timeout=60.0)
    idle = [await asyncio.open_connection("127.0.0.1", listener.port, local_addr=(_source(i), 0))
            for i in range(MAX_PENDING_HANDSHAKES)]
    await async_wait_for(lambda: listener.pending == MAX_PENDING_HANDSHAKES, what="every connection accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # one too many: closed at once
    with pytest.raises(asyncio.TimeoutError):  # the earlier ones still wait for their handshake
        await asyncio.wait_for(idle[0][0].read(), 0.2)
    for _, w in [*idle, (reader, writer)]:
        w.close()
    await listener.close()


async def test_one_address_cannot_hold_every_handshake_slot(devices) -> None:
    (ka, ca), (kb, cb) = devices["a"], devices["b"]
    accepted = Accepted()
    listener = await listening(cb, {"l-1": DirectGrant("dev-a", SECRET, pin_of(ka, ca), accepted)}, timeout=60.0)
    # A stranger opens as many connections as it can from one address and never says a word.
    idle = []
    for _ in range(MAX_PENDING_HANDSHAKES):
        idle.append(await asyncio.open_connection("127.0.0.1", listener.port, local_addr=("127.0.0.99", 0)))
    await async_wait_for(lambda: listener.pending >= MAX_PENDING_PER_ADDRESS, what="the stranger's connections")
    assert listener.pending == MAX_PENDING_PER_ADDRESS  # the rest were closed at once
    # The granted peer, from its own address, still gets its direct path.
    path = await dial([("127.0.0.1", listener.port)], "l-1", "dev-a", SECRET, pin_of(kb, cb), ca, 1 << 20)
    assert path is not None
    other = await asyncio.wait_for(accepted.paths.get(), 10)
    for p in (path, other):
        p.close()
    for _, w in idle:
        w.close()
    await listener.close()


# --- agents and a real coordinator ---------------------------------------------------------------


@pytest.fixture()
def fabric(tmp_path: Path):
    with LocalFabric(tmp_path, server_args=["--offline-after", "5", "--heartbeat", "1"]) as f:
        f.start_server(port=free_port())
        yield f


async def introduced(fabric: LocalFabric, *agents: Agent) -> None:
    """Until the coordinator holds each agent's profile (its addresses and certificate): a link
    granted before that would rightly be relayed only."""
    def known() -> bool:
        with fabric.client() as c:
            devs = {d["id"]: d for d in c.devices()}
        return all("listen_addrs" in (devs.get(a.device_id, {}).get("profile") or {}) for a in agents)

    deadline = asyncio.get_running_loop().time() + 30
    while not await asyncio.to_thread(known):
        assert asyncio.get_running_loop().time() < deadline, "agents did not report their profiles"
        await asyncio.sleep(0.05)


def agent_config(fabric: LocalFabric, name: str, **kw) -> AgentConfig:
    with fabric.client() as c:
        jt = c.create_join_token()["join_token"]
    defaults = dict(listen_host="127.0.0.1", measure=False, direct_retry_interval=0.3, backoff_cap=1.0,
                    link_window_bytes=4 << 20, frame_bytes=256 << 10)
    return AgentConfig(server_url=fabric.url, data_dir=fabric.root / name, name=name, join_token=jt, **{**defaults, **kw})


async def read_frame(reader: asyncio.StreamReader) -> Envelope:
    (size,) = LEN.unpack(await reader.readexactly(LEN.size))
    return decode_frame(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, env: Envelope) -> None:
    frame = encode_frame(env)
    writer.write(LEN.pack(len(frame)) + frame)


def impostor_context(creds: DeviceCredentials, server_side: bool) -> ssl.SSLContext:
    """Mallory's TLS: her own certificate, and she trusts whatever the other end shows."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(creds.cert_file, creds.key_file)
    return ctx


class ImpostorListener:
    """Answers at a device's advertised address as whatever the dialer expects: the plaintext
    handshake (direct_hello -> direct_ok) or the TLS one, with her own certificate. Records the
    message types that reach her once she has said ok."""

    def __init__(self, creds: DeviceCredentials) -> None:
        self.creds = creds
        self.attempts = 0
        self.received: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await read_frame(reader)
            link = str(first.body.get("link"))
            if first.type == "direct_start_tls":
                write_frame(writer, m.DirectStartTls(link=link).envelope())
                await writer.drain()
                await writer.start_tls(impostor_context(self.creds, server_side=True), ssl_handshake_timeout=10)
                first = await read_frame(reader)
            if first.type == "direct_hello":
                write_frame(writer, m.DirectOk(link=link).envelope())
                await writer.drain()
                while True:
                    self.received.append((await read_frame(reader)).type)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            self.attempts += 1
            writer.close()


async def impostor_dial(port: int, link_id: str, claimed: str, secret: bytes, creds: DeviceCredentials) -> str:
    """Mallory dials a device's listener claiming to be its link peer, with the stolen link id and
    secret: first with the plaintext handshake, then with TLS and her own certificate."""
    hello = m.DirectHello(link=link_id, proof=link_proof(secret, link_id, claimed)).envelope(src=claimed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        write_frame(writer, hello)
        if (await asyncio.wait_for(read_frame(reader), 10)).type == "direct_ok":
            return "accepted in plaintext"
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        write_frame(writer, m.DirectStartTls(link=link_id).envelope(src=claimed))
        if (await asyncio.wait_for(read_frame(reader), 10)).type != "direct_start_tls":
            return "refused"
        await writer.start_tls(impostor_context(creds, server_side=False), ssl_handshake_timeout=10)
        write_frame(writer, hello)
        if (await asyncio.wait_for(read_frame(reader), 10)).type == "direct_ok":
            return "accepted over tls"
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
    return "refused"


@pytest.mark.slow
async def test_an_impostor_at_the_advertised_address_gets_nothing_and_the_link_relays(fabric: LocalFabric,
                                                                                   tmp_path: Path) -> None:
    _, mallory = credentials(tmp_path, "mallory")
    impostor = ImpostorListener(mallory)
    await impostor.start()
    b_cfg = agent_config(fabric, "b", advertise=(("127.0.0.1", impostor.port),))
    async with Agent(agent_config(fabric, "a")) as a, Agent(b_cfg) as b:
        await a.wait_connected()
        await b.wait_connected()
        await introduced(fabric, a, b)
        link = await a.links.open(b.device_id)
        peer = await asyncio.wait_for(b.links.accept(), 10)
        await async_wait_for(lambda: impostor.attempts >= 1, what="a to dial the advertised address")
        await link.send(MARKER, {"i": 1})
        msg = await asyncio.wait_for(peer.recv(), 10)
        assert bytes(msg.payload) == MARKER
        assert "direct" not in link.paths_used and link.path == "relay"
        assert impostor.received == []
    impostor.close()


@pytest.mark.slow
async def test_an_impostor_dialer_with_the_stolen_link_secret_is_refused(fabric: LocalFabric, tmp_path: Path) -> None:
    _, mallory = credentials(tmp_path, "mallory")
    async with Agent(agent_config(fabric, "a")) as a, Agent(agent_config(fabric, "b")) as b:
        await a.wait_connected()
        await b.wait_connected()
        await introduced(fabric, a, b)
        link = await a.links.open(b.device_id)
        peer = await asyncio.wait_for(b.links.accept(), 10)
        assert link.path == "direct"
        real = peer.direct
        verdict = await impostor_dial(b.listener.port, link.link_id, a.device_id, link.secret, mallory)
        assert verdict == "refused"
        assert peer.direct is real  # b still talks to the real a
        await peer.send(b"to the real a", {"i": 2})
        assert bytes((await asyncio.wait_for(link.recv(), 10)).payload) == b"to the real a"


@pytest.mark.slow
async def test_a_direct_link_between_agents_is_encrypted_on_the_wire(fabric: LocalFabric) -> None:
    async with Recorder() as wire:
        b_cfg = agent_config(fabric, "b", advertise=(("127.0.0.1", wire.port),))
        async with Agent(agent_config(fabric, "a")) as a, Agent(b_cfg) as b:
            await a.wait_connected()
            await b.wait_connected()
            await introduced(fabric, a, b)
            wire.target = b.listener.port
            link = await a.links.open(b.device_id)
            peer = await asyncio.wait_for(b.links.accept(), 10)
            assert link.path == "direct"
            await link.send(MARKER, {"i": 1})
            assert bytes((await asyncio.wait_for(peer.recv(), 10)).payload) == MARKER
            assert link.paths_used == {"direct"}
            assert len(wire.seen) > len(MARKER)
            assert MARKER[:64] not in wire.seen and link.secret not in wire.seen


# --- what the coordinator grants ------------------------------------------------------------------


class Sink:
    """The agent's end of an AgentConnection: the frames the hub wrote to it."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send_bytes(self, frame: bytes) -> None:
        self.frames.append(frame)

    async def close(self, code: int, reason: str) -> None:
        pass

    def grants(self) -> list[m.LinkGrant]:
        msgs = [m.parse(decode_frame(f)) for f in self.frames]
        return [g for g in msgs if isinstance(g, m.LinkGrant)]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    await store.migrate()
    hub = Hub(ServerConfig(data_dir=tmp_path), store)
    try:
        yield hub
    finally:
        for conn in list(hub.conns.values()):
            await conn.close()  # ends its writer
        await store.close()


async def online(hub: Hub, user_id: str, tmp_path: Path, name: str, remote_ip: str, machine: str,
                 port: int) -> tuple[AgentConnection, Sink, DeviceCredentials]:
    key, creds = credentials(tmp_path, name)
    token, _ = await hub.store.identity.create_join_token(user_id)
    device = await hub.store.identity.enrol_device(token, raw_public_key(key.public_key()), name)
    sink = Sink()
    conn = AgentConnection(device.id, user_id, sink.send_bytes, sink.close, 1 << 20)
    conn.remote_ip, conn.public_key = remote_ip, device.public_key
    conn.profile = {"machine_id": machine, "listen_addrs": [["192.168.1.9", port], ["169.254.0.7", port],
                                                           ["127.0.0.1", port]]}
    await hub.register(conn)
    asyncio.ensure_future(conn.writer())
    hub.set_direct_cert(conn, creds.cert)
    return conn, sink, creds


async def grants_between(hub: Hub, a: tuple[AgentConnection, Sink, DeviceCredentials],
                         b: tuple[AgentConnection, Sink, DeviceCredentials]) -> tuple[m.LinkGrant, m.LinkGrant]:
    (ca, sa, _), (cb, sb, _) = a, b
    link_id = f"l-{len(sa.frames)}"
    await hub.open_link(ca, m.LinkOpen(link_id=link_id, peer=cb.device_id))
    await async_wait_for(lambda: any(g.link_id == link_id for g in sa.grants()) and any(
        g.link_id == link_id for g in sb.grants()), what="both grants")
    ga = next(g for g in sa.grants() if g.link_id == link_id)
    gb = next(g for g in sb.grants() if g.link_id == link_id)
    return ga, gb


async def test_grants_pin_each_peer_and_give_loopback_only_to_a_peer_on_the_same_host(hub: Hub, tmp_path: Path) -> None:
    user, _ = await hub.store.users.create_user("u")
    a = await online(hub, user.user_id, tmp_path, "a", "203.0.113.7", "machine-1", 7001)
    b = await online(hub, user.user_id, tmp_path, "b", "198.51.100.2", "machine-2", 7002)
    ga, gb = await grants_between(hub, a, b)
    assert ga.peer_addrs == [("192.168.1.9", 7002)] and gb.peer_addrs == [("192.168.1.9", 7001)]
    assert (ga.peer_key, ga.peer_cert) == (b[0].public_key, b[2].cert)
    assert (gb.peer_key, gb.peer_cert) == (a[0].public_key, a[2].cert)
    assert PeerPin(ga.peer_key, ga.peer_cert).usable and PeerPin(gb.peer_key, gb.peer_cert).usable

    c = await online(hub, user.user_id, tmp_path, "c", "203.0.113.7", "machine-2", 7003)  # a's NAT, another machine
    ga, _ = await grants_between(hub, a, c)
    assert ga.peer_addrs == [("192.168.1.9", 7003)]
    d = await online(hub, user.user_id, tmp_path, "d", "203.0.113.7", "machine-1", 7004)  # a's own machine
    ga, gd = await grants_between(hub, a, d)
    assert ga.peer_addrs == [("192.168.1.9", 7004), ("127.0.0.1", 7004)]
    assert gd.peer_addrs == [("192.168.1.9", 7001), ("127.0.0.1", 7001)]


async def test_a_certificate_that_does_not_carry_the_devices_key_is_refused(hub: Hub, tmp_path: Path) -> None:
    user, _ = await hub.store.users.create_user("u")
    conn, _, _ = await online(hub, user.user_id, tmp_path, "a", "203.0.113.7", "m", 7001)
    _, other = credentials(tmp_path, "mallory")
    with pytest.raises(InvalidMessage, match="enrolled key"):
        hub.set_direct_cert(conn, other.cert)
    with pytest.raises(InvalidMessage, match="X.509"):
        hub.set_direct_cert(conn, b"junk")
    assert certificate_key(conn.tls_cert) == conn.public_key  # the good one stays
