"""The event bus on its own: filtering by user and kind, order, bounded subscriptions, limits, close, resume."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from neuranet.errors import Conflict, Invalid, Unavailable
from neuranet.server.events import (DEVICE_OFFLINE, DEVICE_ONLINE, FILE_STORED, FORECAST_REFRESHED, RUN_PROGRESS,
                                    RUN_STATE, STREAM_DROPPED, STREAM_GAP, Event, EventBus, parse_kinds)


def bus(**kw: object) -> EventBus:
    ticks = itertools.count(1000)
    return EventBus(clock=lambda: float(next(ticks)), **kw)  # type: ignore[arg-type]


def drain(sub) -> list[Event]:
    out = []
    while (e := sub.get_nowait()) is not None:
        out.append(e)
    return out


def online(user: str, device: str) -> Event:
    return Event(DEVICE_ONLINE, user, device)


def test_a_subscription_hears_only_its_users_events_in_order_with_increasing_ids() -> None:
    b = bus()
    alice, bob = b.subscribe("alice"), b.subscribe("bob")
    b.publish(online("alice", "d1"))
    b.publish(online("bob", "d2"))
    b.publish(Event(DEVICE_OFFLINE, "alice", "d1"))
    got = drain(alice)
    assert [(e.kind, e.object_id) for e in got] == [(DEVICE_ONLINE, "d1"), (DEVICE_OFFLINE, "d1")]
    assert got[0].seq < got[1].seq and got[0].at < got[1].at
    assert [e.object_id for e in drain(bob)] == ["d2"]


def test_kinds_filter_and_families() -> None:
    assert parse_kinds("device, run.state") == {DEVICE_ONLINE, DEVICE_OFFLINE, RUN_STATE}
    assert parse_kinds("") is None and parse_kinds(None) is None
    with pytest.raises(Invalid, match="unknown event kind 'nope'"):
        parse_kinds("device,nope")
    b = bus()
    sub = b.subscribe("alice", kinds=parse_kinds("run"))
    b.publish(online("alice", "d1"))
    b.publish(Event(RUN_PROGRESS, "alice", "r1", {"step": 1, "loss": 2.5}))
    b.publish(Event(RUN_STATE, "alice", "r1", {"state": "finished"}))
    assert [e.kind for e in drain(sub)] == [RUN_PROGRESS, RUN_STATE]
    with pytest.raises(Invalid):
        b.subscribe("alice", kinds={"bogus"})


def test_an_event_for_everyone_reaches_every_user_and_respects_kinds() -> None:
    b = bus()
    alice, bob, runs_only = b.subscribe("alice"), b.subscribe("bob"), b.subscribe("carol", kinds={RUN_STATE})
    b.publish(Event(FORECAST_REFRESHED, None, "forecast", {"trained_at": 1.0}))
    assert [e.kind for e in drain(alice)] == [FORECAST_REFRESHED] == [e.kind for e in drain(bob)]
    assert drain(runs_only) == []


def test_a_slow_subscriber_is_dropped_while_a_fast_one_keeps_everything() -> None:
    b = bus(queue_limit=4)
    slow, fast = b.subscribe("alice"), b.subscribe("alice")
    kept = []
    for i in range(10):
        assert b.publish(Event(FILE_STORED, "alice", f"f{i}")) is not None  # the publisher never sees a drop
        kept += drain(fast)
    assert [e.object_id for e in kept] == [f"f{i}" for i in range(10)]
    got = drain(slow)
    assert [e.object_id for e in got[:-1]] == ["f0", "f1", "f2", "f3"]  # what it had queued, then the notice
    assert got[-1].kind == STREAM_DROPPED and "too slow" in got[-1].data["reason"]
    assert slow.dropped and slow.closed and not fast.closed
    assert b.subscriptions("alice") == 1  # the dropped one let go of its place


def test_subscriptions_per_user_are_limited_and_a_closed_one_frees_its_place() -> None:
    b = bus(max_per_user=2)
    first, _second = b.subscribe("alice"), b.subscribe("alice")
    with pytest.raises(Conflict, match="2 event streams"):
        b.subscribe("alice")
    b.subscribe("bob")  # another user's limit is their own
    first.close()
    b.subscribe("alice")
    assert b.subscriptions("alice") == 2 and b.subscriptions() == 3


def test_close_ends_the_iterators_after_what_was_queued() -> None:
    async def main() -> None:
        b = bus()
        sub, other = b.subscribe("alice"), b.subscribe("bob")
        seen: list[str] = []

        async def read(s, out: list[str]) -> None:
            async for e in s:
                out.append(e.object_id)

        others: list[str] = []
        readers = [asyncio.create_task(read(sub, seen)), asyncio.create_task(read(other, others))]
        b.publish(online("alice", "d1"))
        await asyncio.sleep(0)
        b.publish(online("alice", "d2"))
        sub.close()  # one subscription ends: its reader finishes with what was queued
        await asyncio.wait_for(readers[0], 5)
        assert seen == ["d1", "d2"] and not readers[1].done()
        b.close()  # the bus closes: every reader ends, and no new subscription is taken
        await asyncio.wait_for(readers[1], 5)
        with pytest.raises(Unavailable):
            b.subscribe("alice")

    asyncio.run(main())


def test_next_times_out_without_losing_an_event() -> None:
    async def main() -> None:
        b = bus()
        sub = b.subscribe("alice")
        assert await sub.next(timeout=0.001) is None
        b.publish(online("alice", "d1"))
        e = await sub.next(timeout=5)
        assert e is not None and e.object_id == "d1"

    asyncio.run(main())


def test_resume_after_a_sequence_number_replays_only_the_users_missed_events() -> None:
    b = bus()
    b.publish(online("alice", "d1"))
    seen = b.publish(online("alice", "d2"))
    b.publish(online("bob", "x"))
    b.publish(Event(DEVICE_OFFLINE, "alice", "d2"))
    assert seen is not None
    sub = b.subscribe("alice", after=seen.seq)
    assert [(e.kind, e.object_id) for e in drain(sub)] == [(DEVICE_OFFLINE, "d2")]


def test_resume_past_what_is_held_says_there_is_a_gap() -> None:
    b = bus(history=2)
    first = b.publish(online("alice", "d1"))
    for d in ("d2", "d3", "d4"):
        b.publish(online("alice", d))
    assert first is not None
    got = drain(b.subscribe("alice", after=first.seq))
    assert got[0].kind == STREAM_GAP and [e.object_id for e in got[1:]] == ["d3", "d4"]
    # an id from before a restart (beyond the newest) is a gap too
    assert [e.kind for e in drain(b.subscribe("alice", after=10**9))] == [STREAM_GAP]
    assert drain(b.subscribe("alice", after=b.last_seq)) == []


def test_publishing_never_raises_into_the_publisher() -> None:
    b = bus()
    assert b.publish(Event("no.such.kind", "alice", "x")) is None
    assert b.publish(Event(DEVICE_ONLINE, "alice", "d1")) is not None


def test_the_wire_form_is_one_server_sent_event() -> None:
    b = bus()
    e = b.publish(Event(RUN_STATE, "alice", "r1", {"state": "failed", "error": "line one\nline two"}))
    assert e is not None
    text = e.sse().decode()
    lines = text.split("\n")
    assert text.endswith("\n\n") and lines[0] == f"id: {e.seq}" and lines[1] == f"event: {RUN_STATE}"
    assert lines[2].startswith("data: ") and len(lines) == 5  # a newline in the data stays escaped in the JSON
    assert Event.from_json(json.loads(lines[2][len("data: "):])) == Event(RUN_STATE, None, "r1", e.data, e.seq, e.at)
    notice = b.notice(STREAM_DROPPED, "alice", {"reason": "too slow"})
    assert not notice.sse().startswith(b"id:")  # a client's Last-Event-ID stays the last change it saw


def test_devices_going_online_and_offline_are_told_to_their_owner_once() -> None:
    from types import SimpleNamespace

    from neuranet.server.device_events import DevicePresence
    from neuranet.server.fleet import Fleet

    conns: dict = {}
    fleet = Fleet(conns)
    b = bus()
    DevicePresence(b, fleet)
    alice, bob = b.subscribe("alice"), b.subscribe("bob")
    conns["d1"] = SimpleNamespace(user_id="alice", connected_at=5.0)
    fleet.back("d1")
    fleet.back("d1")  # a newer connection replacing the live one: no change for the owner
    del conns["d1"]
    fleet.lost("d1")
    fleet.lost("d1")
    assert [(e.kind, e.object_id) for e in drain(alice)] == [(DEVICE_ONLINE, "d1"), (DEVICE_OFFLINE, "d1")]
    assert drain(bob) == []


def test_following_a_run_reads_it_again_only_when_the_stream_says_it_changed() -> None:
    import io

    from rich.console import Console

    from neuranet.server.events import STREAM_OPEN
    from neuranet.ui import follow_run

    class FakeClient:
        def __init__(self) -> None:
            self.reads = 0
            self.status = "running"

        def run(self, run_id: str, timeout: float | None = None) -> dict:
            self.reads += 1
            return {"id": run_id, "status": self.status, "steps": 3, "batch_size": 8, "losses": [1.0] * (3 if self.status
                    == "finished" else 0), "recoveries": [], "plan": "plan"}

        def events(self, kinds, patience, note):
            assert set(kinds) == {RUN_PROGRESS, RUN_STATE}
            yield Event(STREAM_OPEN, None, "")
            for step in range(3):
                yield Event(RUN_PROGRESS, None, "r1", {"step": step, "loss": 1.0, "steps_done": step + 1}, seq=step + 1)
                yield Event(RUN_PROGRESS, None, "other-run", {"step": step, "loss": 9.0, "steps_done": step + 1})
            self.status = "finished"
            yield Event(RUN_STATE, None, "r1", {"state": "finished"}, seq=9)
            raise AssertionError("read past the run's end")

    client = FakeClient()
    start = {"id": "r1", "status": "running", "steps": 3, "batch_size": 8, "losses": [], "recoveries": [], "plan": "p"}
    run = follow_run(client, start, Console(file=io.StringIO()))
    assert run["status"] == "finished" and client.reads == 2  # once subscribed, and once it changed: no polling
