"""A small synchronous REST client for the coordinator, used by the CLI and the demo."""

from __future__ import annotations

import functools
import json
import os
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from neuranet import api_models as v
from neuranet import api_requests as q
from neuranet.config import ClientConfig, default_home
from neuranet.server.events import STREAM_OPEN, Event


@functools.lru_cache(maxsize=None)
def _shape(answer: Any) -> TypeAdapter[Any]:
    return TypeAdapter(answer)


class ClientError(Exception):
    """The server refused a request; the message is the server's explanation."""


class ServerUnreachable(ClientError):
    """No answer came back (connection refused or reset, timeout) or a proxy said the server is away
    (502/503/504 without a NeuraNet reason): trying again later may work."""


AWAY_STATUSES = frozenset({502, 503, 504})


class InvalidRequest(ClientError):
    """A request the client did not send: it does not fit the API's request model, so the server would
    refuse it too. The message names each field and why."""


def body(shape: type[BaseModel], /, **fields: Any) -> dict[str, Any]:
    """A request body built from its `api_requests` model: checked as the server checks it, and only the
    fields given (the server fills in the same defaults)."""
    try:
        return shape.model_validate(fields).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid request: {validation_message(exc.errors())}") from None


def validation_message(errors: list[Any], flags: dict[str, str] | None = None) -> str:
    """Pydantic errors (a 422's ``detail`` or ``ValidationError.errors()``) as one line naming each field,
    or the command-line flag ``flags`` maps its name to."""
    parts = []
    for e in errors:
        if not isinstance(e, dict):
            parts.append(str(e))
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        msg = str(e.get("msg", e)).removeprefix("Value error, ")
        name = (flags or {}).get(loc.split(".")[0], loc)
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts)


T = TypeVar("T")


@dataclass(frozen=True)
class Patience:
    """How a poll rides out a server that does not answer (paused, restarting, a flaky network): each
    try waits ``request_timeout``; tries are spaced ``base`` seconds, doubling up to ``cap``; after
    ``give_up`` seconds without an answer it stops."""

    request_timeout: float = 10.0
    base: float = 0.5
    cap: float = 8.0
    give_up: float = 300.0


