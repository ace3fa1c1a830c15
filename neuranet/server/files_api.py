"""REST for files on your devices: upload chunks, commit a file, list, info, download chunks, delete.

A client uploads a file as chunks (``PUT /api/v1/chunks/{sha256}``, the body is the chunk, at most
2 MiB) and then commits the manifest (``POST /api/v1/files``); a chunk the user already stores is
acknowledged without its bytes being stored again. Downloads go chunk by chunk
(``GET /api/v1/chunks/{sha256}``), each verified by its hash.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from neuranet.server.api import owned_device, read_body
from neuranet.server.deps import EventsDep, FilesDep, StoreDep, User
from neuranet.server.edge import BINARY, refusals
from neuranet.server.events import FILE_DELETED, FILE_STORED, Event
from neuranet import api_models as v
from neuranet.api_requests import MAX_REPLICAS, FileIn
from neuranet.errors import BadUpstream, Conflict, Gone, Invalid, NoSpace, NotFound, TimedOut, TooLarge, Unauthorized, Unavailable
from neuranet.storage.chunks import MAX_CHUNK_SIZE, ChunkError, is_chunk_id

router = APIRouter(prefix="/api/v1", responses=refusals(Unauthorized))


def _chunk_name(chunk_id: str) -> str:
    if not is_chunk_id(chunk_id):
        raise Invalid(f"not a chunk name (64 lowercase hex digits): {chunk_id[:80]!r}")
    return chunk_id


@router.put("/chunks/{chunk_id}", response_model=v.ChunkStored, responses=refusals(Invalid, Conflict, TooLarge, NoSpace, Unavailable))
async def put_chunk(chunk_id: str, request: Request, user: User, files: FilesDep,
                    replicas: int = Query(3, ge=1, le=MAX_REPLICAS)) -> dict[str, Any]:
    _chunk_name(chunk_id)
    body = await read_body(request, MAX_CHUNK_SIZE, f"a chunk is at most {MAX_CHUNK_SIZE} bytes")
    try:
        return await files.put_chunk(user.user_id, chunk_id, body, replicas)
    except ChunkError as exc:
        raise Invalid(str(exc)) from None


@router.get("/chunks/{chunk_id}", response_class=Response,
            responses={**BINARY, **refusals(Invalid, NotFound, Gone, Unavailable, TimedOut, BadUpstream)})
async def get_chunk(chunk_id: str, user: User, store: StoreDep, files: FilesDep) -> Response:
    _chunk_name(chunk_id)
    holders = (await store.files.replicas_of(user.user_id, [chunk_id])).get(chunk_id)
    if holders is None:
        raise NotFound(f"you store no chunk {chunk_id[:12]}")
    data = await files.fetch(user.user_id, chunk_id, holders)
    return Response(data, media_type="application/octet-stream")


@router.post("/files", response_model=v.FileCommitted, responses=refusals(Invalid, Conflict, NotFound, TooLarge))
async def commit_file(req: FileIn, user: User, store: StoreDep, files: FilesDep, events: EventsDep) -> dict[str, Any]:
    row, freed = await store.files.create_file(user.user_id, req.name, req.size, req.sha256, req.replicas, req.sealing,
                                         [(c.id, c.size) for c in req.chunks], overwrite=req.overwrite)
    await files.delete_replicas(freed)
    events.publish(Event(FILE_STORED, user.user_id, row.name, {"size": row.size, "chunks": len(req.chunks)}))
    ids = [c.id for c in req.chunks]
    holders = await store.files.replicas_of(user.user_id, sorted(set(ids)))
    return {**_file_view(row, len(req.chunks)), **files.replication_view(ids, holders, row.replicas)}


def _file_view(row: Any, chunks: int) -> dict[str, Any]:
    return {"name": row.name, "size": row.size, "sha256": row.sha256, "replicas": row.replicas,
            "encrypted": row.sealing is not None, "chunks": chunks, "created_at": row.created_at}


@router.get("/files", response_model=list[v.FileSummary])
async def list_files(user: User, store: StoreDep) -> list[dict[str, Any]]:
    return [{"name": f.name, "size": f.size, "sha256": f.sha256, "replicas": f.replicas,
             "encrypted": f.sealing is not None, "created_at": f.created_at} for f in await store.files.list_files(user.user_id)]


@router.get("/files/{name:path}", response_model=v.FileDetail, responses=refusals(NotFound))
async def file_info(name: str, user: User, store: StoreDep, files: FilesDep) -> dict[str, Any]:
    found = await store.files.get_file(user.user_id, name)
    if found is None:
        raise NotFound(f"no file named {name!r}")
    row, chunks = found
    ids = [c.chunk_id for c in chunks]
    holders = await store.files.replicas_of(user.user_id, sorted(set(ids)))
    names = {d.id: d.name for d in await store.devices.list_devices(user.user_id)}
    view = {**_file_view(row, len(chunks)), **files.replication_view(ids, holders, row.replicas)}
    view["sealing"] = row.sealing
    view["chunk_list"] = [{"id": c.chunk_id, "size": c.size,
                           "holders": [{"device": d, "name": names.get(d, d), "online": files.fleet.online(d)}
                                       for d in holders.get(c.chunk_id, [])]} for c in chunks]
    view["retrievable_now"] = all(any(files.fleet.online(d) for d in holders.get(c, [])) for c in ids)
    view["p_retrievable_24h"] = await files.file_availability(user.user_id, holders, ids)
    view["checked_at"] = time.time()
    return view


@router.delete("/files/{name:path}", response_model=v.FileDeleted, responses=refusals(NotFound))
async def delete_file(name: str, user: User, store: StoreDep, files: FilesDep, events: EventsDep) -> dict[str, Any]:
    freed = await store.files.delete_file(user.user_id, name)
    await files.delete_replicas(freed)
    events.publish(Event(FILE_DELETED, user.user_id, name))
    return {"deleted": name, "replicas_freed": sum(len(c) for c in freed.values())}


@router.get("/devices/{device_id}/chunks", response_model=v.DeviceChunks, responses=refusals(NotFound))
async def device_chunks(device_id: str, user: User, store: StoreDep, files: FilesDep) -> dict[str, Any]:
    device = await owned_device(device_id, user, store)
    chunks = await store.files.device_chunks(device_id)
    space = files.space.get(device_id)
    return {"device": device_id, "name": device.name, "chunks": len(chunks), "bytes": sum(chunks.values()),
            "quota_bytes": space.quota if space else None, "free_bytes": space.free if space else None,
            "chunk_ids": sorted(chunks)}
