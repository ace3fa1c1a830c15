"""Requests on the agents' ``chunks`` PeerLink channel and on the agent's local door, typed and bounded.

Device to device (`neuranet.agent.file_worker`), in a PeerLink message's meta, the bytes in its payload:

    {"op": "get", "chunk": id, "rid": n}            -> {"chunk": id, "rid": n, "error": ""} + the bytes
    {"op": "put", "chunk": id, "rid": n} + bytes    -> {"chunk": id, "rid": n, "error": "", "free": bytes left}

A program on the agent's machine (`neuranet.storage.transfer` through `neuranet.net.local_api`):

    {"op": "chunk", "chunk": id, "holders": [device ids]}   -> {"source": device, "path": how}
    {"op": "put", "chunk": id, "replicas": k, "size": n}    -> {"holders": [device ids], "paths": {how: count}}

Every model is frozen, ignores keys it does not know and bounds every field; the ``parse_*`` functions
turn a bad dict into `BadChunkRequest` (never anything else), whose message names the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuranet.protocol.chunks import ChunkName
from neuranet.protocol.errors import MAX_ERROR_CHARS, MAX_SHOWN_CHARS, InvalidMessage, shown
from neuranet.protocol.message_base import INT64_MAX, MAX_ID_CHARS, Text

MAX_HOLDERS = 64  # holders one local fetch may name
MAX_REPLICAS = 16
MAX_LOCAL_CHUNK_BYTES = 16 << 20  # a local put's ``size`` (the agent checks the chunk limit itself)
MAX_PATHS = 16  # kinds of path one local put's answer may count

DeviceId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
RequestId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class BadChunkRequest(InvalidMessage):
    """A chunk-channel or local request, or an answer to one, that does not fit its model (not fatal:
    the server answers with the error, the requester counts the peer as failing)."""


class _Model(BaseModel):
    # strict: a JSON true is no replica count, msgpack bytes no chunk name
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    def meta(self) -> dict[str, Any]:
        """The wire dict (the same keys as ever)."""
        return self.model_dump(mode="python")


# --- device to device, on the chunks channel --------------------------------------------------

class PeerGet(_Model):
    """Ask a peer for a chunk it holds; answered by `PeerGetAnswer` with the bytes."""

    op: Literal["get"] = "get"
    chunk: ChunkName
    rid: RequestId = 0


class PeerPut(_Model):
    """Give a peer a chunk to keep (the bytes in the payload); answered by `PeerPutAnswer`."""

    op: Literal["put"] = "put"
    chunk: ChunkName
    rid: RequestId = 0


class PeerGetAnswer(_Model):
    """The bytes of a `PeerGet` ride in the payload; ``error`` says why not when it is not empty."""

    chunk: ChunkName
    rid: RequestId
    error: Text = ""


class PeerPutAnswer(_Model):
    """``error`` empty when the chunk was kept; ``free``: what the peer's quota has left (-1: unknown)."""

    chunk: ChunkName
    rid: RequestId
    error: Text = ""
    free: int = Field(-1, ge=-1, le=INT64_MAX)


PeerRequest = PeerGet | PeerPut
PeerAnswer = PeerGetAnswer | PeerPutAnswer
_PEER_REQUESTS: dict[str, type[PeerGet] | type[PeerPut]] = {"get": PeerGet, "put": PeerPut}


def parse_peer_request(meta: object) -> PeerRequest:
    """The request a peer sent on the chunks channel, or `BadChunkRequest` naming what is wrong."""
    op = meta.get("op") if isinstance(meta, dict) else None
    cls = _PEER_REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise BadChunkRequest(f"chunk request: op: must be one of {', '.join(_PEER_REQUESTS)}, not {shown(op)}")
    return _validate(cls, meta, f"chunk {op} request")


def parse_peer_answer(request: PeerRequest, meta: object) -> PeerAnswer:
    """A peer's answer to ``request``: the right model, for the same chunk and request, or `BadChunkRequest`."""
    cls: type[PeerGetAnswer] | type[PeerPutAnswer] = PeerGetAnswer if isinstance(request, PeerGet) else PeerPutAnswer
    answer = _validate(cls, meta, f"answer to a chunk {request.op}")
    if answer.chunk != request.chunk or answer.rid != request.rid:
        raise BadChunkRequest(f"answer to a chunk {request.op}: chunk: the answer is for another chunk or request")
    return answer


def peer_refusal(meta: object, error: str) -> dict[str, Any]:
    """The answer to a request that could not be read: its chunk and rid echoed when they are well formed
    (so the requester matches it to its request), and ``error``."""
    meta = meta if isinstance(meta, dict) else {}
    chunk, rid = meta.get("chunk"), meta.get("rid")
    ok_chunk = isinstance(chunk, str) and re.fullmatch(r"[0-9a-f]{64}", chunk) is not None
    ok_rid = type(rid) is int and 0 <= rid <= INT64_MAX
    return {"chunk": chunk if ok_chunk else "", "rid": rid if ok_rid else None, "error": error[:MAX_ERROR_CHARS]}


# --- a program on this machine and its agent -------------------------------------------------

class LocalChunk(_Model):
    """Fetch a chunk through this machine's agent: from its store, else from one of ``holders``."""

    op: Literal["chunk"] = "chunk"
    chunk: ChunkName
    holders: list[DeviceId] = Field(default_factory=list, max_length=MAX_HOLDERS)


class LocalPut(_Model):
    """Store a chunk (the bytes after the request) on ``replicas`` of the owner's devices."""

    op: Literal["put"] = "put"
    chunk: ChunkName
    replicas: int = Field(3, ge=1, le=MAX_REPLICAS)
    size: int = Field(0, ge=0, le=MAX_LOCAL_CHUNK_BYTES)


class LocalChunkAnswer(_Model):
    """Who gave the chunk and which way it came ("local", "direct", "relay")."""

    source: str = Field(max_length=MAX_ID_CHARS)  # "" from an agent not enrolled yet
    path: str = Field(max_length=16)


class LocalPutAnswer(_Model):
    """The devices that hold the chunk now, and how many replicas went which way."""

    holders: list[DeviceId] = Field(max_length=MAX_HOLDERS)
    paths: dict[Annotated[str, Field(max_length=16)], Annotated[int, Field(ge=0, le=MAX_HOLDERS)]] = Field(
        default_factory=dict, max_length=MAX_PATHS)


def parse_local_chunk(request: object) -> LocalChunk:
    return _validate(LocalChunk, request, "chunk request")


def parse_local_put(request: object) -> LocalPut:
    return _validate(LocalPut, request, "put request")


def parse_local_chunk_answer(answer: object) -> LocalChunkAnswer:
    return _validate(LocalChunkAnswer, answer, "the agent's answer to a chunk request")


def parse_local_put_answer(answer: object) -> LocalPutAnswer:
    return _validate(LocalPutAnswer, answer, "the agent's answer to a put request")


# --- parsing ---------------------------------------------------------------------------------

M = TypeVar("M", bound=_Model)


def _validate(cls: type[M], raw: object, what: str) -> M:
    if not isinstance(raw, dict):
        raise BadChunkRequest(f"{what}: must be an object, not {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:MAX_SHOWN_CHARS] or "body"  # keys come from the peer
        if first["loc"] == ("chunk",) and first["type"] != "missing":
            why = f"not a chunk name (64 lowercase hex digits): {shown(first.get('input'))}"
        else:
            why = first["msg"][:MAX_SHOWN_CHARS * 4]
        raise BadChunkRequest(f"{what}: {where}: {why}") from None
