"""Helpers for integration tests that run real coordinator and agent processes."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable

from neuranet.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(predicate: Callable[[], Any], deadline: float, timeout: float, what: str) -> Any:
    value = predicate()
    if not value and time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
    return value


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, what)):
        time.sleep(0.1)
    return value


async def async_wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """The same, yielding to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, what)):
        await asyncio.sleep(0.05)
    return value


def device_by_name(client: Client, name: str) -> dict[str, Any]:
    return next(d for d in client.devices() if d["name"] == name)


def run_linktest(client: Client, src: str, dst: str, total: int = 8 << 20, msg: int = 1 << 20,
                 timeout: float = 60.0) -> dict[str, Any]:
    state = client.start_linktest(src, dst, total, msg)
    deadline = time.monotonic() + timeout
    while not state["done"]:
        assert time.monotonic() < deadline, f"link test {state} did not finish"
        time.sleep(0.1)
        state = client.linktest(state["id"])
    return state["result"]
