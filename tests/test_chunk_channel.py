"""The chunk channel's and the local door's requests and answers: typed, bounded, and refused with a
message naming the field (never anything but `BadChunkRequest`)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.agent.chunk_store import ChunkStore
from neuranet.agent.file_worker import LINK_ERRORS, ChunkLinks, FileWorker
from neuranet.net.peerlink import LinkMessage
from neuranet.protocol import chunk_channel as cc
from neuranet.protocol.errors import InvalidMessage

CHUNK = "ab" * 32
OTHER = "cd" * 32


@pytest.mark.parametrize("model", [
    cc.PeerGet(chunk=CHUNK, rid=7),
    cc.PeerPut(chunk=CHUNK, rid=8),
    cc.PeerGetAnswer(chunk=CHUNK, rid=7, error="not held here"),
    cc.PeerPutAnswer(chunk=CHUNK, rid=8, free=123),
    cc.LocalChunk(chunk=CHUNK, holders=["d1", "d2"]),
    cc.LocalPut(chunk=CHUNK, replicas=2, size=10),
    cc.LocalChunkAnswer(source="d1", path="direct"),
    cc.LocalPutAnswer(holders=["d1"], paths={"local": 1, "direct": 1}),
])
def test_every_model_round_trips_through_its_wire_dict(model: cc._Model) -> None:
    parse: dict[type, Callable[[Any], Any]] = {
        cc.PeerGet: cc.parse_peer_request, cc.PeerPut: cc.parse_peer_request,
        cc.PeerGetAnswer: lambda d: cc.parse_peer_answer(cc.PeerGet(chunk=CHUNK, rid=7), d),
        cc.PeerPutAnswer: lambda d: cc.parse_peer_answer(cc.PeerPut(chunk=CHUNK, rid=8), d),
        cc.LocalChunk: cc.parse_local_chunk, cc.LocalPut: cc.parse_local_put,
        cc.LocalChunkAnswer: cc.parse_local_chunk_answer, cc.LocalPutAnswer: cc.parse_local_put_answer,
    }
    wire = model.meta()
    assert parse[type(model)]({**wire, "unknown": "ignored"}) == model


def test_the_wire_keys_are_the_ones_agents_always_sent() -> None:
    assert cc.PeerGet(chunk=CHUNK, rid=1).meta() == {"op": "get", "chunk": CHUNK, "rid": 1}
    assert cc.PeerPutAnswer(chunk=CHUNK, rid=1, free=5).meta() == {"chunk": CHUNK, "rid": 1, "error": "", "free": 5}
    assert cc.LocalChunk(chunk=CHUNK).meta() == {"op": "chunk", "chunk": CHUNK, "holders": []}
    assert cc.parse_local_put({"op": "put", "chunk": CHUNK}).replicas == 3  # as before, when not given
    assert cc.parse_local_put({"op": "put", "chunk": CHUNK, "replicas": 1}).model_copy().replicas == 1


def _put_answer(raw: Any) -> cc.PeerAnswer:
    return cc.parse_peer_answer(cc.PeerPut(chunk=CHUNK, rid=1), raw)


def _get_answer(raw: Any) -> cc.PeerAnswer:
    return cc.parse_peer_answer(cc.PeerGet(chunk=CHUNK, rid=1), raw)


BAD: list[tuple[Callable[[Any], Any], dict[str, Any], str]] = [
    (cc.parse_peer_request, {"chunk": CHUNK}, "op"),
    (cc.parse_peer_request, {"op": "delete", "chunk": CHUNK}, "op"),
    (cc.parse_peer_request, {"op": ["get"], "chunk": CHUNK}, "op"),
    (cc.parse_peer_request, {"op": "get", "chunk": "nope"}, "chunk: not a chunk name"),
    (cc.parse_peer_request, {"op": "get", "chunk": CHUNK.upper()}, "chunk: not a chunk name"),
    (cc.parse_peer_request, {"op": "get", "chunk": CHUNK + "\n"}, "chunk: not a chunk name"),
    (cc.parse_peer_request, {"op": "put", "chunk": CHUNK.encode()}, "chunk: not a chunk name"),
    (cc.parse_peer_request, {"op": "put"}, "chunk: Field required"),
    (cc.parse_peer_request, {"op": "get", "chunk": CHUNK, "rid": -1}, "rid"),
    (cc.parse_peer_request, {"op": "get", "chunk": CHUNK, "rid": "1"}, "rid"),
    (cc.parse_peer_request, {"op": "get", "chunk": CHUNK, "rid": 2 ** 63}, "rid"),
    (_put_answer, {"chunk": CHUNK, "rid": True}, "rid"),
    (_put_answer, {"chunk": CHUNK, "rid": 1, "free": -2}, "free"),
    (_put_answer, {"chunk": CHUNK, "rid": 1, "free": 1.5}, "free"),
    (_get_answer, {"chunk": CHUNK, "rid": 1, "error": 3}, "error"),
    (_get_answer, {"chunk": OTHER, "rid": 1}, "another chunk"),
    (_get_answer, {"chunk": CHUNK, "rid": 2}, "another chunk"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": "nope"}, "chunk: not a chunk name"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": CHUNK, "holders": "d1"}, "holders"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": CHUNK, "holders": [1]}, "holders.0"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": CHUNK, "holders": [""]}, "holders.0"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": CHUNK, "holders": ["d" * 129]}, "holders.0"),
    (cc.parse_local_chunk, {"op": "chunk", "chunk": CHUNK, "holders": ["d"] * (cc.MAX_HOLDERS + 1)}, "holders"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "replicas": 0}, "replicas"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "replicas": 17}, "replicas"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "replicas": True}, "replicas"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "replicas": "3"}, "replicas"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "size": -1}, "size"),
    (cc.parse_local_put, {"op": "put", "chunk": CHUNK, "size": (16 << 20) + 1}, "size"),
    (cc.parse_local_chunk_answer, {"path": "direct"}, "source"),
    (cc.parse_local_chunk_answer, {"source": "d1", "path": "x" * 17}, "path"),
    (cc.parse_local_put_answer, {"holders": ["d1"], "paths": {"direct": -1}}, "paths.direct"),
    (cc.parse_local_put_answer, {"holders": None}, "holders"),
]


@pytest.mark.parametrize("parse, raw, named", BAD)
def test_every_bad_field_is_refused_with_a_message_naming_it(parse: Callable[[Any], Any], raw: dict[str, Any],
                                                            named: str) -> None:
    with pytest.raises(cc.BadChunkRequest, match=named):
        parse(raw)


def test_a_bad_request_is_a_non_fatal_protocol_error_and_not_an_object_is_refused_too() -> None:
    assert issubclass(cc.BadChunkRequest, InvalidMessage) and not cc.BadChunkRequest.fatal
    for parse in (cc.parse_peer_request, cc.parse_local_chunk, cc.parse_local_put):
        with pytest.raises(cc.BadChunkRequest, match="must be"):
            parse([1, 2])


def test_a_long_error_is_cut_and_a_long_bad_value_is_shown_cut() -> None:
    assert len(cc.PeerGetAnswer(chunk=CHUNK, rid=1, error="x" * 10_000).error) == 1000
    with pytest.raises(cc.BadChunkRequest) as raised:
        cc.parse_peer_request({"op": "get", "chunk": "z" * 100_000})
    assert len(str(raised.value)) < 300


def test_a_refusal_echoes_only_a_well_formed_chunk_and_rid() -> None:
    assert cc.peer_refusal({"chunk": CHUNK, "rid": 4}, "no") == {"chunk": CHUNK, "rid": 4, "error": "no"}
    assert cc.peer_refusal({"chunk": "x" * 10 ** 5, "rid": "4"}, "e" * 5000) == {"chunk": "", "rid": None,
                                                                                  "error": "e" * 1000}
    assert cc.peer_refusal(None, "no")["rid"] is None


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70)
                       | st.binary(max_size=70) | st.sampled_from([CHUNK, "get", "put", "chunk", "d1"]),
                       lambda inner: (st.lists(inner, max_size=5)
                                      | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=20)
_keys = st.sampled_from(["op", "chunk", "rid", "error", "free", "holders", "replicas", "size", "source", "path",
                         "paths", "x"])
_dicts = st.dictionaries(_keys, _values, max_size=8)


@settings(max_examples=200, deadline=None)
@given(_dicts | _values)
def test_random_dicts_never_raise_anything_but_the_typed_error(raw: Any) -> None:
    parsers: list[Callable[[Any], Any]] = [
        cc.parse_peer_request, cc.parse_local_chunk, cc.parse_local_put, cc.parse_local_chunk_answer,
        cc.parse_local_put_answer, lambda d: cc.parse_peer_answer(cc.PeerGet(chunk=CHUNK), d),
        lambda d: cc.parse_peer_answer(cc.PeerPut(chunk=CHUNK), d),
    ]
    for parse in parsers:
        try:
            parse(raw)
        except cc.BadChunkRequest as exc:
            assert len(str(exc)) < 1000
    refusal = cc.peer_refusal(raw, "no")
    assert set(refusal) == {"chunk", "rid", "error"}


# --- both sides of the chunks channel, with a fake link --------------------------------------

class FakeLink:
    """A link whose peer answers each request with ``respond(meta, payload)`` (None: no answer)."""

    peer = "peer-1"
    path = "direct"
    peer_down_since = None

    def __init__(self, respond: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes] | None]) -> None:
        self.respond = respond
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    async def send(self, data: bytes, meta: dict[str, Any]) -> None:
        self.sent.append((bytes(data), meta))
        answer = self.respond(meta, bytes(data))
        if answer is not None:
            await self.inbox.put(LinkMessage(answer[0], answer[1]))

    async def recv(self) -> Any:
        return await self.inbox.get()

    async def close(self, flush_timeout: float = 0.0) -> None:
        self.closed = True


class FakeAgent:
    def __init__(self, respond: Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes] | None]) -> None:
        self.respond = respond
        self.opened: list[FakeLink] = []
        self.tasks: list[Any] = []
        self.links = self

    async def open(self, peer: str, channel: str, timeout: float) -> FakeLink:
        link = FakeLink(self.respond)
        self.opened.append(link)
        return link

    def spawn(self, coro: Any) -> Any:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_malformed_answer_fails_the_request_like_a_broken_link() -> None:
    good = FakeAgent(lambda meta, data: ({"chunk": meta["chunk"], "rid": meta["rid"], "error": "", "free": 9}, b""))
    bad = FakeAgent(lambda meta, data: ({"chunk": meta["chunk"], "rid": meta["rid"], "free": "lots"}, b""))
    try:
        links = ChunkLinks(good)  # type: ignore[arg-type]
        answer, _, path = await links.request("peer-1", cc.PeerPut(chunk=CHUNK), b"bytes")
        assert answer == cc.PeerPutAnswer(chunk=CHUNK, rid=1, free=9) and path == "direct"
        assert good.opened[0].sent[0][1] == {"op": "put", "chunk": CHUNK, "rid": 1}
        with pytest.raises(cc.BadChunkRequest, match="peer-1: answer to a chunk put: free") as raised:
            await ChunkLinks(bad).request("peer-1", cc.PeerPut(chunk=CHUNK), b"bytes")  # type: ignore[arg-type]
        assert isinstance(raised.value, LINK_ERRORS)  # what every caller counts as this peer failing
        assert all(link.closed for link in bad.opened)
    finally:
        await good.stop()
        await bad.stop()


async def test_a_malformed_request_is_answered_with_an_error_and_good_ones_are_served(tmp_path: Path) -> None:
    data = b"some chunk"
    name = hashlib.sha256(data).hexdigest()
    worker = FileWorker.__new__(FileWorker)  # only the store is needed to serve
    worker.store = ChunkStore(tmp_path / "chunks", 1 << 20)
    link = FakeLink(lambda meta, payload: None)

    async def serve(meta: dict[str, Any], payload: bytes = b"") -> tuple[bytes, dict[str, Any]]:
        slots = asyncio.Semaphore(1)
        await slots.acquire()
        await worker._serve_one(link, LinkMessage(meta, payload), slots)  # type: ignore[arg-type]
        assert not slots.locked()
        return link.sent.pop()

    _, refused = await serve({"op": "delete", "chunk": name, "rid": 3})
    assert refused["rid"] == 3 and refused["chunk"] == name and "op" in refused["error"]
    _, refused = await serve({"op": "put", "chunk": "../etc/passwd", "rid": 4}, data)
    assert refused == {"chunk": "", "rid": 4, "error": refused["error"]} and "not a chunk name" in refused["error"]
    _, kept = await serve({"op": "put", "chunk": name, "rid": 5}, data)
    assert cc.parse_peer_answer(cc.PeerPut(chunk=name, rid=5), kept).error == ""
    got, answer = await serve({"op": "get", "chunk": name, "rid": 6})
    assert got == data and cc.parse_peer_answer(cc.PeerGet(chunk=name, rid=6), answer).error == ""
