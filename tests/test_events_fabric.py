"""The event stream end to end: a real coordinator process and real agents; a client sees its agent go online and
offline, another user sees none of it, and `neuranet devices --watch` follows the stream.

(A client that reads nothing being dropped while the server keeps serving is tested behind a real uvicorn in
tests/test_event_stream.py, whose small send buffers make that take a few hundred events, not megabytes.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from fabric_helpers import free_port
from neuranet.client import Client
from neuranet.config import ClientConfig
from neuranet.fabric import LocalFabric
from neuranet.server.events import DEVICE_OFFLINE, DEVICE_ONLINE, FILE_STORED, STREAM_OPEN, Event

pytestmark = pytest.mark.slow
AGENT = ["--no-measure", "--listen-host", "127.0.0.1"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFabric]:
    with LocalFabric(tmp_path_factory.mktemp("events")) as f:
        f.start_server(port=free_port())
        yield f


@contextlib.contextmanager
def listening(url: str, token: str, kinds: list[str] | None = None) -> Iterator["queue.Queue[Event]"]:
    """``token``'s events, read in a thread into a queue; subscribed when this yields."""
    got: queue.Queue[Event] = queue.Queue()
    client = Client(ClientConfig(url, token))

    def read() -> None:
        with contextlib.suppress(Exception):
            for event in client.events(kinds=kinds, reconnect=False):
                got.put(event)

    threading.Thread(target=read, daemon=True).start()
    assert got.get(timeout=30).kind == STREAM_OPEN
    try:
        yield got
    finally:
        client.close()


def next_of(got: "queue.Queue[Event]", kind: str, object_id: str) -> Event:
    """The next event of ``kind`` about ``object_id``, skipping others (bounded in time)."""
    while True:
        event = got.get(timeout=60)
        if (event.kind, event.object_id) == (kind, object_id):
            return event


def test_a_user_sees_their_agent_go_online_and_offline_and_another_user_sees_none_of_it(fabric: LocalFabric) -> None:
    with fabric.client() as admin:
        bob_token = admin.create_user("bob-events")["token"]
    with listening(fabric.url, fabric.token, kinds=["device"]) as mine, listening(fabric.url, bob_token) as bobs:
        fabric.start_agent("ev0", extra=AGENT)
        device = fabric.wait_online(["ev0"])["ev0"]["id"]
        online = next_of(mine, DEVICE_ONLINE, device)
        fabric.kill_agent("ev0")
        offline = next_of(mine, DEVICE_OFFLINE, device)
        assert online.seq < offline.seq
        # bob's stream is in order: had it carried alice's device, that would come before bob's own file
        with Client(ClientConfig(fabric.url, bob_token)) as bob:
            bob.commit_file({"name": "mine.txt", "size": 0, "sha256": hashlib.sha256(b"").hexdigest(), "chunks": []})
        first = bobs.get(timeout=60)
        assert (first.kind, first.object_id) == (FILE_STORED, "mine.txt") and first.seq > offline.seq


def test_devices_watch_follows_the_stream(fabric: LocalFabric) -> None:
    watch = subprocess.Popen([sys.executable, "-m", "neuranet", "devices", "--watch", "--json", "--server", fabric.url,
                              "--token", fabric.token], stdout=subprocess.PIPE, env=fabric.env, text=True)
    lines: queue.Queue[dict] = queue.Queue()

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        listed = lines.get(timeout=60)  # the list first, once subscribed
        assert "ev1" not in {d["name"] for d in listed["devices"] if d["online"]}
        fabric.start_agent("ev1", extra=AGENT)
        device = fabric.wait_online(["ev1"])["ev1"]["id"]
        came = lines.get(timeout=60)
        assert (came["device"], came["name"], came["state"]) == (device, "ev1", "online")
        fabric.kill_agent("ev1")
        went = lines.get(timeout=60)
        assert (went["device"], went["state"]) == (device, "offline") and went["at"] >= came["at"]
    finally:
        watch.terminate()
        watch.wait(timeout=30)
