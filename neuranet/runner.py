"""How NeuraNet runs a long-lived service (server, agent): allocator settings, then uvloop if present."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from neuranet.allocator import keep_large_buffers

T = TypeVar("T")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion the way the CLI runs the coordinator and agents."""
    keep_large_buffers()
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; plain asyncio works too
        return asyncio.run(main)
    return uvloop.run(main)
