"""The agent's door for programs on its own machine: the CLI uses the agent as its device on the fabric.

`neuranet files get` on a machine whose agent runs asks the agent for each chunk; the agent reads it
from its own store or fetches it from a holder over a PeerLink (direct when it can be, relayed
otherwise), so the bytes go device to device instead of through the coordinator.

A Unix socket, ``data_dir/agent.sock``, mode 0600: only the agent's own OS user can connect, the same
user who can read the agent's key. One request per line (a JSON object with an ``op``), answered by
one JSON line. A request or an answer with a ``size`` is followed by that many raw bytes:

    {"op": "whoami"}                                   -> {"ok": true, "device": "<id>"}
    {"op": "<registered op>", ...[, "size": n]} [+ n bytes]
                                                       -> {"ok": true, ...} [+ bytes] | {"ok": false, "error": "..."}

Requests are bounded (`MAX_REQUEST` bytes per line, `MAX_PAYLOAD` after it); a connection may send
any number of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("neuranet.local")

SOCKET_NAME = "agent.sock"
MAX_REQUEST = 1 << 20
MAX_PAYLOAD = 16 << 20
# An op gets the request and its bytes (b"" for none); its answer: a JSON-able dict, and bytes to
# send after it (b"" for none).
LocalHandler = Callable[[dict[str, Any], bytes], Awaitable[tuple[dict[str, Any], bytes]]]


class LocalRequestError(Exception):
    """A request an op refuses (bad fields); its message is the answer's error."""


class LocalApi:
    def __init__(self, device_id: Callable[[], str | None]) -> None:
        self._device_id = device_id
        self.ops: dict[str, LocalHandler] = {}
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None

    def register(self, op: str, handler: LocalHandler) -> None:
        self.ops[op] = handler

    async def start(self, data_dir: Path) -> None:
        path = Path(data_dir) / SOCKET_NAME
        if len(os.fsencode(path)) >= 100:  # AF_UNIX paths are limited to about 104-108 bytes
            log.warning("no local socket: the path %s is too long for a Unix socket", path)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an agent that did not shut down cleanly
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_REQUEST
                    await _answer(writer, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                    return
                if not line:
                    return
                answer, data = await self._handle(line, reader)
                await _answer(writer, answer, data)
                if answer.get("fatal"):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, line: bytes, reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return {"ok": False, "error": "a request is one JSON object per line"}, b""
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is one JSON object per line"}, b""
        size = request.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD:
            # The bytes that follow cannot be skipped reliably: answer, then end the connection.
            return {"ok": False, "error": f"size must be an integer in [0, {MAX_PAYLOAD}]", "fatal": True}, b""
        payload = await reader.readexactly(size) if size else b""
        op = request.get("op")
        if op == "whoami":
            return {"ok": True, "device": self._device_id(), "ops": sorted(self.ops)}, b""
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r} (known: whoami, {', '.join(sorted(self.ops))})"}, b""
        try:
            answer, data = await handler(request, payload)
        except LocalRequestError as exc:
            return {"ok": False, "error": str(exc)}, b""
        except Exception as exc:  # one bad request must not take the door down
            log.exception("local op %s failed", op)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b""
        return {"ok": True, **answer, **({"size": len(data)} if data else {})}, data


async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any], data: bytes = b"") -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    if data:
        writer.write(data)
    await writer.drain()


class LocalAgent:
    """The CLI's side: requests to the agent on this machine (blocking; one connection per request,
    so threads may share it)."""

    def __init__(self, data_dir: Path, timeout: float = 120.0) -> None:
        self.path = Path(data_dir) / SOCKET_NAME
        self.timeout = timeout
        self.device: str | None = None  # the agent's device id, once `find` has asked

    @classmethod
    def find(cls, data_dir: Path | None) -> LocalAgent | None:
        """The agent whose data dir is ``data_dir``, if its socket answers (``device`` set); else None."""
        if data_dir is None:
            return None
        agent = cls(data_dir)
        try:
            agent.device = agent.request({"op": "whoami"})[0].get("device")
        except (OSError, LocalRequestError):
            return None
        return agent

    def request(self, request: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """One request (with ``data`` after it); its answer and bytes. Raises `LocalRequestError` for a
        refusal, OSError when the agent cannot be reached."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            sock.sendall(json.dumps({**request, "size": len(data)} if data else request).encode() + b"\n")
            if data:
                sock.sendall(data)
            with sock.makefile("rb") as f:
                line = f.readline(MAX_REQUEST)
                if not line:
                    raise OSError("the agent closed the connection without answering")
                answer = json.loads(line)
                if not answer.get("ok"):
                    raise LocalRequestError(str(answer.get("error", "refused")))
                size = int(answer.get("size", 0))
                data = f.read(size) if size else b""
                if len(data) != size:
                    raise OSError(f"the agent sent {len(data)} of {size} bytes")
        return answer, data
