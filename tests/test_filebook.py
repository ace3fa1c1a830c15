"""FileBook's repair in process, in milliseconds: a real store, devices that answer chunk copies at once,
and an injected clock for how long a device has been away (no agents, no sleeps)."""

from __future__ import annotations

import asyncio
import pytest

from neuranet.protocol import messages as m
from neuranet.server.files import FileBook
from neuranet.server.fleet import Fleet
from neuranet.server.forecasting import ForecastService
from neuranet.server.store import Store

CHUNK = "ab" * 32
SIZE = 1000
DAY = 24 * 3600.0


class _Device:
    """Answers what the book asks: copies succeed unless the device lost the chunk (``missing``)."""

    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)

    def send(self, msg, *, payload=b""):
        self.sent.append(msg)
        if isinstance(msg, m.ChunkCopy):
            ok = msg.chunk not in self.missing
            reply = m.ChunkReply(request=msg.request, chunk=msg.chunk, ok=ok, held=ok,
                                 error="" if ok else "no such chunk here", target_free_bytes=10**9)
            asyncio.get_running_loop().call_soon(self.book.on_message, self, reply, b"")


class Files:
    def __init__(self, store: Store, user_id: str, ids: dict[str, str], tmp) -> None:
        self.store, self.user_id, self.ids = store, user_id, ids
        self.now = 1_000_000.0
        self.conns: dict[str, _Device] = {}
        self.fleet = Fleet(self.conns)
        forecasts = ForecastService(store, tmp / "forecast", 3600.0)  # never trained: persistence forecasts
        self.book = FileBook(self.fleet, store, forecasts, lost_after=DAY, clock=lambda: self.now,
                             monotonic=lambda: self.now)

    def online(self, name: str, missing: set[str] | None = None) -> None:
        device_id = self.ids[name]
        conn = _Device(device_id=device_id, user_id=self.user_id, profile={}, sent=[], missing=missing or set(),
                       book=self.book)
        self.conns[device_id] = conn
        self.book.on_message(conn, m.ChunkInventory(quota_bytes=10**9, used_bytes=0, chunks=[], last=False), b"")

    def offline(self, name: str) -> None:
        del self.conns[self.ids[name]]
        self.fleet.lost(self.ids[name])

    async def holders(self) -> set[str]:
        names = {v: k for k, v in self.ids.items()}
        return {names[d] for d in (await self.store.files.replicas_of(self.user_id, [CHUNK])).get(CHUNK, [])}


@pytest.fixture
async def files(tmp_path):
    import random

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.migrate()
    user, _ = await store.users.create_user("alice")
    ids = {}
    for name in ("a", "b", "c"):
        token, _ = await store.identity.create_join_token(user.user_id)
        ids[name] = (await store.identity.enrol_device(token, random.Random(name).randbytes(32), name)).id
    f = Files(store, user.user_id, ids, tmp_path)
    yield f
    await f.book.close()
    await store.close()


async def stored(files: Files, holders: list[str], replicas: int = 2) -> None:
    for name in holders:
        await files.store.files.add_replica(files.user_id, CHUNK, SIZE, files.ids[name])
    await files.store.files.create_file(files.user_id, "f.bin", SIZE, "0" * 64, replicas, None, [(CHUNK, SIZE)])


async def test_a_chunk_short_of_its_replicas_is_copied_device_to_device(files: Files) -> None:
    for name in "abc":
        files.online(name)
    await stored(files, ["a"])
    assert await files.book.repair_round() == 1
    assert len(await files.holders()) == 2 and "a" in await files.holders()
    (copy,) = [msg for msg in files.conns[files.ids["a"]].sent if isinstance(msg, m.ChunkCopy)]
    assert copy.chunk == CHUNK and copy.target in (files.ids["b"], files.ids["c"])
    assert await files.book.repair_round() == 0  # nothing left to do


async def test_a_device_away_past_lost_after_is_replaced_and_not_before(files: Files) -> None:
    for name in "abc":
        files.online(name)
    await stored(files, ["a", "b"])
    await files.store.devices.touch_devices({files.ids["a"]: files.now})
    files.offline("a")
    files.now += DAY - 60  # away, but not for long enough
    assert await files.book.repair_round() == 0 and await files.holders() == {"a", "b"}
    files.now += 120  # now past lost_after: its copy is replaced from the one online holder
    assert await files.book.repair_round() == 1
    assert {"b", "c"} <= await files.holders()


async def test_a_source_that_lost_its_copy_loses_its_record(files: Files) -> None:
    files.online("a", missing={CHUNK})
    files.online("b")
    await stored(files, ["a"])
    assert await files.book.repair_round() == 0
    assert await files.holders() == set()  # the record of a copy that is not there goes; the file says so


@pytest.mark.parametrize("likely", ["b", "c"])
async def test_placement_reads_each_devices_forecast_from_the_fleet_view(files: Files, likely: str) -> None:
    from neuranet.server.fleet import Outlook

    p = {"a": 0.5, likely: 0.99}  # the other one: 0.05 (a sure holder would leave nothing to gain)
    outlooks = {files.ids[n]: Outlook((p.get(n, 0.05),) * 4) for n in "abc"}
    files.fleet.use_forecasts(outlooks.get)
    for name in "abc":
        files.online(name)
    await stored(files, ["a"])
    assert await files.book.repair_round() == 1
    assert await files.holders() == {"a", likely}  # the copy goes where the forecast says it stays reachable
