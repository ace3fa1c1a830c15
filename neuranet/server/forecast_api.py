"""REST for availability forecasts and trace imports."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from neuranet.server.api import HubDep, StoreDep, User, owned_device, read_body

router = APIRouter(prefix="/api/v1")
MAX_TRACE_BYTES = 64 * 1024 * 1024


async def _forecast(device: Any, store: Any, hub: Any) -> dict[str, Any]:
    from neuranet.forecast.errors import ForecastError

    try:
        return await hub.forecasts.forecast(device, await store.presence_history(device.id))
    except ForecastError as exc:
        raise HTTPException(422, f"cannot forecast {device.name}: {exc}") from None


@router.get("/devices/{device_id}/forecast")
async def device_forecast(device_id: str, user: User, store: StoreDep, hub: HubDep) -> dict[str, Any]:
    """P(online) 15 min, 1 h, 6 h and 24 h ahead, expected remaining online time, recent history."""
    return await _forecast(await owned_device(device_id, user, store), store, hub)


@router.get("/forecast")
async def all_forecasts(user: User, store: StoreDep, hub: HubDep, simulated: bool = True) -> list[dict[str, Any]]:
    devices = await store.list_devices(user.user_id)
    return [await _forecast(d, store, hub) for d in devices
            if simulated or not (d.profile or {}).get("simulated")]


@router.post("/forecast/retrain")
async def retrain(user: User, hub: HubDep) -> dict[str, Any]:
    """Retrain the forecaster now on every device's history (admin; it also retrains on a schedule)."""
    from neuranet.forecast.errors import ForecastError

    if not user.is_admin:
        raise HTTPException(403, "only an admin can retrain the forecaster")
    try:
        return await hub.forecasts.retrain()
    except ForecastError as exc:
        raise HTTPException(409, str(exc)) from None


@router.post("/traces")
async def import_trace(request: Request, user: User, store: StoreDep, hub: HubDep,
                       prefix: str = "trace") -> dict[str, Any]:
    """Import an availability trace (CSV: client_id,event_type,event_start,event_end) as simulated devices."""
    from neuranet.forecast.errors import ForecastError
    from neuranet.forecast.features import UNIX_CLOCK_OFFSET
    from neuranet.forecast.trace import parse_trace
    from neuranet.server.forecasting import import_trace_devices

    if not 1 <= len(prefix) <= 40:
        raise HTTPException(422, "prefix must be 1 to 40 characters")
    body = await read_body(request, MAX_TRACE_BYTES, f"a trace may be at most {MAX_TRACE_BYTES // 2**20} MiB")
    try:
        text = body.decode()
        trace = await asyncio.to_thread(parse_trace, text, "uploaded trace")
    except UnicodeDecodeError:
        raise HTTPException(422, "the trace must be UTF-8 CSV text") from None
    except ForecastError as exc:
        raise HTTPException(422, str(exc)) from None
    if not len(trace):
        raise HTTPException(422, "the trace has no rows")
    devices = import_trace_devices(trace, time.time(), UNIX_CLOCK_OFFSET, prefix)
    ids = await store.add_simulated_devices(user.user_id, devices)
    return {"devices": len(ids), "ids": ids, "history_end": devices[0][1]["history_end"],
            "days": (trace.end - trace.start) / 86400}
