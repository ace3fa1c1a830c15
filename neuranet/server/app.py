"""The coordinator's ASGI app: REST API, the agent WebSocket and owned background tasks."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable

from fastapi import FastAPI, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import make_url

from neuranet import __version__
from neuranet.api_models import Health
from neuranet.config import Limits, ServerConfig
from neuranet.server.agent_endpoint import serve_agent
from neuranet.server.api import router
from neuranet.errors import NeuraNetError
from neuranet.server.edge import BodyLimit, document_body_refusals, domain_error, validation_error
from neuranet.server.events_api import router as events_router
from neuranet.server.runs_api import router as runs_router
from neuranet.server.runs_api import serve_router
from neuranet.server.files_api import router as files_router
from neuranet.server.forecast_api import MAX_TRACE_BYTES
from neuranet.server.forecast_api import router as forecast_router
from neuranet.server.identity_api import router as identity_router
from neuranet.server.coordinator import Coordinator
from neuranet.server.identity import CoordinatorIdentity, agent_pin
from neuranet.server.store import Store
from neuranet.storage.chunks import MAX_CHUNK_SIZE

log = logging.getLogger("neuranet.server")

FirstAdmin = Callable[[str, str], None]  # (user name, API token)
SWAGGER_UI = "/static/swagger-ui"  # Swagger UI's files, served from the swagger-ui-bundle package


def body_limit(limits: Limits) -> Callable[[str, str], int]:
    """(method, path) -> the largest request body accepted: a chunk or a trace upload has its own size,
    everything else is JSON."""

    def limit(method: str, path: str) -> int:
        if method == "PUT" and path.startswith("/api/v1/chunks/"):
            return MAX_CHUNK_SIZE
        if method == "POST" and path == "/api/v1/traces":
            return MAX_TRACE_BYTES
        return limits.max_json_body_bytes

    return limit


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
        closed = await store.presence.close_stale_presence()
        if closed:
            log.info("closed %d presence intervals left open by the last run", closed)
        if await store.users.user_count() == 0:
            _, token = await store.users.create_user("admin", is_admin=True)
            if on_first_admin:
                on_first_admin("admin", token)
        coordinator = Coordinator(config, store)
        app.state.store, app.state.coordinator = store, coordinator
        await coordinator.start()
        try:
            yield
        finally:
            await coordinator.close()
            await store.close()

    # /docs is served from the package, not a CDN, so it works offline (ReDoc has no packaged copy)
    app = FastAPI(title="NeuraNet coordinator", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit_for=body_limit(config.limits),
                       buffer_limit=config.limits.max_json_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(NeuraNetError, domain_error)
    app.include_router(router)
    app.include_router(runs_router)
    app.include_router(serve_router)
    app.include_router(forecast_router)
    app.include_router(files_router)
    app.include_router(identity_router)
    app.include_router(events_router)

    _serve_docs(app)
    openapi = app.openapi
    app.openapi = lambda: document_body_refusals(openapi())  # type: ignore[method-assign]

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, object]:
        # fingerprint: what agents pass as --server-fingerprint (None: a CA vouches for the certificate).
        return {"ok": True, "version": __version__, "online_devices": len(app.state.coordinator.fleet.online_ids()),
                "fingerprint": pin, "coordinator_key": identity.fingerprint}

    @app.websocket("/agent")
    async def agent_socket(ws: WebSocket) -> None:
        await serve_agent(ws, app.state.coordinator.hub, identity)

    return app


def _serve_docs(app: FastAPI) -> None:
    from swagger_ui_bundle import swagger_ui_path

    app.mount(SWAGGER_UI, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png")


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
