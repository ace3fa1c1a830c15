"""Events for clients: what changed on a user's devices, runs, deployments and files, fanned out to bounded subscriptions.

Pure and loop-bound (no I/O): the books call :meth:`EventBus.publish`, which stamps the event with
the next sequence number and offers it to every matching subscription without waiting and without
raising; ``GET /api/v1/events`` (``events_api.py``) writes a :class:`Subscription` out as
server-sent events. Memory is bounded everywhere: each subscription queues at most ``queue_limit``
events and one that falls behind past it is *dropped* (it gets a last ``stream.dropped`` event and
its iterator ends) rather than buffered; a user holds at most ``max_per_user`` subscriptions; the
bus remembers the last ``history`` events so a client that reconnects with ``Last-Event-ID`` is
sent what it missed, or told with ``stream.gap`` that it must reread what it shows.

Call the bus from the event loop's thread (a worker thread hands its result back to the loop first).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from neuranet.errors import Conflict, Invalid, Unavailable

log = logging.getLogger("neuranet.events")

DEVICE_ONLINE = "device.online"
DEVICE_OFFLINE = "device.offline"
RUN_PROGRESS = "run.progress"  # data: stage, step, loss
RUN_STATE = "run.state"  # data: state (running, recovering, finished, failed), error
DEPLOYMENT_STATE = "deployment.state"  # data: state, error
FILE_STORED = "file.stored"  # object: the file's name
FILE_DELETED = "file.deleted"
FORECAST_REFRESHED = "forecast.refreshed"  # for every user (user_id None); carries nobody's devices
# The stream's own: always sent, never filtered out
STREAM_DROPPED = "stream.dropped"  # the last event of a subscription that fell behind
STREAM_GAP = "stream.gap"  # events after Last-Event-ID are no longer held: reread the state you show

KINDS = frozenset({DEVICE_ONLINE, DEVICE_OFFLINE, RUN_PROGRESS, RUN_STATE, DEPLOYMENT_STATE, FILE_STORED,
                   FILE_DELETED, FORECAST_REFRESHED})
FAMILIES = frozenset(k.split(".")[0] for k in KINDS)  # "device" stands for device.online and device.offline
STREAM_KINDS = frozenset({STREAM_DROPPED, STREAM_GAP})
# Made by the client (Client.events) each time its stream is opened or reopened: reread the state you show
STREAM_OPEN = "stream.open"


@dataclass(frozen=True)
class Event:
    """One change, as a client sees it. ``user_id`` is whose it is (None: everyone's, and names nobody's
    objects); ``seq`` and ``at`` are stamped by the bus when it is published."""

    kind: str
    user_id: str | None
    object_id: str
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """What a client receives (no user id: a stream is only ever its own user's)."""
        return {"seq": self.seq, "kind": self.kind, "object_id": self.object_id, "at": self.at, "data": self.data}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Event":
        return cls(kind=str(doc["kind"]), user_id=None, object_id=str(doc.get("object_id", "")),
                   data=dict(doc.get("data") or {}), seq=int(doc.get("seq", 0)), at=float(doc.get("at", 0.0)))

    def sse(self) -> bytes:
        """The event as one server-sent event: ``id:``, ``event:`` and a one-line JSON ``data:``. The stream's
        own events carry no ``id:`` (seq 0), so a client's Last-Event-ID stays the last change it saw."""
        head = f"id: {self.seq}\n" if self.seq else ""
        return f"{head}event: {self.kind}\ndata: {json.dumps(self.to_json(), separators=(',', ':'))}\n\n".encode()


def parse_kinds(text: str | None) -> frozenset[str] | None:
    """``"device,run.state"`` -> the kinds it names (a family names all its kinds); None or "" -> every kind."""
    if not text:
        return None
    wanted: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name in KINDS:
            wanted.add(name)
        elif name in FAMILIES:
            wanted |= {k for k in KINDS if k.startswith(name + ".")}
        elif name:
            raise Invalid(f"unknown event kind {name[:40]!r}; kinds are {', '.join(sorted(KINDS | FAMILIES))}")
    return frozenset(wanted) or None


class Subscription:
    """One client's view of the bus: the events for its user (and kinds) in order, at most ``limit`` waiting.

    Iterate it (``async for event in sub``) or take what is waiting with :meth:`get_nowait`; the
    iteration ends once the subscription is closed and what was queued before has been read. A
    subscription that would queue past its limit is dropped: its queue ends with one
    ``stream.dropped`` event and it hears nothing more."""

    def __init__(self, bus: "EventBus", user_id: str, kinds: frozenset[str] | None, limit: int) -> None:
        self.user_id = user_id
        self.kinds = kinds
        self.limit = limit
        self.dropped = False
        self._bus = bus
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._ended = asyncio.Event()  # set once closed (nothing more will be queued)

    @property
    def closed(self) -> bool:
        return self._closed

    def wants(self, event: Event) -> bool:
        return ((event.user_id is None or event.user_id == self.user_id)
                and (self.kinds is None or event.kind in self.kinds or event.kind in STREAM_KINDS))

    def offer(self, event: Event) -> None:
        """Queue ``event`` if it is this subscription's; past the limit, drop the subscription instead."""
        if self._closed or not self.wants(event):
            return
        if len(self._queue) >= self.limit:
            self.dropped = True
            self._queue.append(self._bus.notice(STREAM_DROPPED, self.user_id,
                                                {"reason": f"too slow: {self.limit} events waiting unread"}))
            log.info("event stream of user %s dropped: %d events waiting unread", self.user_id, self.limit)
            self.close()
            return
        self._queue.append(event)
        self._wake.set()

    def get_nowait(self) -> Event | None:
        """The next waiting event, or None when none waits."""
        if not self._queue:
            return None
        event = self._queue.popleft()
        if not self._queue and not self._closed:
            self._wake.clear()
        return event

    def pending(self) -> int:
        return len(self._queue)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None on timeout); raises StopAsyncIteration
        once closed and read to the end. Safe to cancel: nothing is lost."""
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        return self.get_nowait()

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Event:
        event = await self.next()
        assert event is not None
        return event

    async def wait_closed(self) -> None:
        await self._ended.wait()

    def close(self) -> None:
        """Hear nothing more (what is queued can still be read); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._ended.set()
        self._bus.unsubscribe(self)


