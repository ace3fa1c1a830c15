"""PeerLink against a real coordinator process: ordering across path changes and restarts."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from fabric_helpers import async_wait_for, device_by_name, free_port
from neuranet.agent.runtime import Agent
from neuranet.config import AgentConfig
from neuranet.fabric import LocalFabric
from neuranet.protocol.errors import LinkRefused, PeerUnreachable

pytestmark = pytest.mark.slow


@pytest.fixture()
def fabric(tmp_path: Path):
    with LocalFabric(tmp_path, server_args=["--offline-after", "5", "--heartbeat", "1"]) as f:
        f.start_server(port=free_port())
        yield f


def agent_config(fabric: LocalFabric, name: str, token: str | None = None, **kw) -> AgentConfig:
    with fabric.client(token) as c:
        jt = c.create_join_token()["join_token"]
    defaults = dict(listen_host="127.0.0.1", measure=False, direct_retry_interval=0.3, backoff_cap=1.0,
                    link_window_bytes=4 << 20, frame_bytes=256 << 10)
    return AgentConfig(server_url=fabric.url, data_dir=fabric.root / name, name=name, join_token=jt, **{**defaults, **kw})


async def pump(link, count: int, size: int, gap: float = 0.0) -> None:
    for i in range(count):
        await link.send(bytes([i % 251]) * size, {"i": i})
        if gap:
            await asyncio.sleep(gap)


async def drain(link, count: int, size: int) -> list[int]:
    seen = []
    for _ in range(count):
        msg = await asyncio.wait_for(link.recv(), 30)
        assert msg.payload == bytes([msg.meta["i"] % 251]) * size
        seen.append(msg.meta["i"])
    return seen


async def test_messages_stay_in_order_across_direct_failure_and_return(fabric: LocalFabric) -> None:
    async with Agent(agent_config(fabric, "a")) as a, Agent(agent_config(fabric, "b")) as b:
        await a.wait_connected()
        await b.wait_connected()
        link = await a.links.open(b.device_id)
        peer = await asyncio.wait_for(b.links.accept(), 10)
        assert link.path == "direct"
        count, size = 400, 300 << 10  # 120 MB through a 4 MiB window: many rewinds in flight
        sender = asyncio.create_task(pump(link, count, size))
        receiver = asyncio.create_task(drain(peer, count, size))
        await async_wait_for(lambda: peer._rx.expected > 50, what="traffic")
        link.direct.transport.abort()  # the direct path dies mid-stream
        await async_wait_for(lambda: link.path == "relay" or sender.done(), what="fallback to relay")
        seen = await asyncio.wait_for(receiver, 60)
        await sender
        assert seen == list(range(count))
        assert "relay" in link.paths_used and "direct" in link.paths_used
        await async_wait_for(lambda: link.path == "direct", what="direct path to come back")


async def test_relayed_link_survives_a_server_restart(fabric: LocalFabric) -> None:
    port = int(fabric.url.rsplit(":", 1)[1])
    async with Agent(agent_config(fabric, "a", advertise=())) as a, Agent(agent_config(fabric, "b", advertise=())) as b:
        await a.wait_connected()
        await b.wait_connected()
        link = await a.links.open(b.device_id)
        peer = await asyncio.wait_for(b.links.accept(), 10)
        count, size = 200, 64 << 10
        sender = asyncio.create_task(pump(link, count, size, gap=0.01))
        receiver = asyncio.create_task(drain(peer, count, size))
        await async_wait_for(lambda: peer._rx.expected > 20, what="traffic")
        await asyncio.to_thread(fabric.stop_server)
        await asyncio.to_thread(fabric.start_server, 30.0, port)
        seen = await asyncio.wait_for(receiver, 60)
        await sender
        assert seen == list(range(count))
        assert link.paths_used == {"relay"}
        assert a.connections >= 2 and b.connections >= 2


async def test_link_to_another_users_device_is_refused(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        other = c.create_user("other")
    async with Agent(agent_config(fabric, "mine")) as mine, Agent(agent_config(fabric, "theirs", other["token"])) as theirs:
        await mine.wait_connected()
        await theirs.wait_connected()
        with pytest.raises(LinkRefused, match="forbidden"):
            await theirs.links.open(mine.device_id)
        assert not mine.links.links  # nothing reached the target


async def test_opening_a_link_to_an_offline_device_fails_at_once(fabric: LocalFabric) -> None:
    async with Agent(agent_config(fabric, "a")) as a:
        await a.wait_connected()
        async with Agent(agent_config(fabric, "b")) as b:
            await b.wait_connected()
            gone = b.device_id
        with fabric.client() as c:
            await async_wait_for(lambda: not device_by_name(c, "b")["online"], what="b offline")
        # Nothing would grant the link later, so the opener hears now rather than after its timeout.
        with pytest.raises(PeerUnreachable, match="offline"):
            await a.links.open(gone, timeout=60)


async def test_devices_put_in_one_run_may_link_across_owners(fabric: LocalFabric, tmp_path: Path) -> None:
    from neuranet.server.store import Store

    with fabric.client() as c:
        other = c.create_user("partner")
        me = c.me()
    async with Agent(agent_config(fabric, "mine")) as mine, Agent(agent_config(fabric, "theirs", other["token"])) as theirs:
        await mine.wait_connected()
        await theirs.wait_connected()
        store = Store(f"sqlite+aiosqlite:///{fabric.server_dir / 'neuranet.db'}")
        try:
            await store.runs.create_run(me["user_id"], "pipeline", [mine.device_id, theirs.device_id])
        finally:
            await store.close()
        link = await theirs.links.open(mine.device_id)
        peer = await asyncio.wait_for(mine.links.accept(), 10)
        await link.send(b"hello", {"k": 1})
        msg = await asyncio.wait_for(peer.recv(), 10)
        assert (msg.payload, msg.meta) == (b"hello", {"k": 1})
        # A shared run is not enough for the file-chunk channel: it joins one owner's devices only.
        with pytest.raises(LinkRefused, match="links only one user's devices"):
            await theirs.links.open(mine.device_id, "chunks")


async def test_tensors_round_trip_over_a_link(fabric: LocalFabric) -> None:
    import torch

    async with Agent(agent_config(fabric, "a")) as a, Agent(agent_config(fabric, "b")) as b:
        await a.wait_connected()
        await b.wait_connected()
        link = await a.links.open(b.device_id, channel="tensors")
        peer = await asyncio.wait_for(b.links.accept("tensors"), 10)
        sent = [torch.randn(3, 5), torch.arange(10, dtype=torch.int64), torch.randn(1024, 700).to(torch.bfloat16)]
        for t in sent:
            await link.send_tensor(t, {"name": "x"})
        for t in sent:
            got = (await asyncio.wait_for(peer.recv(), 10)).tensor()
            assert got.dtype == t.dtype and torch.equal(got, t)
        with pytest.raises(ValueError, match="exceeds the link's limit"):
            await link.send(b"x" * ((4 << 20) + 1))


async def test_an_agent_moved_to_another_server_enrols_there_with_a_new_join_token(fabric: LocalFabric, tmp_path: Path) -> None:
    cfg = agent_config(fabric, "mover")
    async with Agent(cfg) as first:
        await first.wait_connected()
        old_id = first.device_id
    with LocalFabric(tmp_path / "second") as other:
        await asyncio.to_thread(other.start_server, 30.0, free_port())
        with other.client() as c:
            jt = c.create_join_token()["join_token"]
        moved = AgentConfig(**{**cfg.__dict__, "server_url": other.url, "join_token": jt})
        async with Agent(moved) as again:
            await again.wait_connected()
            assert again.device_id != old_id
            with other.client() as c:
                assert [d["id"] for d in c.devices()] == [again.device_id]


async def test_direct_path_lost_is_logged_only_when_a_live_path_is_lost(fabric: LocalFabric, caplog) -> None:
    def lost_logs() -> list[str]:
        return [r.getMessage() for r in caplog.records if "direct path" in r.getMessage() and "lost" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="neuranet.peerlink")
    async with Agent(agent_config(fabric, "a")) as a, Agent(agent_config(fabric, "b")) as b:
        await a.wait_connected()
        await b.wait_connected()
        for _ in range(2):  # closed by the opener, then by the acceptor: a normal end either way
            link = await a.links.open(b.device_id)
            peer = await asyncio.wait_for(b.links.accept(), 10)
            assert link.path == "direct"
            await link.send(b"x")
            await asyncio.wait_for(peer.recv(), 10)
            closer, other = (link, peer) if _ == 0 else (peer, link)
            await closer.close()
            await async_wait_for(lambda: other.closed, what="the other end to see the close")
            await asyncio.gather(link.wait_stopped(), peer.wait_stopped())
        assert lost_logs() == []
        link = await a.links.open(b.device_id)
        await asyncio.wait_for(b.links.accept(), 10)
        link.direct.transport.abort()  # a live path dies
        await async_wait_for(lambda: lost_logs(), what="the loss to be logged")
        await link.close()