def patiently(call: Callable[[], T], patience: Patience, note: Callable[[str], None],
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried while it raises `ServerUnreachable`, within ``patience``; ``note`` tells the
    user when the server stops answering and when it is back. Other refusals are raised at once."""
    lost_at: float | None = None
    tries = 0
    while True:
        try:
            result = call()
        except ServerUnreachable as exc:
            now = clock()
            if lost_at is None:
                lost_at = now
                note(f"{exc}; trying again for up to {patience.give_up:.0f} s")
            elif now - lost_at >= patience.give_up:
                raise ServerUnreachable(f"{exc} (no answer for {now - lost_at:.0f} s)") from None
            sleep(min(patience.cap, patience.base * 2**tries))
            tries += 1
            continue
        if lost_at is not None:
            note(f"the server answers again after {clock() - lost_at:.1f} s")
        return result


def client_config_path(home: Path | None = None) -> Path:
    return (home or default_home()) / "client.json"


def save_client_config(cfg: ClientConfig, home: Path | None = None, overwrite: bool = True) -> Path | None:
    path = client_config_path(home)
    if path.exists() and not overwrite:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server_url": cfg.server_url, "token": cfg.token,
                   "ca_cert": str(cfg.ca_cert) if cfg.ca_cert else None, "pinned": cfg.pinned}, f)
    return path


def load_client_config(server: str | None, token: str | None, home: Path | None = None) -> ClientConfig:
    """Explicit options win over the saved login in ``client.json``."""
    saved: dict[str, Any] = {}
    path = client_config_path(home)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise ClientError(f"{path} is not valid JSON; run `neuranet login` again or delete it") from None
        if not isinstance(saved, dict):
            raise ClientError(f"{path} does not hold a saved login; run `neuranet login` again or delete it")
    server_url = server or saved.get("server_url")
    tok = token or saved.get("token")
    if not server_url or not tok:
        raise ClientError(
            "no server or token: run `neuranet login --server URL --token TOKEN` or pass --server/--token "
            "(the admin token is printed when `neuranet server` first starts)"
        )
    ca = saved.get("ca_cert") if not server else None
    return ClientConfig(server_url=server_url.rstrip("/"), token=tok, ca_cert=Path(ca) if ca else None,
                        pinned=bool(ca and saved.get("pinned")))


def pin_server_certificate(server_url: str, expected: str, home: Path | None = None) -> Path:
    """Fetch the certificate ``server_url`` presents, check it has fingerprint ``expected`` and keep
    it as the one certificate the CLI trusts for that server (``server-cert.pem``)."""
    from urllib.parse import urlsplit

    from neuranet.protocol.auth import fingerprint

    parts = urlsplit(server_url)
    if parts.scheme != "https" or not parts.hostname:
        raise ClientError("--server-fingerprint pins a TLS certificate: give an https:// server URL")
    try:
        pem = ssl.get_server_certificate((parts.hostname, parts.port or 443), timeout=10)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot reach the server at {server_url}: {exc}") from None
    seen = fingerprint(ssl.PEM_cert_to_DER_cert(pem))
    if seen != expected:
        raise ClientError(f"{server_url} presented TLS certificate {seen}, but --server-fingerprint is {expected}; "
                          "not logging in")
    path = (home or default_home()) / "server-cert.pem"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(pem)
    return path


EVENT_READ_TIMEOUT = 8.0  # seconds without a byte before an event stream counts as broken (keepalives: every 2)


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events (one line each, without line ends) -> the events their ``data:`` JSON holds.
    Comments (keepalives) and events without data are skipped."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                try:
                    doc = json.loads("\n".join(data))
                    event = Event.from_json(doc)
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ClientError(f"the event stream sent something that is not an event: {data[0][:80]!r}") from None
                data = []
                yield event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)


class Client:
    """The coordinator's REST API as methods. Answers are the JSON of `neuranet.api_models`' models
    (``RunView.model_validate(client.run(run_id))`` types one); refusals raise `ClientError`."""

    def __init__(self, cfg: ClientConfig, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``transport``: an httpx transport to speak through instead of the network (tests pass one that
        runs the app in-process; see tests/inprocess.py)."""
        verify: Any = True
        if cfg.ca_cert:
            verify = ssl.create_default_context(cafile=str(cfg.ca_cert))
            # Pinned: the only certificate trusted is the server's own, so its names need not match.
            verify.check_hostname = not cfg.pinned
        self._http = httpx.Client(base_url=cfg.server_url, headers={"Authorization": f"Bearer {cfg.token}"},
                                  timeout=timeout, verify=verify, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, answer: Any = None, **kw: Any) -> Any:
        """The JSON answer to a request; with ``answer`` (an `api_models` shape, or a list of one) it is checked
        against that shape, the one the route declares, and returned as plain JSON values in it."""
        body = self._json(method, path, **kw)
        if answer is None:
            return body
        shape = _shape(answer)
        try:
            return shape.dump_python(shape.validate_python(body), mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "the body"
            raise ClientError(f"{self._http.base_url} answered {method} {path} with a body that is not what the "
                              f"API declares ({where}: {first.get('msg')}); is the server a different version?") from None

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the server at {self._http.base_url}: "
                                    f"{str(exc) or type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise self._refusal(resp)
        try:
            return resp.json()
        except ValueError:
            raise ClientError(f"{self._http.base_url} answered {method} {path} with something other than JSON; "
                              "is that a NeuraNet server?") from None

    def _refusal(self, resp: httpx.Response) -> ClientError:
        """The error a 4xx/5xx answer means, in the server's words."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
        if isinstance(detail, list):  # request validation: which field, and why
            detail = validation_message(detail)
        if resp.status_code in AWAY_STATUSES and not isinstance(body, dict):
            return ServerUnreachable(f"{resp.status_code}: the server at {self._http.base_url} is away "
                                     f"({resp.reason_phrase})")
        return ClientError(f"{resp.status_code}: {detail}")

    def events(self, kinds: Iterable[str] | None = None, last_event_id: int | None = None, reconnect: bool = True,
               patience: Patience = Patience(), note: Callable[[str], None] = lambda _m: None) -> Iterator[Event]:
        """Your events as they happen (``GET /api/v1/events``), until you stop iterating. ``kinds``: kinds or
        families (``"device"``, ``"run.state"``); default all. With ``reconnect``, a stream that ends or
        breaks (the server restarting, this client dropped as too slow) is opened again with the last
        event's id, so missed events are sent (or a ``stream.gap`` says to reread); the stream's own
        ``stream.dropped``/``stream.gap`` events are yielded too, and a ``stream.open`` each time the stream
        is (re)opened: state read after it misses no later change. Refusals (a bad token) raise."""
        after = last_event_id
        lost_at: float | None = None
        tries = 0
        while True:
            try:
                for event in self._event_stream(kinds, after):
                    if lost_at is not None:
                        note(f"the server answers again after {time.monotonic() - lost_at:.1f} s")
                    lost_at, tries = None, 0
                    after = event.seq or after
                    yield event
                if not reconnect:
                    return
            except ServerUnreachable as exc:
                if not reconnect:
                    raise
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                    note(f"{exc}; trying again for up to {patience.give_up:.0f} s")
                elif now - lost_at >= patience.give_up:
                    raise ServerUnreachable(f"{exc} (no answer for {now - lost_at:.0f} s)") from None
            time.sleep(min(patience.cap, patience.base * 2**tries))  # also after a stream that ended: no hot loop
            tries += 1

    def _event_stream(self, kinds: Iterable[str] | None, after: int | None) -> Iterator[Event]:
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        wanted = ",".join(kinds) if kinds is not None else ""
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENT_READ_TIMEOUT)
        try:
            with self._http.stream("GET", "/api/v1/events", params={"kinds": wanted} if wanted else None,
                                   headers=headers, timeout=timeout) as resp:
                if resp.status_code == 503:
                    raise ServerUnreachable(f"503: the server at {self._http.base_url} is not taking event streams now")
                if resp.status_code >= 400:
                    resp.read()
                    raise self._refusal(resp)
                yield Event(STREAM_OPEN, None, "")  # subscribed: state read from now on misses nothing
                yield from parse_sse(resp.iter_lines())
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the server at {self._http.base_url}: the event stream broke "
                                    f"({str(exc) or type(exc).__name__})") from None

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def health(self) -> dict[str, Any]:
        """The coordinator's version, load and the fingerprint agents pin (``/healthz``)."""
        return self.request("GET", "/healthz", answer=v.Health)

    def me(self) -> dict[str, Any]:
        return self.request("GET", "/api/v1/me", answer=v.Me)

    def create_token(self, name: str, expires_in_seconds: float | None = 90 * 86400.0) -> str:
        """A new API token valid ``expires_in_seconds`` (None: until revoked)."""
        return self.request("POST", "/api/v1/tokens", json=body(q.TokenRequest, name=name, expires_in_seconds=expires_in_seconds),
                            answer=v.NewToken)["token"]

    def tokens(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/tokens", answer=list[v.TokenView])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/v1/tokens/{quote(token_id, safe='')}", answer=v.TokenRevoked)

    def remove_device(self, device_id: str, force: bool = False) -> dict[str, Any]:
        return self.request("DELETE", f"/api/v1/devices/{quote(device_id, safe='')}", params={"force": force},
                            answer=v.DeviceRemoved)

    def users(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/users", answer=list[v.UserView])

    def set_user_disabled(self, name: str, disabled: bool) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/users/{quote(name, safe='')}/{'disable' if disabled else 'enable'}",
                            answer=v.UserDisabled)

    def create_join_token(self, ttl_seconds: float | None = None) -> dict[str, Any]:
        return self.request("POST", "/api/v1/join-tokens", json=body(q.JoinTokenRequest, **({"ttl_seconds": ttl_seconds} if ttl_seconds else {})),
                            answer=v.NewJoinToken)

    def create_user(self, name: str, is_admin: bool = False) -> dict[str, Any]:
        return self.request("POST", "/api/v1/users", json=body(q.UserRequest, name=name, is_admin=is_admin),
                            answer=v.NewUser)

    def devices(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/devices", answer=list[v.DeviceView])

    def start_linktest(self, src: str, dst: str, total_bytes: int, message_bytes: int) -> dict[str, Any]:
        return self.request("POST", "/api/v1/linktests", json=body(q.LinkTestRequest, src=src, dst=dst, total_bytes=total_bytes,
                                                                message_bytes=message_bytes), answer=v.LinkTestView)

    def linktest(self, test_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/linktests/{test_id}", answer=v.LinkTestView)

    def start_run(self, **request: Any) -> dict[str, Any]:
        """Start a training run; ``request``: the fields of `api_requests.RunRequest`."""
        return self.request("POST", "/api/v1/runs", json=body(q.RunRequest, **request), answer=v.RunView)

    def run(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/runs/{run_id}", answer=v.RunView, **({"timeout": timeout} if timeout else {}))

    def runs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/runs", answer=list[v.RunSummary])

    def deploy(self, **request: Any) -> dict[str, Any]:
        """Deploy a model for inference; ``request``: the fields of `api_requests.DeployRequest`."""
        return self.request("POST", "/api/v1/deployments", json=body(q.DeployRequest, **request),
                            answer=v.DeploymentView)

    def deployment(self, dep_id: str, wait: float = 0.0) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/deployments/{dep_id}", params={"wait": wait}, answer=v.DeploymentView)

    def infer(self, dep_id: str, inputs: list[Any]) -> list[Any]:
        return self.request("POST", f"/api/v1/deployments/{dep_id}/infer", json=body(q.InferRequest, inputs=inputs),
                            answer=v.InferResult)["outputs"]

    def generate(self, dep_id: str, prompt: str, **options: Any) -> str:
        return self.request("POST", f"/api/v1/deployments/{dep_id}/generate", json=body(q.GenerateRequest, prompt=prompt, **options),
                            answer=v.Generated)["text"]

    def stop_deployment(self, dep_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/v1/deployments/{dep_id}", answer=v.DeploymentView)

    def forecast(self, device_id: str | None = None, simulated: bool = True) -> Any:
        if device_id is not None:
            return self.request("GET", f"/api/v1/devices/{device_id}/forecast", answer=v.Forecast)
        return self.request("GET", "/api/v1/forecast", params={"simulated": simulated}, answer=list[v.Forecast])

    def retrain_forecaster(self) -> dict[str, Any]:
        return self.request("POST", "/api/v1/forecast/retrain", timeout=1800.0, answer=v.ForecasterInfo)

    def import_trace(self, csv_bytes: bytes, prefix: str = "trace", replace: bool = False) -> dict[str, Any]:
        return self.request("POST", "/api/v1/traces", params={"prefix": prefix, "replace": replace}, content=csv_bytes,
                            headers={"Content-Type": "text/csv"}, answer=v.TraceImported)

    def traces(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/traces", answer=list[v.TraceSummary])

    def remove_trace(self, prefix: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/v1/traces/{quote(prefix, safe='')}", answer=v.TraceRemoved)

    def run_weights(self, run_id: str) -> bytes:
        resp = self._http.get(f"/api/v1/runs/{run_id}/weights")
        if resp.status_code >= 400:
            raise ClientError(f"{resp.status_code}: {resp.json().get('detail', resp.text)}")
        return resp.content

    # --- files ------------------------------------------------------------------------

    def put_chunk(self, chunk_id: str, data: bytes, replicas: int) -> dict[str, Any]:
        return self.request("PUT", f"/api/v1/chunks/{chunk_id}", params={"replicas": replicas}, content=data,
                            headers={"Content-Type": "application/octet-stream"}, answer=v.ChunkStored)

    def get_chunk(self, chunk_id: str) -> bytes:
        try:
            resp = self._http.get(f"/api/v1/chunks/{chunk_id}")
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the server at {self._http.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ClientError(f"{resp.status_code}: {detail}")
        return resp.content

    def commit_file(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/files", json=body(q.FileIn, **manifest), answer=v.FileCommitted)

    def files(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/files", answer=list[v.FileSummary])

    def file_info(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/files/{quote(name)}", answer=v.FileDetail)

    def delete_file(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/v1/files/{quote(name)}", answer=v.FileDeleted)

    def device_chunks(self, device_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/devices/{device_id}/chunks", answer=v.DeviceChunks)

    def resolve_device(self, name_or_id: str) -> dict[str, Any]:
        """Find one of the user's devices by id, id prefix or name."""
        devices = self.devices()
        exact = [d for d in devices if name_or_id in (d["id"], d["name"])]
        found = exact or [d for d in devices if d["id"].startswith(name_or_id)]
        if len(found) != 1:
            raise ClientError(f"{'no' if not found else 'more than one'} device matches {name_or_id!r}")
        return found[0]
