"""REST for training runs: start one across your devices, follow it, fetch its weights."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response

from neuranet.server.api import HubDep, StoreDep, User, device_view
from neuranet.server.runs import RunError, RunRequest

router = APIRouter(prefix="/api/v1/runs")


async def _devices_for(req: RunRequest, user: Any, store: Any, hub: Any) -> list[dict[str, Any]]:
    mine = [device_view(d, hub) for d in await store.list_devices(user.user_id)]
    online = [d for d in mine if d["online"]]
    if isinstance(req.devices, list):
        chosen = []
        for want in req.devices:
            match = [d for d in mine if want in (d["id"], d["name"])]
            if not match:
                raise HTTPException(404, f"no device {want!r} among your devices")
            if not match[0]["online"]:
                raise HTTPException(409, f"device {match[0]['name']} is offline")
            chosen.append(match[0])
        return chosen
    fastest = sorted(online, key=lambda d: -(d["profile"].get("cpu_gflops") or 0))
    if isinstance(req.devices, int):
        if req.devices > len(online):
            raise HTTPException(409, f"{req.devices} devices asked for, but only {len(online)} of yours are online")
        return fastest[: req.devices]
    if not online:
        raise HTTPException(409, "none of your devices is online")
    return fastest


@router.post("")
async def start_run(req: RunRequest, user: User, store: StoreDep, hub: HubDep) -> dict[str, Any]:
    devices = await _devices_for(req, user, store, hub)
    try:
        run = await hub.runs.start(user.user_id, req, devices)
    except RunError as exc:
        raise HTTPException(422, str(exc)) from None
    return run.view()


def _run_of(run_id: str, user: Any, hub: Any) -> Any:
    run = hub.runs.runs.get(run_id)
    if run is None or run.user_id != user.user_id:
        raise HTTPException(404, f"no run {run_id}")
    return run


@router.get("/{run_id}")
async def get_run(run_id: str, user: User, hub: HubDep) -> dict[str, Any]:
    return _run_of(run_id, user, hub).view()


@router.get("/{run_id}/weights")
async def get_weights(run_id: str, user: User, hub: HubDep) -> Response:
    run = _run_of(run_id, user, hub)
    if run.status != "finished":
        raise HTTPException(409, f"run {run_id} is {run.status}; weights are ready when it has finished")
    return Response(hub.runs.merged_weights(run_id), media_type="application/octet-stream")
