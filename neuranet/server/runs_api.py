"""REST for runs across your devices: training runs (start, follow, fetch weights) and deployments
that serve a model for inference (deploy, infer, generate, stop)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response

from neuranet.server.api import device_view
from neuranet.server.deps import FleetDep, RunsDep, ServingDep, StoreDep, User
from neuranet import api_models as v
from neuranet.errors import BadUpstream, Conflict, Invalid, NotFound, TimedOut, TooLarge, Unauthorized, Unavailable
from neuranet.server.edge import BINARY, refusals
from neuranet.api_requests import DeployRequest, GenerateRequest, InferRequest, RunRequest
from neuranet.server.runs import RunError
from neuranet.server.serving import ServeError

router = APIRouter(prefix="/api/v1/runs", responses=refusals(Unauthorized))
serve_router = APIRouter(prefix="/api/v1/deployments", responses=refusals(Unauthorized))


async def _devices_for(req: RunRequest | DeployRequest, user: Any, store: Any, fleet: Any) -> list[dict[str, Any]]:
    mine = [device_view(d, fleet) for d in await store.devices.list_devices(user.user_id)]
    online = [d for d in mine if d["online"]]
    if isinstance(req.devices, list):
        chosen = []
        for want in req.devices:
            match = [d for d in mine if want in (d["id"], d["name"])]
            if not match:
                raise NotFound(f"no device {want!r} among your devices")
            if not match[0]["online"]:
                raise Conflict(f"device {match[0]['name']} is offline")
            chosen.append(match[0])
        return chosen
    fastest = sorted(online, key=lambda d: -(d["profile"].get("cpu_gflops") or 0))
    if isinstance(req.devices, int):
        if req.devices > len(online):
            raise Conflict(f"{req.devices} devices asked for, but only {len(online)} of yours are online")
        return fastest[: req.devices]
    if not online:
        raise Conflict("none of your devices is online")
    return fastest


def _known_model(req: RunRequest) -> None:
    """A model that is neither built in nor the user's own is refused before devices are chosen: the
    request is wrong whichever devices are online."""
    from neuranet.pipeline.models import MODELS

    if req.user_model is None and req.model not in MODELS:
        raise RunError(f"unknown model {req.model!r}; built-in models are: {', '.join(sorted(MODELS))}")


@router.post("", response_model=v.RunView, responses=refusals(NotFound, Conflict, Invalid, TooLarge))
async def start_run(req: RunRequest, user: User, store: StoreDep, fleet: FleetDep, runs: RunsDep) -> dict[str, Any]:
    _known_model(req)
    devices = await _devices_for(req, user, store, fleet)
    run = await runs.start(user.user_id, req, devices)
    return run.view()


MAX_RUNS_LISTED = 1000


@router.get("", response_model=list[v.RunSummary])
async def list_runs(user: User, store: StoreDep, runs: RunsDep, serving: ServingDep,
                    limit: int = Query(100, ge=1, le=MAX_RUNS_LISTED)) -> list[dict[str, Any]]:
    """Your runs and deployments, newest first: id, kind, model, state, devices, step, created (state
    "unknown": recorded by a coordinator too old to keep runs' state)."""
    names = {d.id: d.name for d in await store.devices.list_devices(user.user_id)}
    out = []
    for row, device_ids in await store.runs.list_runs(user.user_id, limit):
        live = (runs.runs if row.kind == "train" else serving.deployments).get(row.id)
        entry: dict[str, Any] = {"id": row.id, "kind": row.kind, "created": row.created_at, "model": None,
                                 "state": "unknown", "step": None, "steps": None,
                                 "devices": [names.get(d, d) for d in device_ids]}
        if live is not None:
            entry.update(state=live.status, devices=[names.get(s["device"], s["device"]) for s in live.stages])
            if row.kind == "train":
                entry.update(model=live.request.model, step=len(live.losses), steps=live.request.steps)
            else:
                entry.update(model=live.model)
        elif row.state is not None:  # ended before this coordinator started: as its record says
            spec = row.spec or {}
            request = spec.get("request") or {}
            entry.update(state=row.state, model=request.get("model") or spec.get("model"), steps=request.get("steps"))
        out.append(entry)
    return out


async def _run_of(run_id: str, user: Any, runs: Any) -> Any:
    run = await runs.find(run_id)
    if run is None or run.user_id != user.user_id:
        raise NotFound(f"no run {run_id}")
    return run


@router.get("/{run_id}", response_model=v.RunView, responses=refusals(NotFound))
async def get_run(run_id: str, user: User, runs: RunsDep) -> dict[str, Any]:
    return (await _run_of(run_id, user, runs)).view()


@router.get("/{run_id}/weights", response_class=Response, responses={**BINARY, **refusals(NotFound, Conflict)})
async def get_weights(run_id: str, user: User, runs: RunsDep) -> Response:
    run = await _run_of(run_id, user, runs)
    if run.status != "finished":
        raise Conflict(f"run {run_id} is {run.status}; weights are ready when it has finished")
    return Response(await runs.merged_weights(run_id), media_type="application/octet-stream")


@serve_router.post("", response_model=v.DeploymentView,
                   responses=refusals(NotFound, Conflict, Invalid, TooLarge, Unavailable, TimedOut))
async def deploy(req: DeployRequest, user: User, store: StoreDep, fleet: FleetDep, serving: ServingDep) -> dict[str, Any]:
    devices = await _devices_for(req, user, store, fleet)
    dep = await serving.start(user.user_id, req, devices)
    return dep.view()


def _deployment_of(dep_id: str, user: Any, serving: Any) -> Any:
    dep = serving.deployments.get(dep_id)
    if dep is None or dep.user_id != user.user_id:
        raise NotFound(f"no deployment {dep_id}")
    return dep


@serve_router.get("/{dep_id}", response_model=v.DeploymentView, responses=refusals(NotFound))
async def get_deployment(dep_id: str, user: User, serving: ServingDep, wait: float = 0.0) -> dict[str, Any]:
    """The deployment; ``wait`` > 0 waits up to that many seconds (at most 60) for it to finish loading."""
    dep = _deployment_of(dep_id, user, serving)
    if wait > 0 and dep.status == "loading":
        try:
            await serving.wait_ready(dep, min(wait, 60.0))
        except ServeError:
            pass  # the view says why
    return dep.view()


SERVE_REFUSALS = refusals(NotFound, Invalid, TooLarge, Unavailable, TimedOut, BadUpstream)


@serve_router.post("/{dep_id}/infer", response_model=v.InferResult, responses=SERVE_REFUSALS)
async def infer(dep_id: str, req: InferRequest, user: User, serving: ServingDep) -> dict[str, Any]:
    dep = _deployment_of(dep_id, user, serving)
    return {"outputs": await serving.infer(dep, req.inputs)}


@serve_router.post("/{dep_id}/generate", response_model=v.Generated, responses=SERVE_REFUSALS)
async def generate(dep_id: str, req: GenerateRequest, user: User, serving: ServingDep) -> dict[str, Any]:
    dep = _deployment_of(dep_id, user, serving)
    return {"text": await serving.generate(dep, req)}


@serve_router.delete("/{dep_id}", response_model=v.DeploymentView, responses=refusals(NotFound))
async def stop_deployment(dep_id: str, user: User, serving: ServingDep) -> dict[str, Any]:
    dep = _deployment_of(dep_id, user, serving)
    serving.stop(dep)
    return dep.view()
