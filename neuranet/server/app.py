"""The coordinator's ASGI app: REST API, the agent WebSocket and owned background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

from fastapi import FastAPI, WebSocket
from sqlalchemy.engine import make_url

from neuranet import __version__
from neuranet.config import ServerConfig
from neuranet.server.agent_endpoint import serve_agent
from neuranet.server.api import router
from neuranet.server.runs_api import router as runs_router
from neuranet.server.runs_api import serve_router
from neuranet.server.files_api import router as files_router
from neuranet.server.forecast_api import router as forecast_router
from neuranet.server.hub import Hub
from neuranet.server.identity import CoordinatorIdentity, agent_pin
from neuranet.server.store import Store

log = logging.getLogger("neuranet.server")

FirstAdmin = Callable[[str, str], None]  # (user name, API token)


def create_app(config: ServerConfig, on_first_admin: FirstAdmin | None = None, store: Store | None = None,
               identity: CoordinatorIdentity | None = None) -> FastAPI:
    """Build the app. The lifespan owns the store (``open_store``'s, or one it opens) and closes it.
    ``identity`` is the key the coordinator proves itself with (default: the one in its data dir)."""
    identity = identity or CoordinatorIdentity.load_or_create(config.data_dir)
    pin = agent_pin(config.tls_cert, identity)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal store
        store = store or await open_store(config)
        closed = await store.close_stale_presence()
        if closed:
            log.info("closed %d presence intervals left open by the last run", closed)
        if await store.user_count() == 0:
            _, token = await store.create_user("admin", is_admin=True)
            if on_first_admin:
                on_first_admin("admin", token)
        hub = Hub(config, store)
        app.state.store, app.state.hub = store, hub
        maintain = asyncio.create_task(hub.maintain(), name="hub-maintain")
        repair = asyncio.create_task(hub.files.maintain(), name="file-repair")
        await hub.forecasts.start()
        try:
            yield
        finally:
            maintain.cancel()
            repair.cancel()
            await asyncio.gather(maintain, repair, return_exceptions=True)
            await hub.forecasts.close()
            await hub.shutdown()
            await store.close()

    app = FastAPI(title="NeuraNet coordinator", version=__version__, lifespan=lifespan)
    app.include_router(router)
    app.include_router(runs_router)
    app.include_router(serve_router)
    app.include_router(forecast_router)
    app.include_router(files_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        # fingerprint: what agents pass as --server-fingerprint (None: a CA vouches for the certificate).
        return {"ok": True, "version": __version__, "online_devices": len(app.state.hub.conns),
                "fingerprint": pin, "coordinator_key": identity.fingerprint}

    @app.websocket("/agent")
    async def agent_socket(ws: WebSocket) -> None:
        await serve_agent(ws, app.state.hub, identity)

    return app


class StartupError(Exception):
    """The coordinator cannot start as configured; the message says what to fix."""


async def open_store(config: ServerConfig) -> Store:
    """Create the data dirs and open the database at the newest schema, or explain why not."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.blob_dir.mkdir(parents=True, exist_ok=True)
    shown = make_url(config.database_url).render_as_string(hide_password=True) if "://" in config.database_url else config.database_url
    try:
        store = Store(config.database_url)
    except Exception as exc:  # SQLAlchemy raises several types for a bad URL or a missing driver
        raise StartupError(f"cannot use the database URL {shown}: {exc}") from None
    try:
        await store.migrate()
    except Exception as exc:
        await store.close()
        raise StartupError(f"cannot open the database at {shown}: {exc}") from None
    return store
