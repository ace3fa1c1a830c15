"""ServeBook in-process, in milliseconds: routing a request through a deployment's stages, errors and stale
reports, losing a device, and serving again after a coordinator restart (a real store; recording devices)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from neuranet.protocol import messages as m
from neuranet.protocol.tensors import encode_tensor
from neuranet.api_requests import DeployRequest
from neuranet.server.serving import ServeBook, ServeInvalid, ServeUnavailable
from test_runbook import DEVICES, World, _device  # noqa: F401  # fixtures: store, blobs
from test_runbook import blobs, store  # noqa: F401

ROW = [0.5] * 64  # one mlp-digits input


@pytest.fixture
async def world(store, blobs):  # noqa: F811
    user, _ = await store.users.create_user("alice")
    for d in DEVICES:
        await _device(store, user.user_id, d)
    w = World(store, blobs, user.user_id)
    w.serving = ServeBook(w.fleet, store, w.book, restore_grace=60.0)
    yield w
    await w.serving.close()
    await w.book.close()


async def arrived(world: World, device_id: str, kind: type, count: int = 1) -> list:
    """Wait (on what the device is sent, bounded) until ``device_id`` was sent ``count`` messages of ``kind``."""
    for _ in range(100):
        got = world.sent(device_id, kind)
        if len(got) >= count:
            return got
        await world.conns[device_id].next_send()  # the encoder runs in a thread first
    raise AssertionError(f"{device_id} never got {count} {kind.__name__}")


async def deploy(world: World):
    devices = [{"id": d, "name": d, "profile": {}} for d in DEVICES]
    req = DeployRequest(model="mlp-digits", devices=DEVICES, use_all_devices=True, batch_size=1)
    return await world.serving.start(world.user_id, req, devices)


def ready(world: World, dep, attempt: int = 0) -> None:
    for i, s in enumerate(dep.stages):
        world.serving.on_message(world.conns[s["device"]], m.ServeStatus(run_id=dep.id, stage=i, attempt=attempt,
                                                                          ok=True), b"")


def output(world: World, dep, request: int, tensor: torch.Tensor, attempt: int = 0) -> None:
    header, data = encode_tensor(tensor)
    last = len(dep.stages) - 1
    world.serving.on_message(world.conns[dep.stages[last]["device"]],
                             m.ServeOutput(run_id=dep.id, stage=last, attempt=attempt, request=request, tensor=header),
                             bytes(data))


async def test_a_request_goes_in_at_the_first_stage_and_comes_back_from_the_last(world: World) -> None:
    dep = await deploy(world)
    assigns = [world.sent(d, m.ServeAssign) for d in DEVICES]
    assert [len(a) for a in assigns] == [1, 1, 1] and assigns[2][0][0].prev == "dev-b"
    ready(world, dep)
    assert dep.status == "ready"
    assert (await world.store.runs.get(dep.id)).state in ("loading", "ready")  # recorded (ready: in a task)
    answer = asyncio.create_task(world.serving.infer(dep, [ROW]))
    (sent, _), = await arrived(world, "dev-a", m.ServeInput)
    assert sent.run_id == dep.id and sent.attempt == 0
    assert not world.sent("dev-b", m.ServeInput)  # only the first stage takes inputs
    output(world, dep, sent.request, torch.arange(10.0).reshape(1, 10))
    assert await answer == [list(range(10))]
    assert dep.served == 1


async def test_a_stage_error_fails_that_request_and_stale_reports_are_ignored(world: World) -> None:
    dep = await deploy(world)
    ready(world, dep, attempt=1)  # reports of another assignment (a coordinator before a restart)
    assert dep.status == "loading"
    ready(world, dep)
    answer = asyncio.create_task(world.serving.infer(dep, [ROW]))
    (sent, _), = await arrived(world, "dev-a", m.ServeInput)
    world.serving.on_message(world.conns["dev-b"], m.ServeOutput(run_id=dep.id, stage=1, request=sent.request,
                                                                  error="shape mismatch"), b"")
    with pytest.raises(ServeInvalid, match="stage 1 on dev-b: shape mismatch"):
        await answer
    assert dep.status == "ready"  # the deployment serves the next request


async def test_losing_a_device_fails_the_deployment_and_what_it_was_answering(world: World) -> None:
    dep = await deploy(world)
    ready(world, dep)
    answer = asyncio.create_task(world.serving.infer(dep, [ROW]))
    await arrived(world, "dev-a", m.ServeInput)
    world.drop("dev-c")
    with pytest.raises(ServeUnavailable, match="dev-c went offline"):
        await answer
    assert dep.status == "failed"
    await world.serving._records.join()  # the state record is written by a task of the book's
    assert (await world.store.runs.get(dep.id)).state == "failed"


async def test_a_restarted_coordinator_serves_the_deployment_once_its_devices_are_back(world: World) -> None:
    dep = await deploy(world)
    ready(world, dep)
    await world.serving.close()
    assert (await world.store.runs.get(dep.id)).state == "ready"  # a shutdown does not end it
    again = World(world.store, world.blobs, world.user_id)
    for d in DEVICES:
        del again.conns[d]
    again.serving = ServeBook(again.fleet, world.store, again.book, restore_grace=60.0)
    assert await again.serving.restore() == 1
    taken = again.serving.deployments[dep.id]
    assert taken.status == "loading" and taken.restoring
    for d in DEVICES:
        again.connect(d)
    (assign, _), = await arrived(again, "dev-a", m.ServeAssign)
    assert assign.attempt == 1 and not taken.restoring
    ready(again, taken, attempt=1)
    assert taken.status == "ready"
    answer = asyncio.create_task(again.serving.infer(taken, [ROW]))
    (sent, _), = await arrived(again, "dev-a", m.ServeInput)
    assert sent.attempt == 1
    output(again, taken, sent.request, torch.ones(1, 10), attempt=1)
    assert await answer == [[1.0] * 10]
    await again.serving.close()
    await again.book.close()


async def test_a_device_that_does_not_return_after_a_restart_is_named(world: World) -> None:
    dep = await deploy(world)
    await world.serving.close()
    again = World(world.store, world.blobs, world.user_id)
    del again.conns["dev-b"]
    again.serving = ServeBook(again.fleet, world.store, again.book, restore_grace=0.0)
    assert await again.serving.restore() == 1
    await again.serving._tasks.join()  # the restoration ends (its grace is over) and records why
    await again.serving._records.join()
    taken = again.serving.deployments[dep.id]
    assert taken.status == "failed" and "device dev-b did not come back within 0 s" in taken.error
    assert not again.sent("dev-a", m.ServeAssign)
    await again.book.close()


async def test_the_owner_hears_each_deployment_state_once(world: World) -> None:
    from neuranet.server.events import DEPLOYMENT_STATE

    heard, other = world.serving.events.subscribe(world.user_id), world.serving.events.subscribe("someone-else")
    dep = await deploy(world)
    ready(world, dep)
    world.drop("dev-b")
    world.drop("dev-c")  # already failed: no second event
    events = []
    while (e := heard.get_nowait()) is not None:
        events.append(e)
    assert [(e.kind, e.object_id, e.data["state"]) for e in events] == [
        (DEPLOYMENT_STATE, dep.id, s) for s in ("loading", "ready", "failed")]
    assert "dev-b went offline" in events[-1].data["error"] and other.get_nowait() is None
