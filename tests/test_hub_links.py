"""The hub's link grants and relay authorisation, and its message registry, in process (a real store; the
agents are queues nobody drains, so what the hub sent each one is read back from its queue)."""

from __future__ import annotations

import random

import pytest

from neuranet.config import Limits, ServerConfig
from neuranet.protocol import messages as m
from neuranet.protocol.envelope import decode_frame, encode_frame
from neuranet.protocol.errors import ProtocolError, UnexpectedMessage
from neuranet.server.hub import AgentConnection, Hub
from neuranet.server.store import Store


async def _nothing(*_args) -> None:
    return None


class Setup:
    def __init__(self, store: Store, hub: Hub) -> None:
        self.store, self.hub = store, hub
        self.devices: dict[str, object] = {}
        self.conns: dict[str, AgentConnection] = {}

    async def device(self, owner, name: str) -> None:
        token, _ = await self.store.identity.create_join_token(owner.user_id)
        self.devices[name] = await self.store.identity.enrol_device(token, random.Random(name).randbytes(32), name)

    def id(self, name: str) -> str:
        return self.devices[name].id  # type: ignore[attr-defined]

    async def connect(self, name: str) -> AgentConnection:
        d = self.devices[name]
        conn = AgentConnection(d.id, d.user_id, _nothing, _nothing, 1 << 20)  # type: ignore[attr-defined]
        await self.hub.register(conn)
        self.conns[name] = conn
        return conn

    def told(self, name: str) -> list[m.Message]:
        """What the hub queued for ``name`` since the last look (the queue is emptied)."""
        conn = self.conns[name]
        out = [m.parse(decode_frame(frame)) for frame, _ in conn._queue]
        conn._queue.clear()
        return out

    def frames(self, name: str) -> list[bytes]:
        conn = self.conns[name]
        out = [frame for frame, _ in conn._queue]
        conn._queue.clear()
        return out

    async def open(self, src: str, dst: str, channel: str = "run:x:0", link: str = "l1") -> list[m.Message]:
        await self.hub.open_link(self.conns[src], m.LinkOpen(link_id=link, peer=self.id(dst), channel=channel))
        return self.told(src)

    async def relay(self, src: str, dst: str, msg: m.Message) -> bytes:
        env = msg.envelope(src=self.id(src), dst=self.id(dst))
        frame = encode_frame(env)
        await self.hub.relay(self.conns[src], decode_frame(frame), frame)
        return frame


@pytest.fixture
async def setup(tmp_path):
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.migrate()
    hub = Hub(ServerConfig(data_dir=tmp_path, limits=Limits(max_peers_per_device=2)), store)
    s = Setup(store, hub)
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    s.alice, s.bob = alice, bob  # type: ignore[attr-defined]
    for owner, name in ((alice, "a1"), (alice, "a2"), (alice, "a3"), (alice, "a4"), (bob, "b1")):
        await s.device(owner, name)
    for name in ("a1", "a2", "a3", "a4", "b1"):
        await s.connect(name)
    for name in s.conns:
        s.told(name)
    yield s
    await hub.shutdown()
    await store.close()


async def test_a_users_own_devices_are_granted_a_link_both_ways_with_one_secret(setup: Setup) -> None:
    (grant,) = await setup.open("a1", "a2")
    (other,) = setup.told("a2")
    assert isinstance(grant, m.LinkGrant) and isinstance(other, m.LinkGrant)
    assert grant.initiator and not other.initiator and grant.secret == other.secret and len(grant.secret) == 32
    assert grant.peer == setup.id("a2") and other.peer == setup.id("a1") and grant.channel == other.channel


async def test_a_strangers_device_is_refused_unless_a_run_joins_them_and_never_for_chunks(setup: Setup) -> None:
    (refused,) = await setup.open("a1", "b1")
    assert isinstance(refused, m.LinkRefusedMsg) and refused.code == "forbidden"
    assert not setup.told("b1")
    await setup.store.runs.create_run(setup.alice.user_id, "train", [setup.id("a1"), setup.id("b1")])  # type: ignore[attr-defined]
    (grant,) = await setup.open("a1", "b1")
    assert isinstance(grant, m.LinkGrant)
    (chunks,) = await setup.open("a1", "b1", channel="chunks", link="l2")
    assert isinstance(chunks, m.LinkRefusedMsg) and chunks.code == "forbidden" and "one user's devices" in chunks.reason


