"""RunBook in-process, in milliseconds: a real store and blob store, a fleet of recording connections and a
planner that needs no model. Recovery (one owner, losses in order, failures in the run's state), checkpoints
as blobs, and taking runs up again after a coordinator restart."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load, save

from neuranet.protocol import messages as m
from neuranet.server.blobs import BlobStore
from neuranet.server.fleet import Fleet
from neuranet.api_requests import RunRequest
from neuranet.server.runs import RunBook, RunError, Split
from neuranet.server.store import Store

DEVICES = ["dev-a", "dev-b", "dev-c"]
LAYERS = 6


class _Conn(SimpleNamespace):
    def send(self, msg, *, payload=b""):
        self.sent.append((msg, payload))
        self.__dict__.setdefault("news", asyncio.Event()).set()  # for tests waiting on what it is sent

    async def next_send(self) -> None:
        """Wait (bounded) for the next message sent to this device."""
        news = self.__dict__.setdefault("news", asyncio.Event())
        news.clear()
        await asyncio.wait_for(news.wait(), 30)


def even_split(req: RunRequest, devices: list[dict]) -> Split:
    """The layers in equal runs over the devices, in order (what plan_fixed would do for equal devices)."""
    n = len(devices)
    bounds = [LAYERS * i // n for i in range(n + 1)]
    stages = [{"device": d["id"], "start": bounds[i], "stop": bounds[i + 1], "param_bytes": 4000}
              for i, d in enumerate(devices)]
    return Split(stages, f"{n} stages", 1.0, 4000 * n)


class World:
    """A store, blobs, a fleet of three online devices and a run book, all in one process."""

    def __init__(self, store: Store, blobs: BlobStore, user_id: str, planner=even_split, grace: float = 0.0) -> None:
        self.store, self.blobs, self.user_id = store, blobs, user_id
        self.conns: dict[str, _Conn] = {}
        self.fleet = Fleet(self.conns)
        self.book = RunBook(self.fleet, store, None, blobs, rejoin_grace=grace, restore_grace=grace, planner=planner)
        for d in DEVICES:
            self.connect(d)

    def connect(self, device_id: str) -> None:
        self.conns[device_id] = _Conn(device_id=device_id, user_id=self.user_id, profile={}, sent=[])
        self.fleet.back(device_id)

    def drop(self, device_id: str) -> None:
        del self.conns[device_id]
        self.fleet.lost(device_id)

    def sent(self, device_id: str, kind: type) -> list:
        return [(msg, payload) for msg, payload in self.conns[device_id].sent if isinstance(msg, kind)]

    async def start(self, steps: int = 10, every: int = 5) -> object:
        devices = [{"id": d, "name": d, "profile": {}} for d in DEVICES]
        req = RunRequest(model="mlp-digits", steps=steps, checkpoint_every=every)
        return await self.book.start(self.user_id, req, devices)

    async def report(self, run, stage: int, msg) -> None:
        await self.book.on_message(self.conns[run.stages[stage]["device"]], msg, b"")

    async def checkpoint(self, run, step: int, value: float = 1.0) -> None:
        """Every stage uploads its state after ``step`` steps (its tensors named by its layers)."""
        for i, s in enumerate(run.stages):
            state = save({f"{layer}.weight": torch.full((2,), value + layer) for layer in range(s["start"], s["stop"])})
            msg = m.StageWeights(run_id=run.id, stage=i, step=step, attempt=run.attempt, part=0, parts=1)
            await self.book.on_message(self.conns[s["device"]], msg, state)

    async def recovered(self, run) -> None:
        while run.recovery is not None:
            await asyncio.shield(run.recovery)


@pytest.fixture
async def store(tmp_path):
    s = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture
async def blobs(tmp_path):
    return await BlobStore(tmp_path / "blobs").open()


@pytest.fixture
async def world(store, blobs):
    user, _ = await store.users.create_user("alice")
    for d in DEVICES:
        await _device(store, user.user_id, d)
    w = World(store, blobs, user.user_id)
    yield w
    await w.book.close()


async def _device(store: Store, user_id: str, device_id: str) -> None:
    token, _ = await store.identity.create_join_token(user_id, 3600)
    await store.identity.enrol_device(token, device_id.encode().ljust(32, b"."), device_id, device_id)


async def test_a_run_is_assigned_recorded_and_checkpointed_as_blobs(world: World) -> None:
    run = await world.start()
    assigned = [world.sent(d, m.StageAssign) for d in DEVICES]
    assert [len(a) for a in assigned] == [1, 1, 1] and assigned[1][0][0].prev == "dev-a"
    row = await world.store.runs.get(run.id)
    assert row.state == "running" and row.attempt == 0 and row.spec["stages"] == run.stages
    await world.checkpoint(run, 5)
    first = await world.store.runs.checkpoint(run.id)
    assert run.checkpoints == {5: 0} and first.step == 5 and len(first.digests) == 3
    await world.checkpoint(run, 10, value=7.0)
    newest = await world.store.runs.checkpoint(run.id)
    assert newest.step == 10 and run.checkpoints == {10: 0}
    for digest in first.digests:  # the older checkpoint's blobs are gone
        assert not await world.blobs.has(digest)
    for i in range(3):
        await world.report(run, i, m.StageDone(run_id=run.id, stage=i, attempt=0, ok=True))
    assert run.status == "finished" and (await world.store.runs.get(run.id)).state == "finished"
    weights = load(await world.book.merged_weights(run.id))
    assert sorted(weights) == [f"{i}.weight" for i in range(LAYERS)] and float(weights["5.weight"][0]) == 12.0


async def test_a_lost_device_is_recovered_from_the_last_checkpoint_by_one_owner(world: World) -> None:
    run = await world.start(steps=20, every=5)
    await world.checkpoint(run, 5)
    world.drop("dev-b")
    world.drop("dev-c")  # a second loss while the first recovery is under way: the same owner takes it
    task = run.recovery
    assert task is not None
    await world.recovered(run)
    assert run.attempt == 1 and run.status == "running", run.errors
    assert [s["device"] for s in run.stages] == ["dev-a"] and len(run.recoveries) == 1
    assert "lost dev-b, dev-c" in run.recoveries[0] and "resumed from step 5 on 1 devices" in run.recoveries[0]
    (assign, _), = world.sent("dev-a", m.StageAssign)[1:]
    assert assign.attempt == 1 and assign.resume_step == 5 and assign.start == 0 and assign.stop == LAYERS
    state = b"".join(p for _, p in world.sent("dev-a", m.StageState))
    assert sorted(load(state)) == [f"{i}.weight" for i in range(LAYERS)]  # the whole model, merged
    assert world.sent("dev-a", m.StageAbort)  # the old attempt was stopped
    row = await world.store.runs.get(run.id)
    assert row.attempt == 1 and row.spec["stages"] == run.stages
    # Reports of the aborted attempt are ignored.
    await world.book.on_message(world.conns["dev-a"], m.StageDone(run_id=run.id, stage=0, attempt=0, ok=False,
                                                                   error="old"), b"")
    assert run.status == "running"


async def test_a_device_lost_while_the_recovery_plans_is_taken_in_turn(store, blobs, world: World) -> None:
    calls = []

    def planner(req, devices):
        calls.append([d["id"] for d in devices])
        if len(calls) == 2:  # the first re-plan: a survivor disconnects meanwhile
            world.loop.call_soon_threadsafe(world.drop, "dev-c")
        return even_split(req, devices)

    world.loop = asyncio.get_running_loop()
    world.book._planner = planner
    run = await world.start(steps=20)
    world.drop("dev-b")
    await world.recovered(run)
    assert run.status == "running", run.errors
    assert calls[1] == ["dev-a", "dev-c"] and calls[-1] == ["dev-a"]
    assert [s["device"] for s in run.stages] == ["dev-a"] and run.attempt == 1 and not run.lost  # planned again at once


async def test_a_failed_recovery_fails_the_run_with_the_reason(world: World) -> None:
    def broken(req, devices):
        if len(devices) < 3:
            raise ZeroDivisionError("planner bug")
        return even_split(req, devices)

    world.book._planner = broken
    run = await world.start()
    world.drop("dev-c")
    with pytest.raises(ZeroDivisionError):
        await run.recovery
    for _ in range(100):  # the failure is recorded by a task of the book's, started as the recovery ends
        if (await world.store.runs.get(run.id)).state == "failed":
            break
        await asyncio.sleep(0)
    assert run.status == "failed" and "recovery failed: ZeroDivisionError: planner bug" in run.errors[-1]
    assert run.recovery is None
    row = await world.store.runs.get(run.id)
    assert row.state == "failed" and "planner bug" in row.error


async def test_no_device_left_fails_the_run_and_says_so(world: World) -> None:
    run = await world.start()
    for d in DEVICES:
        world.drop(d)
    await world.recovered(run)
    assert run.status == "failed" and "no device of the run is online" in run.errors[-1]
    assert (await world.store.runs.get(run.id)).state == "failed"


async def test_a_device_back_within_the_grace_is_taken_back(store, blobs, world: World) -> None:
    world.book.rejoin_grace = 60.0  # ended by the device's return, not by time
    run = await world.start(steps=20)
    await world.checkpoint(run, 5)
    world.drop("dev-b")
    await asyncio.sleep(0)
    assert run.recovery is not None
    world.connect("dev-b")
    await world.recovered(run)
    assert [s["device"] for s in run.stages] == DEVICES and "(dev-b came back)" in run.recoveries[0]


async def test_a_restarted_coordinator_takes_the_run_up_from_its_last_checkpoint(store, blobs, world: World) -> None:
    run = await world.start(steps=20)
    for step in range(5):
        await world.report(run, 2, m.StageProgress(run_id=run.id, stage=2, attempt=0, step=step, loss=1.0 + step))
    await world.checkpoint(run, 5)  # recorded with the losses up to it, in one transaction
    await world.report(run, 2, m.StageProgress(run_id=run.id, stage=2, attempt=0, step=6, loss=0.5))
    await world.book.close()  # the coordinator goes (nothing saved since); the agents come back to a new one
    again = World(store, blobs, world.user_id, grace=60.0)
    for d in DEVICES:
        del again.conns[d]
    assert await again.book.restore() == 1
    taken = again.book.runs[run.id]
    assert taken.recovery is not None and taken.checkpoints == {5: 0}
    assert taken.losses == {step: 1.0 + step for step in range(5)}  # after the checkpoint: redone
    for d in DEVICES:  # the agents reconnect
        again.connect(d)
    await again.recovered(taken)
    assert taken.status == "running" and taken.attempt == 1, taken.errors
    assert "the coordinator restarted" in taken.recoveries[0]
    (assign, _), = again.sent("dev-a", m.StageAssign)
    assert assign.attempt == 1 and assign.resume_step == 5
    await again.checkpoint(taken, 20, value=3.0)
    for i in range(3):
        await again.report(taken, i, m.StageDone(run_id=run.id, stage=i, attempt=1, ok=True))
    assert taken.status == "finished"
    await again.book.close()
    # A third coordinator finds the finished run from its record alone, weights included.
    third = World(store, blobs, world.user_id)
    assert await third.book.restore() == 0
    found = await third.book.find(run.id)
    assert found is not None and found.status == "finished"
    assert float(load(await third.book.merged_weights(run.id))["0.weight"][0]) == 3.0
    await third.book.close()


async def test_a_run_that_cannot_start_is_not_recorded(world: World) -> None:
    def offline_meanwhile(req, devices):
        world.loop.call_soon_threadsafe(world.drop, "dev-a")
        return even_split(req, devices)

    world.loop = asyncio.get_running_loop()
    world.book._planner = offline_meanwhile
    with pytest.raises(RunError, match="went offline while the run was planned"):
        await world.start()
    assert await world.store.runs.list_runs(world.user_id, 10) == []


async def test_a_failed_link_waits_for_the_loss_behind_it_and_replans_once(world: World) -> None:
    world.book.rejoin_grace = 60.0  # ended by the loss, then by the device's return
    run = await world.start(steps=20)
    await world.checkpoint(run, 5)
    await world.report(run, 0, m.StageDone(run_id=run.id, stage=0, attempt=0, ok=False, error="LinkClosed: gone",
                                           link_failed=True))
    await world.report(run, 2, m.StageDone(run_id=run.id, stage=2, attempt=0, ok=False, error="LinkClosed: gone",
                                           link_failed=True))  # its other neighbour says the same
    assert run.status == "running" and run.recovery is not None and run.link_recoveries == 1
    await asyncio.sleep(0)
    world.drop("dev-b")  # the coordinator finds the device behind the link gone
    await asyncio.sleep(0)
    world.connect("dev-b")
    await world.recovered(run)
    assert run.attempt == 1 and run.status == "running", run.errors
    assert run.recoveries == ["attempt 1: lost dev-b (dev-b came back); resumed from step 5 on 3 devices"]


async def test_links_failing_again_and_again_fail_the_run_in_the_end(world: World) -> None:
    run = await world.start(steps=20)
    for attempt in range(4):
        await world.report(run, 1, m.StageDone(run_id=run.id, stage=1, attempt=attempt, ok=False,
                                               error="PeerUnreachable: away", link_failed=True))
        await world.recovered(run)
    assert run.status == "failed" and "PeerUnreachable: away" in run.errors[1]
    assert len(run.recoveries) == 3 and "stage 1 lost a link (PeerUnreachable: away)" in run.recoveries[0]
    assert run.attempt == 3


async def test_the_owner_hears_the_runs_progress_and_each_state_once(world: World) -> None:
    from neuranet.server.events import RUN_PROGRESS, RUN_STATE

    heard = world.book.events.subscribe(world.user_id)
    other = world.book.events.subscribe("someone-else")
    run = await world.start(steps=10, every=5)
    await world.report(run, 2, m.StageProgress(run_id=run.id, stage=2, attempt=run.attempt, step=0, loss=2.5))
    await world.checkpoint(run, 5)  # saved, but no change of state
    world.drop("dev-c")
    await world.recovered(run)
    for i in range(len(run.stages)):
        await world.report(run, i, m.StageDone(run_id=run.id, stage=i, attempt=run.attempt, ok=True))
    await world.checkpoint(run, 10)
    events = []
    while (e := heard.get_nowait()) is not None:
        events.append(e)
    assert all(e.object_id == run.id for e in events)
    states = [(e.data["state"], e.data["attempt"]) for e in events if e.kind == RUN_STATE]
    assert states == [("running", 0), ("recovering", 1), ("running", 1), ("finished", 1)], states
    progress = [e.data for e in events if e.kind == RUN_PROGRESS]
    assert progress == [{"step": 0, "loss": 2.5, "steps_done": 1}]
    assert other.get_nowait() is None
