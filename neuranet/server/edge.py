"""Validation at the REST edge: the request body size limit and how refusals are answered.

Request bodies are `neuranet.api_requests` models, which refuse what cannot be stored (lone
surrogates, numbers past 64 bits or not finite, values nested too deep). Bodies are bounded in bytes
before they are read whole: parsing JSON costs about ten times its size in memory."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from neuranet import errors
from neuranet.api_models import ErrorBody, InvalidBody
from neuranet.errors import NeuraNetError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 with where and why for each error, without echoing the input: the input may be what
    cannot be encoded (a lone surrogate, NaN), and a large body is not worth sending back."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": [_printable(p) for p in e.get("loc", ())], "msg": _printable(e.get("msg", "")),
               "type": _printable(e.get("type", ""))} for e in errors[:20]]
    return JSONResponse({"detail": detail}, status_code=422)


def _printable(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")[:500]


class BodyLimit:
    """ASGI middleware: a request body larger than its route's limit is answered 413 before it is
    read whole (a declared Content-Length over it is refused before reading anything)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int], buffer_limit: int | None = None) -> None:
        self.app = app
        self.limit_for = limit_for  # (method, path) -> bytes
        # Bodies a route may take beyond this (a chunk, a trace) reach it unread: such routes read
        # them after authenticating, bounded (api.read_body). Read here first, anyone without a
        # token could make the coordinator hold the largest of them on every connection.
        self.buffer_limit = buffer_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        if self.buffer_limit is not None and limit > self.buffer_limit:
            await self.app(scope, receive, send)
            return
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            size += len(message.get("body", b""))
            if size > limit:
                await _too_large(send, limit)
                return
            pieces.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(pieces), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"the request body is larger than this route accepts ({limit} bytes)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# The one place a domain error becomes an HTTP status; a subclass takes its nearest kind's status.
HTTP_STATUS: dict[type[NeuraNetError], int] = {
    errors.Invalid: 422, errors.NotFound: 404, errors.Conflict: 409, errors.Gone: 410, errors.TooLarge: 413,
    errors.Unauthorized: 401, errors.Forbidden: 403, errors.Unavailable: 503, errors.TimedOut: 504,
    errors.BadUpstream: 502, errors.NoSpace: 507, NeuraNetError: 400,
}


def status_of(kind: type[NeuraNetError]) -> int:
    """The status of ``kind``'s nearest kind in HTTP_STATUS (its first one in method resolution order)."""
    return next(HTTP_STATUS[k] for k in kind.__mro__ if k in HTTP_STATUS)


def http_status(exc: NeuraNetError) -> int:
    return status_of(type(exc))


async def domain_error(_request: Request, exc: Exception) -> JSONResponse:
    """A book's refusal as ``{"detail": message}`` with the status of its kind."""
    assert isinstance(exc, NeuraNetError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthorized) else None
    return JSONResponse({"detail": str(exc)}, status_code=http_status(exc), headers=headers)


# OpenAPI ``responses=`` of a route that answers 200 with raw bytes (a chunk, a run's weights).
BINARY: dict[int | str, dict[str, Any]] = {200: {"description": "The bytes.", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def refusals(*kinds: type[NeuraNetError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the domain errors a route may answer with: each kind's status
    (from HTTP_STATUS), its body (``{"detail": ...}``) and what it means (the kind's docstring)."""
    out: dict[int | str, dict[str, Any]] = {}
    for kind in kinds:
        status = status_of(kind)
        meaning = (kind.__doc__ or kind.__name__).strip().splitlines()[0]
        entry = out.setdefault(status, {"model": InvalidBody if status == 422 else ErrorBody, "description": ""})
        entry["description"] = f"{entry['description']} {meaning}".strip()
    return out


def document_body_refusals(schema: dict[str, Any]) -> dict[str, Any]:
    """Add to every operation that takes a JSON body the answers any such body may get, whatever the
    route: 400 (it is not JSON) and 413 (larger than the route accepts, from `BodyLimit`). In place;
    returns ``schema``."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    common = {"400": "The body is not JSON (or not UTF-8).", "413": "The body is larger than this route accepts."}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if "application/json" in op.get("requestBody", {}).get("content", {}):
                for status, why in common.items():
                    op["responses"].setdefault(status, {"description": why, "content": error})
    schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
        "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
    return schema
