"""REST for availability forecasts and trace imports."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Query, Request

from neuranet.server.api import owned_device, read_body
from neuranet.server.deps import ConfigDep, ForecastsDep, StoreDep, User
from neuranet import api_models as v
from neuranet.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge, Unauthorized
from neuranet.server.edge import refusals

router = APIRouter(prefix="/api/v1", responses=refusals(Unauthorized))
MAX_TRACE_BYTES = 64 * 1024 * 1024


async def _forecast(device: Any, store: Any, forecasts: Any) -> dict[str, Any]:
    from neuranet.forecast.errors import ForecastError

    try:
        return await forecasts.forecast(device, await store.presence.presence_history(device.id))
    except ForecastError as exc:
        raise Invalid(f"cannot forecast {device.name}: {exc}") from None


@router.get("/devices/{device_id}/forecast", response_model=v.Forecast, responses=refusals(NotFound, Invalid))
async def device_forecast(device_id: str, user: User, store: StoreDep, forecasts: ForecastsDep) -> dict[str, Any]:
    """P(online) 15 min, 1 h, 6 h and 24 h ahead, expected remaining online time, recent history."""
    return await _forecast(await owned_device(device_id, user, store), store, forecasts)


@router.get("/forecast", response_model=list[v.Forecast], responses=refusals(Invalid))
async def all_forecasts(user: User, store: StoreDep, forecasts: ForecastsDep, simulated: bool = True) -> list[dict[str, Any]]:
    devices = await store.devices.list_devices(user.user_id)
    return [await _forecast(d, store, forecasts) for d in devices
            if simulated or not (d.profile or {}).get("simulated")]


@router.post("/forecast/retrain", response_model=v.ForecasterInfo, responses=refusals(Forbidden, Conflict))
async def retrain(user: User, forecasts: ForecastsDep) -> dict[str, Any]:
    """Retrain the forecaster now on every device's history (admin; it also retrains on a schedule)."""
    from neuranet.forecast.errors import ForecastError

    if not user.is_admin:
        raise Forbidden("only an admin can retrain the forecaster")
    try:
        return await forecasts.retrain()
    except ForecastError as exc:
        raise Conflict(str(exc)) from None


TracePrefixQuery = Query("trace", min_length=1, max_length=40, description="Name prefix of the simulated devices.")


@router.post("/traces", response_model=v.TraceImported, responses=refusals(Invalid, Conflict, TooLarge))
async def import_trace(request: Request, user: User, store: StoreDep, config: ConfigDep, prefix: str = TracePrefixQuery,
                       replace: bool = False) -> dict[str, Any]:
    """Import an availability trace (CSV: client_id,event_type,event_start,event_end) as simulated devices.

    A trace imported under the same ``prefix`` before is refused (409) unless ``replace``, which swaps
    its devices for the new ones."""
    from neuranet.forecast.errors import ForecastError
    from neuranet.forecast.features import UNIX_CLOCK_OFFSET
    from neuranet.forecast.trace import parse_trace
    from neuranet.server.forecasting import import_trace_devices, trace_prefix_of

    body = await read_body(request, MAX_TRACE_BYTES, f"a trace may be at most {MAX_TRACE_BYTES // 2**20} MiB")
    try:
        text = body.decode()
        trace = await asyncio.to_thread(parse_trace, text, "uploaded trace")
    except UnicodeDecodeError:
        raise Invalid("the trace must be UTF-8 CSV text") from None
    except ForecastError as exc:
        raise Invalid(str(exc)) from None
    if not len(trace):
        raise Invalid("the trace has no rows")
    limit = config.limits.max_trace_devices_per_user
    if len(trace) > limit:
        raise Invalid(f"the trace has {len(trace)} hosts; a user may have at most {limit} simulated devices")
    devices = import_trace_devices(trace, time.time(), UNIX_CLOCK_OFFSET, prefix)
    ids = await store.traces.add_simulated_devices(user.user_id, devices, prefix_of=trace_prefix_of, prefix=prefix,
                                            replace=replace, limit=limit)
    return {"devices": len(ids), "ids": ids, "history_end": devices[0][1]["history_end"],
            "days": (trace.end - trace.start) / 86400, "prefix": prefix}


@router.get("/traces", response_model=list[v.TraceSummary])
async def list_traces(user: User, store: StoreDep) -> list[dict[str, Any]]:
    """The traces you imported: prefix, how many simulated devices, and when their history ends."""
    from neuranet.server.forecasting import trace_prefix_of

    found: dict[str, dict[str, Any]] = {}
    for d in await store.devices.list_devices(user.user_id):
        prefix = trace_prefix_of(d.name, d.profile)
        if prefix is not None:
            entry = found.setdefault(prefix, {"prefix": prefix, "devices": 0, "history_end": d.last_seen})
            entry["devices"] += 1
            entry["history_end"] = max(entry["history_end"] or 0.0, d.last_seen or 0.0)
    return [found[p] for p in sorted(found)]


@router.delete("/traces/{prefix}", response_model=v.TraceRemoved, responses=refusals(NotFound))
async def remove_trace(prefix: str, user: User, store: StoreDep) -> dict[str, Any]:
    """Remove the simulated devices (and their history) of the trace imported as ``prefix``."""
    from neuranet.server.forecasting import trace_prefix_of

    removed = await store.traces.remove_simulated_devices(user.user_id, prefix, trace_prefix_of)
    if not removed:
        raise NotFound(f"no trace imported as {prefix!r} among your devices")
    return {"prefix": prefix, "removed": removed}
