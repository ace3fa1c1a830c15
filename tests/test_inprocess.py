"""The in-process transport runs an app's lifespan around its requests and reports a failed start."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from inprocess import running


def _app(events: list[str], fail: bool = False, fail_stopping: bool = False) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if fail:
            raise OSError("no database")
        events.append("started")
        yield
        if fail_stopping:
            raise OSError("cannot flush")
        events.append("stopped")

    app = FastAPI(lifespan=lifespan)

    @app.get("/events")
    async def seen() -> list[str]:
        return events

    return app


def test_requests_run_between_startup_and_shutdown() -> None:
    events: list[str] = []
    with running(_app(events)) as transport:
        with httpx.Client(transport=transport, base_url="http://app.test") as http:
            assert http.get("/events").json() == ["started"]
        with httpx.Client(transport=transport, base_url="http://app.test") as http:  # a closed client left it up
            assert http.get("/events").status_code == 200
    assert events == ["started", "stopped"]


def test_a_lifespan_that_fails_fails_the_start() -> None:
    with pytest.raises(RuntimeError, match="no database"), running(_app([], fail=True)):
        pass


def test_a_lifespan_that_fails_stopping_fails_the_stop() -> None:
    events: list[str] = []
    with pytest.raises(RuntimeError, match="cannot flush"), running(_app(events, fail_stopping=True)):
        pass
    assert events == ["started"]
