"""REST for taking rights back: list and revoke API tokens, remove devices, disable users (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from neuranet.server.deps import HubDep, StoreDep, User
from neuranet import api_models as v
from neuranet.errors import Conflict, Forbidden, NotFound, Unauthorized
from neuranet.server.edge import refusals

router = APIRouter(prefix="/api/v1", responses=refusals(Unauthorized))


@router.get("/tokens", response_model=list[v.TokenView])
async def list_tokens(user: User, store: StoreDep) -> list[dict[str, Any]]:
    """Your API tokens (never their secrets); ``current`` marks the one this request came with."""
    return [{"id": t.id, "name": t.name, "created_at": t.created_at, "expires_at": t.expires_at,
             "current": t.id == user.token_id} for t in await store.users.list_tokens(user.user_id)]


@router.delete("/tokens/{token_id}", response_model=v.TokenRevoked, responses=refusals(NotFound))
async def revoke_token(token_id: str, user: User, store: StoreDep) -> dict[str, Any]:
    row = await store.users.revoke_token(user.user_id, token_id)
    return {"revoked": row.id, "name": row.name}


@router.delete("/devices/{device_id}", response_model=v.DeviceRemoved, responses=refusals(NotFound, Conflict))
async def remove_device(device_id: str, user: User, store: StoreDep, hub: HubDep, force: bool = False) -> dict[str, Any]:
    """Forget one of your devices: its key is refused from now on, its connection is closed, and the
    chunks it held are copied to your other devices (409 while it holds the only copy, unless ``force``)."""
    removed = await store.identity.remove_device(user.user_id, device_id, force)
    await hub.disconnect_device(device_id, "this device was removed by its owner")
    return {"removed": removed.device_id, "name": removed.name, "replicas": removed.replicas,
            "sole_copies": removed.sole_copies}


@router.get("/users", response_model=list[v.UserView], responses=refusals(Forbidden))
async def list_users(user: User, store: StoreDep) -> list[dict[str, Any]]:
    _admin(user)
    return [{"id": u.id, "name": u.name, "is_admin": u.is_admin, "disabled": u.disabled, "created_at": u.created_at}
            for u in await store.users.list_users()]


@router.post("/users/{name}/disable", response_model=v.UserDisabled, responses=refusals(Forbidden, NotFound, Conflict))
async def disable_user(name: str, user: User, store: StoreDep, hub: HubDep) -> dict[str, Any]:
    """Refuse a user's tokens and devices from now on, and close its devices' connections."""
    _admin(user)
    if name == user.name:
        raise Conflict("you cannot disable yourself; ask another admin")
    target = await _set_disabled(store, name, True)
    await hub.disconnect_user(target.id, "the owner of this device was disabled on this coordinator")
    return {"name": target.name, "disabled": True}


@router.post("/users/{name}/enable", response_model=v.UserDisabled, responses=refusals(Forbidden, NotFound))
async def enable_user(name: str, user: User, store: StoreDep) -> dict[str, Any]:
    _admin(user)
    target = await _set_disabled(store, name, False)
    return {"name": target.name, "disabled": False}


def _admin(user: Any) -> None:
    if not user.is_admin:
        raise Forbidden("only an admin can manage users")


async def _set_disabled(store: Any, name: str, disabled: bool) -> Any:
    return await store.users.set_user_disabled(name, disabled)
