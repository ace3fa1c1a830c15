"""What a route may ask for (FastAPI dependencies): the caller, the store, the hub, the fleet and each book.

Every part comes from the app's :class:`~neuranet.server.coordinator.Coordinator`, so a route names
only what it uses and a test can hand in a coordinator of its own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from neuranet.config import ServerConfig
from neuranet.errors import Unauthorized
from neuranet.server.coordinator import Coordinator
from neuranet.server.events import EventBus
from neuranet.server.files import FileBook
from neuranet.server.fleet import Fleet
from neuranet.server.forecasting import ForecastService
from neuranet.server.hub import Hub
from neuranet.server.runs import RunBook
from neuranet.server.serving import ServeBook
from neuranet.server.store import Principal, Store

_bearer = HTTPBearer(auto_error=False)


def coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


def get_store(request: Request) -> Store:
    return request.app.state.store


async def principal(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if creds is None:
        raise Unauthorized("missing bearer token: pass `Authorization: Bearer <token>`")
    who = await get_store(request).users.authenticate(creds.credentials)
    if who is None:
        raise Unauthorized("invalid API token: unknown, expired or revoked")
    return who


User = Annotated[Principal, Depends(principal)]
StoreDep = Annotated[Store, Depends(get_store)]


def get_hub(request: Request) -> Hub:
    return coordinator(request).hub


def get_fleet(request: Request) -> Fleet:
    return coordinator(request).fleet


def get_runs(request: Request) -> RunBook:
    return coordinator(request).runs


def get_serving(request: Request) -> ServeBook:
    return coordinator(request).serving


def get_files(request: Request) -> FileBook:
    return coordinator(request).files


def get_forecasts(request: Request) -> ForecastService:
    return coordinator(request).forecasts


def get_events(request: Request) -> EventBus:
    return coordinator(request).events


def get_config(request: Request) -> ServerConfig:
    return coordinator(request).config


HubDep = Annotated[Hub, Depends(get_hub)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
RunsDep = Annotated[RunBook, Depends(get_runs)]
ServingDep = Annotated[ServeBook, Depends(get_serving)]
FilesDep = Annotated[FileBook, Depends(get_files)]
ForecastsDep = Annotated[ForecastService, Depends(get_forecasts)]
ConfigDep = Annotated[ServerConfig, Depends(get_config)]
EventsDep = Annotated[EventBus, Depends(get_events)]
