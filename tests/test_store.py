"""Store: the coordinator's database layer, on SQLite and (when available) PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import select, text, update

from neuranet.server.models import ApiToken, Base, ChunkReplica, JoinToken
from neuranet.server.store import Store, StoreError

# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_store_url(postgres_url: str) -> Iterator[str]:
    """A database of this module's own on the session's PostgreSQL server, so that
    wiping it between tests cannot disturb other modules that share the server."""
    base, _, _ = postgres_url.rpartition("/")
    name = "store_" + uuid.uuid4().hex[:16]
    asyncio.run(_pg_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A URL of an empty database: a fresh SQLite file, or this module's PostgreSQL
    database with its schema dropped and recreated (skipped without PostgreSQL)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_store_url")
    asyncio.run(_pg_admin(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    return url


async def _pg_admin(server_url: str, sql: str) -> None:
    import asyncpg  # only needed when PostgreSQL is there

    conn = await asyncpg.connect(server_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


async def _device(store: Store, user_id: str, key: bytes | None = None, name: str | None = None) -> str:
    token, _ = await store.identity.create_join_token(user_id)
    return (await store.identity.enrol_device(token, key or uuid.uuid4().bytes * 2, name or f"dev-{uuid.uuid4().hex[:8]}")).id


async def _all_values(store: Store) -> list[object]:
    values: list[object] = []
    async with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in (await conn.execute(table.select())).all():
                values.extend(row)
    return values


# --- schema ---------------------------------------------------------------------------------


async def test_migrate_is_idempotent(store: Store, db_url: str) -> None:
    alice, _ = await store.users.create_user("alice")
    await store.migrate()  # again on the same engine
    again = Store(db_url)  # and from a fresh process's point of view
    try:
        await again.migrate()
        async with again.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        assert len(versions) == 1
        assert await again.users.user_count() == 1  # data survives re-running migrations
        assert (await again.devices.list_devices(alice.user_id)) == []
    finally:
        await again.close()


# --- users and tokens -------------------------------------------------------------------


async def test_create_user_and_authenticate(store: Store) -> None:
    assert await store.users.user_count() == 0
    admin, admin_token = await store.users.create_user("root", is_admin=True)
    bob, bob_token = await store.users.create_user("bob")
    assert (admin.name, admin.is_admin) == ("root", True)
    assert (bob.name, bob.is_admin) == ("bob", False)
    assert admin.user_id != bob.user_id
    assert await store.users.user_count() == 2

    assert await store.users.authenticate(admin_token) == admin
    assert await store.users.authenticate(bob_token) == bob
    assert await store.users.authenticate(bob_token + "x") is None
    assert await store.users.authenticate("") is None

    second = await store.users.create_api_token(bob.user_id, "laptop")
    assert second != bob_token
    assert await store.users.authenticate(second) == bob


async def test_secrets_are_stored_hashed_only(store: Store) -> None:
    alice, api_token = await store.users.create_user("alice")
    extra = await store.users.create_api_token(alice.user_id, "ci")
    join_token, _ = await store.identity.create_join_token(alice.user_id)

    values = await _all_values(store)
    for secret in (api_token, extra, join_token):
        assert not any(secret in v for v in values if isinstance(v, str)), "a clear token is in the database"
        assert not any(secret.encode() in v for v in values if isinstance(v, bytes))

    async with store.session() as s:
        api_hashes = set((await s.execute(select(ApiToken.token_hash))).scalars())
        join_hashes = set((await s.execute(select(JoinToken.token_hash))).scalars())
    assert api_hashes == {hashlib.sha256(t.encode()).hexdigest() for t in (api_token, extra)}
    assert join_hashes == {hashlib.sha256(join_token.encode()).hexdigest()}


async def test_duplicate_user_name_is_refused(store: Store) -> None:
    first, token = await store.users.create_user("carol")
    with pytest.raises(StoreError, match="'carol' already exists"):
        await store.users.create_user("carol")
    with pytest.raises(StoreError, match="already exists"):
        await store.users.create_user("carol", is_admin=True)
    assert await store.users.user_count() == 1
    assert await store.users.authenticate(token) == first


async def _race(*coros):  # type: ignore[no-untyped-def]
    results = await asyncio.gather(*coros, return_exceptions=True)
    return [r for r in results if not isinstance(r, BaseException)], [r for r in results if isinstance(r, BaseException)]


async def test_concurrent_duplicate_user_gives_store_error(store: Store) -> None:
    """Two admins racing for one name: the loser gets a StoreError, not a database error."""
    await asyncio.gather(*(store.users.user_count() for _ in range(4)))  # open pooled connections so the race is real
    for round_ in range(3):
        ok, errors = await _race(*(store.users.create_user(f"dave{round_}") for _ in range(4)))
        assert len(ok) == 1
        assert errors and all(isinstance(e, StoreError) and "already exists" in str(e) for e in errors), errors
    assert await store.users.user_count() == 3


# --- join tokens and enrolment ------------------------------------------------------------


async def test_join_token_enrols_a_device_under_its_owner(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    token, expires = await store.identity.create_join_token(alice.user_id)
    assert token.startswith("nj_")
    assert expires > time.time() + 3600
    dev = await store.identity.enrol_device(token, b"k" * 32, "laptop")
    assert (dev.user_id, dev.name, dev.public_key) == (alice.user_id, "laptop", b"k" * 32)
    got = await store.devices.get_device(dev.id)
    assert got is not None and got.user_id == alice.user_id
    assert [d.id for d in await store.devices.list_devices(alice.user_id)] == [dev.id]


async def test_join_token_is_single_use(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    token, _ = await store.identity.create_join_token(alice.user_id)
    dev = await store.identity.enrol_device(token, b"a" * 32, "one")
    with pytest.raises(StoreError, match="join token was already used; create a new one"):
        await store.identity.enrol_device(token, b"b" * 32, "two")
    assert [d.id for d in await store.devices.list_devices(alice.user_id)] == [dev.id]


async def test_reenrol_with_same_token_and_key_is_idempotent(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    token, _ = await store.identity.create_join_token(alice.user_id)
    first = await store.identity.enrol_device(token, b"s" * 32, "box")
    again = await store.identity.enrol_device(token, b"s" * 32, "box")  # the agent never saw the first answer
    assert again.id == first.id
    assert len(await store.devices.list_devices(alice.user_id)) == 1
    with pytest.raises(StoreError, match="already used"):
        await store.identity.enrol_device(token, b"t" * 32, "box")


async def test_expired_join_token_is_refused(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    token, expires = await store.identity.create_join_token(alice.user_id, ttl=-1.0)
    assert expires < time.time()
    with pytest.raises(StoreError, match="join token has expired; create a new one"):
        await store.identity.enrol_device(token, b"e" * 32, "late")
    assert await store.devices.list_devices(alice.user_id) == []


async def test_unknown_join_token_is_refused(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    api_token = await store.users.create_api_token(alice.user_id, "x")
    for bogus in ("nj_nonsense", "", api_token):  # an API token is not a join token
        with pytest.raises(StoreError, match="unknown join token"):
            await store.identity.enrol_device(bogus, b"u" * 32, "nope")


async def test_public_key_can_only_be_enrolled_once(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    await _device(store, alice.user_id, key=b"p" * 32)
    token, _ = await store.identity.create_join_token(bob.user_id)
    with pytest.raises(StoreError, match="public key is already enrolled"):
        await store.identity.enrol_device(token, b"p" * 32, "stolen")
    assert await store.devices.list_devices(bob.user_id) == []
    # the refused attempt did not burn the token
    dev = await store.identity.enrol_device(token, b"q" * 32, "own")
    assert dev.user_id == bob.user_id


async def test_concurrent_enrolment_of_one_key_gives_store_error(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    await asyncio.gather(*(store.users.user_count() for _ in range(4)))  # open pooled connections so the race is real
    for round_ in range(3):
        tokens = [(await store.identity.create_join_token(alice.user_id))[0] for _ in range(3)]
        key = bytes([round_]) * 32
        ok, errors = await _race(*(store.identity.enrol_device(t, key, f"twin-{round_}") for t in tokens))
        assert len(ok) == 1
        assert all(isinstance(e, StoreError) and "already enrolled" in str(e) for e in errors), errors
    assert len(await store.devices.list_devices(alice.user_id)) == 3


async def test_concurrent_reenrol_with_one_token_returns_one_device(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    await asyncio.gather(*(store.users.user_count() for _ in range(4)))
    token, _ = await store.identity.create_join_token(alice.user_id)
    ok, errors = await _race(*(store.identity.enrol_device(token, b"r" * 32, "retry") for _ in range(3)))
    assert errors == []
    assert len({d.id for d in ok}) == 1
    assert len(await store.devices.list_devices(alice.user_id)) == 1


async def test_set_profile_round_trips(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    dev = await _device(store, alice.user_id)
    profile = {"os": "linux", "listen_addrs": [["10.0.0.2", 7000]], "gpu": None}
    await store.devices.set_profile(dev, profile)
    got = await store.devices.get_device(dev)
    assert got is not None and got.profile == profile


# --- presence, liveness and telemetry ---------------------------------------------------------


async def test_presence_open_close_and_history_order(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    dev = await _device(store, alice.user_id)
    other = await _device(store, alice.user_id)

    await store.presence.open_presence(dev, 500.0)
    await store.presence.close_presence(dev, 600.0)
    await store.presence.open_presence(dev, 100.0)  # recorded later, started earlier
    await store.presence.close_presence(dev, 200.0)
    await store.presence.open_presence(dev, 700.0)
    await store.presence.open_presence(other, 650.0)
    assert await store.presence.presence_history(dev) == [(100.0, 200.0), (500.0, 600.0), (700.0, None)]
    assert await store.presence.presence_history(other) == [(650.0, None)]

    # A new connection while one is open ends the old interval where the new one starts.
    await store.presence.open_presence(dev, 800.0)
    assert await store.presence.presence_history(dev) == [(100.0, 200.0), (500.0, 600.0), (700.0, 800.0), (800.0, None)]
    # since= keeps intervals still open or ending at/after it
    assert await store.presence.presence_history(dev, since=650.0) == [(700.0, 800.0), (800.0, None)]
    assert await store.presence.presence_history(dev, since=600.0) == [(500.0, 600.0), (700.0, 800.0), (800.0, None)]

    await store.presence.close_presence(dev, 900.0)
    assert (await store.presence.presence_history(dev))[-1] == (800.0, 900.0)
    got = await store.devices.get_device(dev)
    assert got is not None and got.last_seen == 900.0


async def test_close_stale_presence_after_restart(store: Store, db_url: str) -> None:
    alice, _ = await store.users.create_user("alice")
    heard = await _device(store, alice.user_id)
    silent = await _device(store, alice.user_id)
    tidy = await _device(store, alice.user_id)
    await store.presence.open_presence(heard, 100.0)
    await store.devices.touch_devices({heard: 180.0})  # the hub's batched liveness, then the server dies
    await store.presence.open_presence(silent, 50.0)  # never heard from after connecting
    await store.presence.open_presence(tidy, 10.0)
    await store.presence.close_presence(tidy, 20.0)
    await store.close()

    restarted = Store(db_url)
    try:
        await restarted.migrate()
        assert await restarted.presence.close_stale_presence() == 2
        assert await restarted.presence.presence_history(heard) == [(100.0, 180.0)]
        assert await restarted.presence.presence_history(silent) == [(50.0, 50.0)]
        assert await restarted.presence.presence_history(tidy) == [(10.0, 20.0)]
        assert await restarted.presence.close_stale_presence() == 0  # nothing left open
    finally:
        await restarted.close()


async def test_close_stale_presence_never_ends_before_start(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    dev = await _device(store, alice.user_id)
    await store.presence.open_presence(dev, 300.0)
    await store.devices.touch_devices({dev: 250.0})  # a late batch with an older timestamp
    assert await store.presence.close_stale_presence() == 1
    assert await store.presence.presence_history(dev) == [(300.0, 300.0)]


async def test_touch_devices_updates_last_seen(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    a = await _device(store, alice.user_id)
    b = await _device(store, alice.user_id)
    c = await _device(store, alice.user_id)
    assert (await store.devices.get_device(a)).last_seen is None  # type: ignore[union-attr]
    await store.devices.touch_devices({a: 10.5, b: 20.25})
    await store.devices.touch_devices({})  # nothing to do
    await store.devices.touch_devices({b: 30.0, "no-such-device": 1.0})
    seen = {d: (await store.devices.get_device(d)).last_seen for d in (a, b, c)}  # type: ignore[union-attr]
    assert seen == {a: 10.5, b: 30.0, c: None}


async def test_telemetry_insert_and_read(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    dev = await _device(store, alice.user_id)
    other = await _device(store, alice.user_id)

    def row(device: str, ts: float, cpu: float = 1.5) -> dict[str, object]:
        return {"device_id": device, "ts": ts, "cpu_percent": cpu, "mem_percent": 40.0, "mem_used": 3 * 2**33,
                "net_sent": 2**40, "net_recv": 7, "battery_percent": None, "power_plugged": None}

    await store.telemetry.add_telemetry([])  # no-op
    await store.telemetry.add_telemetry([row(dev, 30.0, 3.0), row(dev, 10.0, 1.0), row(other, 15.0)])
    await store.telemetry.add_telemetry([row(dev, 20.0, 2.0) | {"battery_percent": 55.5, "power_plugged": True}])

    got = await store.telemetry.telemetry(dev)
    assert [r["ts"] for r in got] == [10.0, 20.0, 30.0]  # oldest first
    assert [r["cpu_percent"] for r in got] == [1.0, 2.0, 3.0]
    assert got[1] == {"ts": 20.0, "cpu_percent": 2.0, "mem_percent": 40.0, "mem_used": 3 * 2**33, "net_sent": 2**40,
                      "net_recv": 7, "battery_percent": 55.5, "power_plugged": True}
    assert got[0]["battery_percent"] is None and got[0]["power_plugged"] is None
    # limit keeps the newest rows, still oldest first
    assert [r["ts"] for r in await store.telemetry.telemetry(dev, limit=2)] == [20.0, 30.0]
    assert [r["ts"] for r in await store.telemetry.telemetry(other)] == [15.0]
    assert await store.telemetry.telemetry("no-such-device") == []


# --- link authorisation -------------------------------------------------------------------------


async def test_may_link(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    eve, _ = await store.users.create_user("eve")
    a1 = await _device(store, alice.user_id)
    a2 = await _device(store, alice.user_id)
    b1 = await _device(store, bob.user_id)
    e1 = await _device(store, eve.user_id)

    assert await store.devices.may_link(a1, a2) and await store.devices.may_link(a2, a1)  # same owner
    assert not await store.devices.may_link(a1, b1) and not await store.devices.may_link(b1, a1)  # strangers
    assert not await store.devices.may_link(a1, a1)  # a device never links to itself
    assert not await store.devices.may_link(a1, "no-such-device")

    run = await store.runs.create_run(alice.user_id, "pipeline", [a1, b1, a1])  # duplicates are fine
    assert isinstance(run, str) and run
    assert await store.devices.may_link(a1, b1) and await store.devices.may_link(b1, a1)  # a shared run
    assert not await store.devices.may_link(a2, b1)  # a2 is not in the run
    assert not await store.devices.may_link(b1, e1) and not await store.devices.may_link(a1, e1)

    await store.runs.create_run(eve.user_id, "job", [e1])
    await store.runs.create_run(bob.user_id, "job", [b1])
    assert not await store.devices.may_link(b1, e1)  # each in a run, but not the same one


# --- file records -----------------------------------------------------------------------------


async def test_replicas_upsert_and_unfinished_uploads_are_collected(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    a1, a2 = await _device(store, alice.user_id), await _device(store, alice.user_id)
    b1 = await _device(store, bob.user_id)
    kept, orphan, fresh = "a" * 64, "b" * 64, "c" * 64
    for chunk in (kept, orphan):
        await store.files.add_replica(alice.user_id, chunk, 10, a1)
        await store.files.add_replica(alice.user_id, chunk, 10, a2)
    await store.files.add_replica(alice.user_id, kept, 10, a1)  # recorded twice: still one replica
    await store.files.add_replica(bob.user_id, orphan, 10, b1)  # the same bytes are bob's own chunk
    await store.files.create_file(alice.user_id, "f", 10, "d" * 64, 2, None, [(kept, 10)])
    assert sorted((await store.files.replicas_of(alice.user_id, [kept]))[kept]) == sorted([a1, a2])
    assert set(await store.files.users_with_storage()) == {alice.user_id, bob.user_id}

    cut = time.time() + 1  # everything so far counts as old
    await store.files.add_replica(alice.user_id, fresh, 10, a2)
    await asyncio.sleep(0.01)
    assert await store.files.touch_replicas(alice.user_id, fresh) == 1
    await _set_stored_at(store, fresh, cut + 10)
    freed = await store.files.remove_orphans(alice.user_id, before=cut)
    # Only the old chunk no file uses goes; the file's chunk, the fresh upload and bob's copy stay.
    assert {d: sorted(c) for d, c in freed.items()} == {a1: [orphan], a2: [orphan]}
    assert orphan not in await store.files.replicas_of(alice.user_id, [orphan])
    assert await store.files.replicas_of(bob.user_id, [orphan]) == {orphan: [b1]}
    assert set(await store.files.replicas_of(alice.user_id, [kept, fresh])) == {kept, fresh}
    assert await store.files.remove_orphans(alice.user_id, before=cut) == {}
    assert await store.files.touch_replicas(alice.user_id, orphan) == 0  # gone: an upload must store it anew


async def _set_stored_at(store: Store, chunk: str, when: float) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(update(ChunkReplica).where(ChunkReplica.chunk_id == chunk).values(stored_at=when))


async def test_trace_imports_replace_refuse_bound_and_remove_with_their_history(store: Store) -> None:
    from neuranet.server.forecasting import trace_prefix_of
    from neuranet.server.store import StoreError, TraceExists

    alice, _ = await store.users.create_user("alice")
    real = await _device(store, alice.user_id, name="laptop")

    def hosts(prefix: str, n: int) -> list:
        return [(f"{prefix}-h{i}", {"simulated": True, "trace_prefix": prefix, "trace_client": f"h{i}",
                                    "history_end": 100.0}, 0.0, [(10.0, 20.0), (30.0, 40.0)]) for i in range(n)]

    async def add(prefix: str, n: int, replace: bool = False) -> list[str]:
        return await store.traces.add_simulated_devices(alice.user_id, hosts(prefix, n), prefix_of=trace_prefix_of,
                                                 prefix=prefix, replace=replace, limit=4)

    first = await add("seti", 3)
    with pytest.raises(TraceExists, match="--replace"):
        await add("seti", 3)
    second = await add("seti", 2, replace=True)
    with pytest.raises(StoreError, match="more than the 4"):
        await add("other", 3)  # 2 of seti + 3 > 4
    names = sorted(d.name for d in await store.devices.list_devices(alice.user_id))
    assert names == ["laptop", "seti-h0", "seti-h1"]
    assert [await store.presence.presence_history(d) for d in first] == [[], [], []]  # replaced: their history went too
    assert await store.presence.presence_history(second[0]) == [(10.0, 20.0), (30.0, 40.0)]
    assert await store.traces.remove_simulated_devices(alice.user_id, "seti", trace_prefix_of) == 2
    assert [d.id for d in await store.devices.list_devices(alice.user_id)] == [real]  # a real device is never a trace's
    assert await store.traces.remove_simulated_devices(alice.user_id, "seti", trace_prefix_of) == 0


# --- revocation and enrolment order (#13 items 6, 7) ----------------------------------------


async def test_check_enrolment_writes_nothing_and_names_the_device_id(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    token, _ = await store.identity.create_join_token(alice.user_id)
    offer = await store.identity.check_enrolment(token, b"w" * 32, "desk")
    assert offer.user_id == alice.user_id and len(offer.device_id) == 32
    assert await store.devices.list_devices(alice.user_id) == []
    dev = await store.identity.enrol_device(token, b"w" * 32, "desk", offer.device_id)
    assert dev.id == offer.device_id
    # A retry of the same enrolment is offered the device it made.
    assert (await store.identity.check_enrolment(token, b"w" * 32, "desk")).device_id == dev.id


async def test_device_names_are_unique_per_owner(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    bob, _ = await store.users.create_user("bob")
    await _device(store, alice.user_id, name="desk")
    await _device(store, bob.user_id, name="desk")  # another owner's device may share the name
    token, _ = await store.identity.create_join_token(alice.user_id)
    for attempt in (store.identity.check_enrolment, store.identity.enrol_device):
        with pytest.raises(StoreError, match="already have a device named 'desk'.*devices remove desk"):
            await attempt(token, b"n" * 32, "desk")
    with pytest.raises(StoreError, match="already have a device named 'desk'"):
        await store.traces.add_simulated_devices(alice.user_id, [("desk", {"simulated": True}, 0.0, [])],
                                          prefix_of=lambda name, profile: None, prefix="sim")
    assert [d.name for d in await store.devices.list_devices(alice.user_id)] == ["desk"]


async def test_expired_api_token_is_refused(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    expired = await store.users.create_api_token(alice.user_id, "old", expires_in=-1.0)
    forever = await store.users.create_api_token(alice.user_id, "forever", expires_in=None)
    assert await store.users.authenticate(expired) is None
    assert await store.users.authenticate(forever) == alice
    rows = {t.name: t for t in await store.users.list_tokens(alice.user_id)}
    assert rows["forever"].expires_at is None and rows["old"].expires_at < time.time()
    assert rows["initial"].expires_at is None  # the first token (the first admin's, at first start) lasts


async def test_revoked_token_is_refused_at_once_though_cached(store: Store) -> None:
    alice, first = await store.users.create_user("alice")
    bob, bobs = await store.users.create_user("bob")
    second = await store.users.create_api_token(alice.user_id, "laptop")
    assert (await store.users.authenticate(second)).token_id  # now cached
    laptop = next(t for t in await store.users.list_tokens(alice.user_id) if t.name == "laptop")
    with pytest.raises(StoreError, match="no token"):
        await store.users.revoke_token(bob.user_id, laptop.id)  # not bob's to revoke
    await store.users.revoke_token(alice.user_id, laptop.id)
    assert await store.users.authenticate(second) is None
    assert await store.users.authenticate(first) == alice and await store.users.authenticate(bobs) == bob


async def test_disabled_user_is_refused_everywhere(store: Store) -> None:
    bob, token = await store.users.create_user("bob")
    device_id = await _device(store, bob.user_id)
    join, _ = await store.identity.create_join_token(bob.user_id)
    assert await store.users.authenticate(token) == bob  # cached
    await store.users.set_user_disabled("bob", True)
    assert await store.users.authenticate(token) is None
    with pytest.raises(StoreError, match="disabled"):
        await store.identity.device_for_login(device_id)
    with pytest.raises(StoreError, match="disabled"):
        await store.identity.check_enrolment(join, b"d" * 32, "new")
    await store.users.set_user_disabled("bob", False)
    assert await store.users.authenticate(token) == bob
    assert (await store.identity.device_for_login(device_id)).id == device_id
    with pytest.raises(StoreError, match="no user"):
        await store.users.set_user_disabled("nobody", True)


async def test_removed_device_loses_its_replicas_and_its_login(store: Store) -> None:
    alice, _ = await store.users.create_user("alice")
    a1, a2 = await _device(store, alice.user_id), await _device(store, alice.user_id)
    shared, only = "a" * 64, "b" * 64
    await store.files.add_replicas(alice.user_id, shared, 10, [a1, a2])
    await store.files.add_replica(alice.user_id, only, 10, a1)
    await store.files.create_file(alice.user_id, "f", 20, "d" * 64, 2, None, [(shared, 10), (only, 10)])
    await store.presence.open_presence(a1, time.time())
    with pytest.raises(StoreError, match="only copy of 1 chunk"):
        await store.identity.remove_device(alice.user_id, a1)
    bob, _ = await store.users.create_user("bob")
    with pytest.raises(StoreError, match="no device"):
        await store.identity.remove_device(bob.user_id, a1, force=True)
    removed = await store.identity.remove_device(alice.user_id, a1, force=True)
    assert (removed.replicas, removed.sole_copies) == (2, 1)
    with pytest.raises(StoreError, match="unknown device"):
        await store.identity.device_for_login(a1)
    # Its copies are gone from the records: repair sees `shared` one short and `only` with no holder.
    assert {c: h for c, _, _, h in await store.files.stored_chunks(alice.user_id)} == {shared: [a2], only: []}
    assert [d.id for d in await store.devices.list_devices(alice.user_id)] == [a2]


async def test_migration_renames_duplicate_device_names_without_losing_any(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from neuranet.server.store import _MIGRATIONS

    def upgrade_to(revision: str):
        def run(sync_conn) -> None:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, revision)
        return run

    s = Store(db_url)
    try:
        async with s.engine.begin() as conn:
            await conn.run_sync(upgrade_to("0002"))
            await conn.execute(text("INSERT INTO users (id, name, is_admin, created_at) VALUES "
                                    "('u1', 'alice', false, 0), ('u2', 'bob', false, 0)"))
            rows = [("d1", "u1", "box", 1.0), ("d2", "u1", "box", 2.0), ("d3", "u1", "box", 3.0),
                    ("d4", "u1", "box-2", 4.0), ("d5", "u2", "box", 5.0), ("d6", "u1", "x" * 100, 6.0),
                    ("d7", "u1", "x" * 100, 7.0)]
            for i, (device_id, user_id, name, created) in enumerate(rows):
                await conn.execute(text("INSERT INTO devices (id, user_id, name, public_key, profile, created_at) "
                                        "VALUES (:id, :u, :n, :k, '{}', :c)"),
                                   {"id": device_id, "u": user_id, "n": name, "k": bytes([i]) * 32, "c": created})
        await s.migrate()
        async with s.engine.connect() as conn:
            names = dict((await conn.execute(text("SELECT id, name FROM devices"))).all())
        # The oldest keeps its name; the others get the first free suffix; other owners are untouched.
        assert names == {"d1": "box", "d2": "box-3", "d3": "box-4", "d4": "box-2", "d5": "box",
                         "d6": "x" * 100, "d7": "x" * 98 + "-2"}
    finally:
        await s.close()
