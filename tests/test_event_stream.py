"""GET /api/v1/events behind a real uvicorn: authenticated, filtered to the caller's objects, bounded per client."""

from __future__ import annotations

import contextlib
import hashlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api_app import served_app
from neuranet.client import Client, ClientError
from neuranet.config import ClientConfig, Limits
from neuranet.server.events import FILE_DELETED, FILE_STORED, STREAM_OPEN, Event

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def empty_file(name: str) -> dict[str, object]:
    return {"name": name, "size": 0, "sha256": EMPTY_SHA, "chunks": [], "replicas": 1}


@contextlib.contextmanager
def listening(url: str, token: str, **kw: object) -> Iterator["queue.Queue[Event]"]:
    """Events of ``token``'s user, read in a thread into a queue, from a stream already open when this yields."""
    got: queue.Queue[Event] = queue.Queue()
    client = Client(ClientConfig(url, token))
    stream = client.events(reconnect=False, **kw)  # type: ignore[arg-type]

    def read() -> None:
        with contextlib.suppress(Exception):
            for event in stream:
                got.put(event)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert got.get(timeout=30).kind == STREAM_OPEN  # subscribed: nothing published from now on is missed
    try:
        yield got
    finally:
        client.close()


def test_the_stream_needs_a_token_and_known_kinds(tmp_path: Path) -> None:
    with served_app(tmp_path) as (url, token):
        assert httpx.get(f"{url}/api/v1/events").status_code == 401
        assert httpx.get(f"{url}/api/v1/events", headers={"Authorization": "Bearer nope"}).status_code == 401
        with Client(ClientConfig(url, token)) as c, pytest.raises(ClientError, match="422: unknown event kind 'bogus'"):
            next(c.events(kinds=["bogus"], reconnect=False))
        doc = httpx.get(f"{url}/openapi.json").json()["paths"]["/api/v1/events"]["get"]
        assert "text/event-stream" in doc["responses"]["200"]["content"]


def test_a_user_hears_only_their_own_files_and_in_order(tmp_path: Path) -> None:
    with served_app(tmp_path) as (url, token):
        with Client(ClientConfig(url, token)) as admin:
            bob_token = admin.create_user("bob")["token"]
        with listening(url, token) as mine, listening(url, bob_token) as bobs, Client(ClientConfig(url, token)) as c, \
                Client(ClientConfig(url, bob_token)) as bob:
            c.commit_file(empty_file("a.txt"))
            c.delete_file("a.txt")
            bob.commit_file(empty_file("b.txt"))
            first, second = mine.get(timeout=30), mine.get(timeout=30)
            assert (first.kind, first.object_id, second.kind) == (FILE_STORED, "a.txt", FILE_DELETED)
            assert first.seq < second.seq
            # bob's stream is in order too, so had it carried alice's events they would come before his own
            theirs = bobs.get(timeout=30)
            assert (theirs.kind, theirs.object_id) == (FILE_STORED, "b.txt") and theirs.seq > second.seq


def test_a_client_that_reads_nothing_is_dropped_and_the_others_keep_everything(tmp_path: Path) -> None:
    limits = Limits(max_queued_events_per_stream=16)
    # small kernel buffers (the default grows to MiBs), so a client that reads nothing holds up the stream soon
    with served_app(tmp_path, limits, send_buffer=8192) as (url, token), listening(url, token) as fast:
        host, port = url.removeprefix("http://").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, and it is never read
        slow.connect((host, int(port)))
        slow.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        with Client(ClientConfig(url, token)) as c:
            names = [f"{i:04d}-" + "x" * 1000 for i in range(300)]  # ~1 KB an event: past every buffer on the way
            for name in names:
                c.commit_file(empty_file(name))
            heard = [fast.get(timeout=30) for _ in names]
            assert [e.object_id for e in heard] == names and all(e.kind == FILE_STORED for e in heard)
            assert c.health()["ok"]  # the server keeps serving
        # the slow one was cut off: what it can still read ends (EOF), short of the flood (a stream that was
        # not cut off would go on with keepalives: the deadline fails the test then)
        received = b""
        deadline = time.monotonic() + 60
        slow.settimeout(60)
        while chunk := slow.recv(1 << 16):
            received += chunk
            assert time.monotonic() < deadline, "the slow client's stream was never cut off"
        slow.close()
        assert received.startswith(b"HTTP/1.1 200")
        assert received.count(b"event: file.stored") < len(names)


def test_a_stopping_server_ends_its_streams_cleanly(tmp_path: Path) -> None:
    ended: queue.Queue[object] = queue.Queue()
    with served_app(tmp_path) as (url, token):
        client = Client(ClientConfig(url, token))
        stream = client.events(reconnect=False)
        assert next(stream).kind == STREAM_OPEN

        def read() -> None:
            try:
                ended.put(list(stream))
            except Exception as exc:  # a stream cut off, not ended, breaks mid-response
                ended.put(exc)

        threading.Thread(target=read, daemon=True).start()
    assert ended.get(timeout=60) == []  # the stream ended as a whole response, before the server stopped
    client.close()
