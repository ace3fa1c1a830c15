"""REST API under ``/api/v1``: tokens, users, devices, history and link tests (bearer auth)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from neuranet.protocol.json_values import JsonValueError, check_json_value
from neuranet.protocol.messages import PROFILE_BOUNDS
from neuranet.api_requests import JoinTokenRequest, LinkTestRequest, TokenRequest, UserRequest
from neuranet.server.edge import refusals
from neuranet.server.deps import FleetDep, HubDep, StoreDep, User
from neuranet.server.fleet import Fleet
from neuranet import api_models as v
from neuranet.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge, Unauthorized
from neuranet.server.store import Principal, Store

router = APIRouter(prefix="/api/v1", responses=refusals(Unauthorized))



async def read_body(request: Request, limit: int, too_big: str) -> bytes:
    """The request body, refused with 413 (``too_big``) as soon as it passes ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(too_big)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise TooLarge(too_big)
    return bytes(body)


@router.get("/me", response_model=v.Me)
async def me(user: User) -> dict[str, Any]:
    return {"user_id": user.user_id, "name": user.name, "is_admin": user.is_admin}


@router.post("/tokens", response_model=v.NewToken, responses=refusals(Invalid, TooLarge))
async def create_token(body: TokenRequest, user: User, store: StoreDep) -> dict[str, str]:
    return {"token": await store.users.create_api_token(user.user_id, body.name, body.expires_in_seconds)}


@router.post("/join-tokens", response_model=v.NewJoinToken, responses=refusals(Invalid, TooLarge))
async def create_join_token(user: User, store: StoreDep, body: JoinTokenRequest | None = None) -> dict[str, Any]:
    token, expires = await store.identity.create_join_token(user.user_id, (body or JoinTokenRequest()).ttl_seconds)
    return {"join_token": token, "expires_at": expires}


@router.post("/users", response_model=v.NewUser, responses=refusals(Forbidden, Conflict, Invalid, TooLarge))
async def create_user(body: UserRequest, user: User, store: StoreDep) -> dict[str, Any]:
    if not user.is_admin:
        raise Forbidden("only an admin can create users")
    created, token = await store.users.create_user(body.name, is_admin=body.is_admin,
                                             token_expires_in=body.token_expires_in_seconds)
    return {"user_id": created.user_id, "name": created.name, "token": token}


def device_view(device: Any, fleet: Fleet) -> dict[str, Any]:
    conn = fleet.connection(device.id)
    return {
        "id": device.id,
        "name": device.name,
        "online": conn is not None,
        "online_since": conn.connected_at if conn else None,
        "last_seen": conn.last_seen if conn else device.last_seen,
        "profile": shown_profile(device.profile),
        "created_at": device.created_at,
    }


def shown_profile(profile: Any) -> dict[str, Any]:
    """A stored profile as shown; one stored before profiles were bounded, that cannot be encoded, shows empty."""
    try:
        return check_json_value(profile, PROFILE_BOUNDS) if isinstance(profile, dict) else {}
    except JsonValueError:
        return {}


async def owned_device(device_id: str, user: Principal, store: Store) -> Any:
    device = await store.devices.get_device(device_id)
    if device is None or device.user_id != user.user_id:
        raise NotFound(f"no device {device_id} among your devices")
    return device


@router.get("/devices", response_model=list[v.DeviceView])
async def list_devices(user: User, store: StoreDep, fleet: FleetDep) -> list[dict[str, Any]]:
    return [device_view(d, fleet) for d in await store.devices.list_devices(user.user_id)]


@router.get("/devices/{device_id}", response_model=v.DeviceView, responses=refusals(NotFound))
async def get_device(device_id: str, user: User, store: StoreDep, fleet: FleetDep) -> dict[str, Any]:
    return device_view(await owned_device(device_id, user, store), fleet)


@router.get("/devices/{device_id}/history", response_model=v.PresenceHistory, responses=refusals(NotFound))
async def device_history(device_id: str, user: User, store: StoreDep, since: float = 0.0) -> dict[str, Any]:
    await owned_device(device_id, user, store)
    intervals = await store.presence.presence_history(device_id, since)
    return {"device_id": device_id, "now": time.time(), "intervals": [{"start": s, "end": e} for s, e in intervals]}


@router.get("/devices/{device_id}/telemetry", response_model=list[v.TelemetryPoint], responses=refusals(NotFound))
async def device_telemetry(device_id: str, user: User, store: StoreDep, limit: int = 100) -> list[dict[str, Any]]:
    await owned_device(device_id, user, store)
    return await store.telemetry.telemetry(device_id, max(1, min(limit, 10_000)))


@router.post("/linktests", response_model=v.LinkTestView, responses=refusals(NotFound, Conflict, Invalid, TooLarge))
async def start_linktest(body: LinkTestRequest, user: User, store: StoreDep, hub: HubDep) -> dict[str, Any]:
    """Ask device ``src`` to send ``total_bytes`` of tensors to ``dst`` through a PeerLink."""
    await owned_device(body.src, user, store)
    await owned_device(body.dst, user, store)
    if body.src == body.dst:
        raise Invalid("src and dst must be different devices")
    for d in (body.src, body.dst):
        if not hub.fleet.online(d):
            raise Conflict(f"device {d} is offline")
    test = hub.start_linktest(user.user_id, body.src, body.dst, body.total_bytes, body.message_bytes)
    return linktest_view(test)


@router.get("/linktests/{test_id}", response_model=v.LinkTestView, responses=refusals(NotFound))
async def get_linktest(test_id: str, user: User, hub: HubDep) -> dict[str, Any]:
    test = hub.linktests.get(test_id)
    if test is None or test.user_id != user.user_id:
        raise NotFound(f"no link test {test_id}")
    return linktest_view(test)


def linktest_view(test: Any) -> dict[str, Any]:
    return {
        "id": test.test_id, "src": test.src, "dst": test.dst, "total_bytes": test.total_bytes,
        "sent_bytes": test.sent_bytes, "path": test.path, "done": test.done, "result": test.result,
    }