class EventBus:
    """Fan-out of published events to subscriptions, each bounded; publishing never waits or raises."""

    def __init__(self, queue_limit: int = 1024, max_per_user: int = 8, history: int = 4096,
                 clock: Callable[[], float] = time.time, first_seq: int = 1) -> None:
        if queue_limit < 1 or max_per_user < 1 or history < 0:
            raise ValueError("queue_limit and max_per_user must be at least 1, history at least 0")
        self.queue_limit = queue_limit
        self.max_per_user = max_per_user
        self._clock = clock
        self._next_seq = first_seq  # pass a start above the last run's (e.g. time-based) to keep ids increasing
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subs: dict[str, list[Subscription]] = collections.defaultdict(list)
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def notice(self, kind: str, user_id: str, data: dict[str, Any]) -> Event:
        """One of the stream's own events (no sequence number: it is no change to resume after)."""
        return Event(kind, user_id, "", data, seq=0, at=self._clock())

    def publish(self, event: Event) -> Event | None:
        """Stamp ``event`` and offer it to every matching subscription; returns it as sent (None if it could
        not be). Never waits, never raises into the caller: a subscription that cannot keep up is dropped."""
        try:
            if event.kind not in KINDS:
                raise ValueError(f"unknown event kind {event.kind!r}")
            stamped = replace(event, seq=self._next_seq, at=self._clock())
            self._next_seq += 1
            self._history.append(stamped)
            for sub in self._audience(stamped.user_id):
                sub.offer(stamped)
            return stamped
        except Exception:
            log.exception("event %s for %s not published", event.kind, event.object_id)
            return None

    def _audience(self, user_id: str | None) -> list[Subscription]:
        if user_id is None:
            return [s for subs in self._subs.values() for s in subs]
        return list(self._subs.get(user_id, ()))

    def subscribe(self, user_id: str, kinds: Collection[str] | None = None, after: int | None = None) -> Subscription:
        """A subscription to ``user_id``'s events of ``kinds`` (None: all). ``after``: the last sequence
        number the client saw; the events since are queued first, or ``stream.gap`` when they are no
        longer all held. Conflict when the user already holds ``max_per_user`` subscriptions."""
        if self._closed:
            raise Unavailable("the coordinator is shutting down; reconnect shortly")
        wanted = frozenset(kinds) if kinds is not None else None
        if wanted is not None and not wanted <= KINDS:
            raise Invalid(f"unknown event kinds: {', '.join(sorted(wanted - KINDS))}")
        held = self._subs[user_id]
        if len(held) >= self.max_per_user:
            raise Conflict(f"you already have {len(held)} event streams open, the most one user may; close one")
        sub = Subscription(self, user_id, wanted, self.queue_limit)
        held.append(sub)
        if after is not None:
            self._replay(sub, after)
        return sub

    def _replay(self, sub: Subscription, after: int) -> None:
        first_held = self._history[0].seq if self._history else self._next_seq
        missed = [e for e in self._history if e.seq > after and sub.wants(e)]
        if after + 1 < first_held or after > self.last_seq or len(missed) >= sub.limit:
            sub.offer(self.notice(STREAM_GAP, sub.user_id, {"after": after}))
            missed = missed[len(missed) - sub.limit + 1:] if len(missed) >= sub.limit else missed
        for event in missed:
            sub.offer(event)

    def unsubscribe(self, sub: Subscription) -> None:
        held = self._subs.get(sub.user_id)
        if held is not None and sub in held:
            held.remove(sub)
            if not held:
                del self._subs[sub.user_id]
        if not sub.closed:
            sub.close()

    def subscriptions(self, user_id: str | None = None) -> int:
        """How many subscriptions are open (of ``user_id``, or in all)."""
        return len(self._subs.get(user_id, ())) if user_id is not None else sum(map(len, self._subs.values()))

    def close(self) -> None:
        """Shutting down: refuse new subscriptions and end every open one (their queued events still read)."""
        self._closed = True
        for sub in [s for subs in self._subs.values() for s in subs]:
            sub.close()