async def test_an_offline_peer_and_oneself_are_refused(setup: Setup) -> None:
    await setup.hub.unregister(setup.conns["a2"])
    (offline,) = await setup.open("a1", "a2")
    assert isinstance(offline, m.LinkRefusedMsg) and offline.code == "offline"
    (itself,) = await setup.open("a1", "a1")
    assert isinstance(itself, m.LinkRefusedMsg) and itself.code == "forbidden"


async def test_a_device_links_with_at_most_the_peer_limit(setup: Setup) -> None:
    assert isinstance((await setup.open("a1", "a2"))[0], m.LinkGrant)
    assert isinstance((await setup.open("a1", "a3"))[0], m.LinkGrant)
    (over,) = await setup.open("a1", "a4")
    assert isinstance(over, m.LinkRefusedMsg) and over.code == "limit"
    assert isinstance((await setup.open("a1", "a2", link="again"))[0], m.LinkGrant)  # a granted peer again is fine


async def test_frames_are_relayed_unchanged_only_over_a_granted_link(setup: Setup) -> None:
    data = m.LinkData(link="l1", seq=0, off=0, end=True, meta={"k": 1})
    await setup.relay("a1", "a2", data)
    (refused,) = setup.told("a1")
    assert isinstance(refused, m.LinkRefusedMsg) and refused.code == "ungranted" and not setup.frames("a2")
    await setup.open("a1", "a2")
    setup.told("a2")
    frame = await setup.relay("a1", "a2", data)
    assert setup.frames("a2") == [frame]  # byte for byte
    with pytest.raises(ProtocolError, match="cannot be relayed"):
        await setup.relay("a1", "a2", m.Heartbeat(seq=1))


async def test_a_peer_going_offline_ends_its_grants_and_tells_its_peers(setup: Setup) -> None:
    await setup.open("a1", "a2")
    setup.told("a2")
    await setup.hub.unregister(setup.conns["a2"])
    (down,) = setup.told("a1")
    assert isinstance(down, m.PeerDown) and down.peer == setup.id("a2")
    await setup.relay("a1", "a2", m.LinkData(link="l1", seq=0, off=0, end=True))
    (gone,) = setup.told("a1")
    assert isinstance(gone, m.PeerDown)
    await setup.connect("a2")  # back: the old grant is not renewed by itself
    await setup.relay("a1", "a2", m.LinkData(link="l1", seq=0, off=0, end=True))
    (refused,) = setup.told("a1")
    assert isinstance(refused, m.LinkRefusedMsg) and refused.code == "ungranted"


async def test_messages_to_the_server_go_to_the_one_handler_of_their_type(setup: Setup) -> None:
    heard = []
    setup.hub.on(m.StageProgress, lambda conn, msg, payload: heard.append((conn.device_id, msg.step, payload)))
    with pytest.raises(ValueError, match="already has a handler"):
        setup.hub.on(m.StageProgress, lambda *_: None)
    conn = setup.conns["a1"]
    env = decode_frame(encode_frame(m.StageProgress(run_id="r", stage=0, attempt=0, step=3).envelope(src=conn.device_id,
                                                                                         payload=b"p")))
    await setup.hub.dispatch(conn, env)
    assert heard == [(conn.device_id, 3, b"p")]
    await setup.hub.dispatch(conn, decode_frame(encode_frame(m.Heartbeat(seq=9).envelope(src=conn.device_id))))
    (ack,) = setup.told("a1")
    assert isinstance(ack, m.HeartbeatAck) and ack.seq == 9
    with pytest.raises(UnexpectedMessage, match="stage_done is not accepted"):
        await setup.hub.dispatch(conn, decode_frame(encode_frame(
            m.StageDone(run_id="r", stage=0, attempt=0, ok=True).envelope(src=conn.device_id))))
