"""``GET /api/v1/events``: the caller's events as server-sent events, bounded per client.

The stream is ``text/event-stream``: each change an ``id:`` (its sequence number, what a client
sends back as ``Last-Event-ID`` to resume), an ``event:`` (its kind) and one JSON ``data:`` line; a
comment every ``event_keepalive`` seconds keeps proxies and clients from timing out, and at each the
caller's token is checked again, so a revoked token ends its stream. A client that does not read
fast enough is dropped (see ``events.py``); one that reads nothing at all is cut off
``DROP_GRACE`` seconds later, since its last events cannot reach it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.security import HTTPAuthorizationCredentials
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from neuranet.server.deps import ConfigDep, EventsDep, StoreDep, User, _bearer
from neuranet.errors import Invalid, Unauthorized
from neuranet.server.edge import refusals
from neuranet.server.events import FAMILIES, KINDS, Subscription, parse_kinds

router = APIRouter(prefix="/api/v1", responses=refusals(Unauthorized))
log = logging.getLogger("neuranet.events")

KEEPALIVE = b": keepalive\n\n"
DROP_GRACE = 5.0  # seconds a dropped stream's last events get to go out before the connection is cut
STREAM_DOC = {200: {"description": "Server-sent events (`id:`, `event:` kind, `data:` JSON `{seq, kind, object_id, "
                                   "at, data}`) until the client leaves or is dropped",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
StillAllowed = Callable[[], Awaitable[bool]]


class EventStream(Response):
    """A subscription written out until the client leaves, the subscription ends, or the login is revoked."""

    media_type = "text/event-stream"

    def __init__(self, sub: Subscription, keepalive: float, still_allowed: StillAllowed,
                 drop_grace: float = DROP_GRACE, status_code: int = 200) -> None:
        # No body: init_headers then sets no Content-Length (the stream has none), as for a StreamingResponse.
        self.status_code = status_code
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.sub = sub
        self.keepalive = keepalive
        self.still_allowed = still_allowed
        self.drop_grace = drop_grace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.create_task(self._write(send), name="event-stream")
        gone = asyncio.create_task(_until_disconnect(receive), name="event-stream-disconnect")
        ended = asyncio.create_task(self.sub.wait_closed(), name="event-stream-ended")
        try:
            await asyncio.wait({writer, gone, ended}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done() and not writer.done() and not gone.done():
                # Ended (dropped, or the server stopping): what is queued may still go out, for a while.
                await asyncio.wait({writer, gone}, timeout=self.drop_grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, gone, ended):
                task.cancel()
            await asyncio.gather(writer, gone, ended, return_exceptions=True)
            self.sub.close()
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            log.warning("event stream of user %s failed: %s", self.sub.user_id, writer.exception())
        # A writer cut off mid-stream leaves the response unfinished: the server then closes the connection.

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})  # headers out now
        while True:
            try:
                event = await self.sub.next(timeout=self.keepalive)
            except StopAsyncIteration:
                break
            if event is None:
                if not await self.still_allowed():
                    break
                chunk = KEEPALIVE
            else:
                chunk = event.sse()
                while len(chunk) < 64 * 1024 and (more := self.sub.get_nowait()) is not None:
                    chunk += more.sse()  # what already waits goes out in one write
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _resume_after(last_event_id: str | None) -> int | None:
    """The sequence number in a Last-Event-ID header; anything else resumes nothing (a fresh stream)."""
    text = (last_event_id or "").strip()
    return int(text) if text.isdigit() and len(text) <= 19 else None


@router.get("/events", response_class=EventStream, responses={**STREAM_DOC, **refusals(Invalid)})  # type: ignore[arg-type]
async def events(user: User, bus: EventsDep, store: StoreDep, config: ConfigDep,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                 kinds: Annotated[str | None, Query(max_length=512, description=(
                     "comma-separated kinds or families to receive (default: all): "
                     + ", ".join(sorted(KINDS | FAMILIES))))] = None,
                 last_event_id: Annotated[str | None, Header(max_length=64)] = None) -> EventStream:
    """Your devices, runs, deployments and files as they change (and forecast refreshes), as server-sent events."""
    wanted = parse_kinds(kinds)
    sub = bus.subscribe(user.user_id, wanted, _resume_after(last_event_id))
    token = creds.credentials if creds else ""

    async def still_allowed() -> bool:
        return await store.users.authenticate(token) is not None

    return EventStream(sub, config.event_keepalive, still_allowed)
