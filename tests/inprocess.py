"""The real coordinator app in-process behind a synchronous httpx transport, for `Client(transport=)`.

`InProcess` runs the ASGI app on an event loop of its own in a thread: `start` runs the app's
lifespan (store, coordinator, background tasks) to startup, each request is the app called through
`httpx.ASGITransport` on that loop, and `stop` runs the lifespan's shutdown. No socket, no
subprocess: a request takes about a millisecond. An exception the app does not handle is raised in
the test (not turned into a 500), so a failing route shows its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from neuranet.client import Client
from neuranet.config import ClientConfig, Limits, ServerConfig

T = TypeVar("T")
ANSWER_WITHIN = 60.0  # seconds a request or the lifespan may take before the test fails


class InProcess(httpx.BaseTransport):
    """An ASGI app as a sync transport, between `start` and `stop` (`running` does both). A client
    closing it, or leaving its ``with``, does not stop the app, so several clients (users) can share it."""

    def __init__(self, app: Any, raise_app_exceptions: bool = True) -> None:
        self.app = app
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inprocess-app", daemon=True)
        self._shutdown: asyncio.Event | None = None
        self._stopped: asyncio.Future[None] | None = None  # the lifespan's shutdown, complete or failed
        self._task: asyncio.Task[None] | None = None
        self.answers: list[tuple[str, str, int]] = []  # (method, path, status) of every request, in order

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(ANSWER_WITHIN)

    def start(self) -> None:
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise

    def stop(self) -> None:
        try:
            self._call(self._stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(ANSWER_WITHIN)
        self._loop.close()

    async def _start(self) -> None:
        """Run the lifespan protocol to startup; the app's lifespan task lives on until `_stop`."""
        self._shutdown = asyncio.Event()
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent_startup = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_startup
            if not sent_startup:
                sent_startup = True
                return {"type": "lifespan.startup"}
            assert self._shutdown is not None
            await self._shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                started.set_result(None)
            elif kind == "lifespan.startup.failed":
                started.set_exception(RuntimeError(f"the app did not start: {message.get('message', '')}"))
            elif kind == "lifespan.shutdown.complete":
                stopped.set_result(None)
            elif kind == "lifespan.shutdown.failed":
                stopped.set_exception(RuntimeError(f"the app did not shut down: {message.get('message', '')}"))

        async def lifespan() -> None:
            try:
                await self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
            except Exception as exc:  # raised after (or instead of) reporting failed: whoever waits sees it
                failure = RuntimeError(f"the app's lifespan raised {exc!r}")
                if not started.done():
                    started.set_exception(failure)
                elif started.exception() is None and not stopped.done():  # it started, then failed
                    stopped.set_exception(failure)

        self._stopped = stopped
        self._task = asyncio.create_task(lifespan(), name="app-lifespan")
        await started

    async def _stop(self) -> None:
        assert self._shutdown is not None and self._stopped is not None and self._task is not None
        self._shutdown.set()
        await self._stopped
        await self._task

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            self.answers.append((request.method, request.url.path, response.status_code))
            return httpx.Response(response.status_code, headers=response.headers, content=body,
                                  extensions=response.extensions)

        return self._call(call())

    def close(self) -> None:
        """A client closing leaves the app running; `stop` stops it."""


@contextlib.contextmanager
def inprocess_app(data_dir: Path, limits: Limits | None = None,
                  **config: Any) -> Iterator[tuple[InProcess, str]]:
    """A coordinator with a fresh SQLite store under ``data_dir``, started: (transport, first admin's token)."""
    from neuranet.server.app import create_app

    tokens: list[str] = []
    settings = dict(forecast_retrain_interval=1e9, file_repair_interval=1e9) | config
    app = create_app(ServerConfig(data_dir=data_dir, limits=limits or Limits(), **settings),
                     on_first_admin=lambda _name, token: tokens.append(token))
    with running(app) as transport:
        yield transport, tokens[0]


@contextlib.contextmanager
def running(app: Any) -> Iterator[InProcess]:
    """``app`` started in-process (its lifespan to startup), stopped (shut down) on leaving."""
    transport = InProcess(app)
    transport.start()
    try:
        yield transport
    finally:
        transport.stop()


def client(transport: InProcess, token: str) -> Client:
    """A `Client` that speaks to the in-process app as the holder of ``token``."""
    return Client(ClientConfig(server_url="http://coordinator.test", token=token), transport=transport)
