"""Bad or oversized REST input gets a clear 4xx, never a 500, and leaves no half-made record."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from api_app import api_app, raw_agent, send
from neuranet.config import Limits
from neuranet.protocol import messages as m
from neuranet.protocol.json_values import JsonBounds, JsonValueError, check_json_value
from neuranet.server.app import body_limit
from neuranet.server.edge import BodyLimit
from neuranet.server.models import Run
from neuranet.storage.chunks import MAX_FILE_CHUNKS, MAX_CHUNK_SIZE
from neuranet.storage.kdf import ScryptParams
from neuranet.storage.sealing import NONCE, TAG, SealedFacts, Sealer

SEALING = Sealer.new(passphrase="pw", kdf=ScryptParams(n=2 ** 10)).describe(SealedFacts("f", 100, "0" * 64, 2))


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def manifest(size: int, chunk_sizes: list[int], sealing: dict[str, Any] | None = None, name: str = "f") -> dict[str, Any]:
    return {"name": name, "size": size, "sha256": "0" * 64, "sealing": sealing,
            "chunks": [{"id": f"{i:064x}", "size": n} for i, n in enumerate(chunk_sizes)]}


# --- the body limit, as ASGI -----------------------------------------------------------------


async def _drive(limit: int, pieces: int, piece: bytes, declared: int | None = None) -> tuple[int, int, bytes]:
    """Send ``pieces`` x ``piece`` through BodyLimit to an app that echoes the body's length; returns
    (status, pieces the middleware read, what the app saw)."""
    read = 0
    seen = b""

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": piece, "more_body": read < pieces}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal seen
        message = await receive()
        seen = message["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict[str, Any]] = []

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-length", str(declared).encode())] if declared is not None else []
    scope = {"type": "http", "method": "POST", "path": "/api/v1/x", "headers": headers}
    await BodyLimit(app, lambda method, path: limit)(scope, receive, record)
    return sent[0]["status"], read, seen


async def test_body_limit_refuses_an_oversized_body_before_reading_it_all() -> None:
    status, read, seen = await _drive(limit=2 * 2**20, pieces=100, piece=b"x" * 2**20)
    assert status == 413 and read == 3 and seen == b""  # stopped at the first piece past the limit
    status, read, _ = await _drive(limit=2 * 2**20, pieces=100, piece=b"x" * 2**20, declared=100 * 2**20)
    assert status == 413 and read == 0  # a declared length over the limit is refused unread
    status, read, seen = await _drive(limit=2 * 2**20, pieces=2, piece=b"x" * 2**20)
    assert status == 200 and seen == b"x" * 2 * 2**20  # within it: the app gets the whole body


def test_json_bodies_are_bounded_and_chunks_and_traces_keep_their_own_limits(tmp_path: Path) -> None:
    limits = Limits()
    with api_app(tmp_path) as c:
        big = b'{"name": "' + b"x" * limits.max_json_body_bytes + b'"}'
        r = c.post("/api/v1/tokens", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than this route accepts" in r.json()["detail"]
        # a chunk is up to its own size (refused here for want of devices, not for its size) ...
        assert c.put(f"/api/v1/chunks/{'0' * 64}", content=b"x" * MAX_CHUNK_SIZE).status_code not in (413, 500)
        assert c.put(f"/api/v1/chunks/{'0' * 64}", content=b"x" * (MAX_CHUNK_SIZE + 1)).status_code == 413
        # ... and a trace larger than a JSON body is read (and found to be no trace)
        r = c.post("/api/v1/traces", content=b"a,b\n" * (limits.max_json_body_bytes // 4 + 1))
        assert r.status_code == 422


def test_the_largest_manifest_fits_the_body_limit_and_one_chunk_more_is_refused(tmp_path: Path) -> None:
    chunks = [MAX_CHUNK_SIZE // 2] * MAX_FILE_CHUNKS
    body = json.dumps(manifest(sum(chunks), chunks)).encode()
    assert len(body) < Limits().max_json_body_bytes
    with api_app(tmp_path) as c:
        # every chunk is looked up (in batches: PostgreSQL binds at most 32,767 parameters in a statement)
        r = c.post("/api/v1/files", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 409 and f"{MAX_FILE_CHUNKS} chunk(s)" in r.json()["detail"], r.text
        r = c.post("/api/v1/files", json=manifest(MAX_CHUNK_SIZE, [1] * (MAX_FILE_CHUNKS + 1)))
        assert r.status_code == 422 and f"at most {MAX_FILE_CHUNKS} items" in r.text


def test_file_records_must_match_their_chunks_sealed_or_not(tmp_path: Path) -> None:
    with api_app(tmp_path) as c:
        for body, why in [
            (manifest(10**12, [], SEALING), "less than or equal to"),  # "1 TB in 0 chunks": too big
            (manifest(10 * 2**30, [], SEALING), "sealed chunk(s) hold 0 bytes"),  # and no chunks
            (manifest(2**63, [5], SEALING), "less than or equal to"),  # past any size a file may have
            (manifest(2**64 + 1, [5], SEALING), "less than or equal to"),
            (manifest(100, [40, 40]), "hold 80 bytes, not the file's 100"),
            (manifest(10, [40]), "hold 40 bytes, not the file's 10"),
            (manifest(100, [100 + NONCE + TAG], SEALING), "hold 128 bytes, not the file's 100"),  # ciphertext size
            (manifest(20, [20], SEALING), "a sealed chunk holds at least 29"),
            (manifest(156, [78, 78], {"algorithm": "aes-256-gcm", "kdf": None}), "unknown encryption format"),
            (manifest(5, [5 + NONCE + TAG], nested(40)), "sealing: nested deeper"),
        ]:
            r = c.post("/api/v1/files", json=body)
            assert r.status_code == 422 and why in r.text, (body["size"], r.text)
        # well-formed: refused only because the chunks were never uploaded
        for body in (manifest(80, [40, 40]), manifest(156, [50 + NONCE + TAG, 50 + NONCE + TAG], SEALING)):
            r = c.post("/api/v1/files", json=body)
            assert r.status_code == 409 and "not stored" in r.json()["detail"], r.text
        assert c.get("/api/v1/files").json() == []


def _raw_json(c: Any, path: str, body: str) -> Any:
    return c.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


def test_lone_surrogates_and_huge_numbers_are_refused_at_the_edge(tmp_path: Path) -> None:
    with api_app(tmp_path) as c:
        for path, body in [
            ("/api/v1/tokens", '{"name": "cli\\ud800"}'),
            ("/api/v1/files", json.dumps(manifest(1, [1], name="a\udc80b"))),
            ("/api/v1/runs", '{"model": "mlp-digits", "model_options": {"k\\udfff": 1}}'),
            ("/api/v1/runs", '{"model": "mlp-digits", "seed": 18446744073709551616}'),
            ("/api/v1/runs", '{"model": "mlp-digits", "model_options": {"hidden": 18446744073709551616}}'),
            ("/api/v1/runs", '{"model": "mlp-digits", "model_options": {"lr": NaN}}'),
            ("/api/v1/runs", '{"model": "mlp-digits", "devices": 100000000000000000000000}'),
            ("/api/v1/deployments", '{"model": "mlp-digits", "seed": -1}'),
            ("/api/v1/linktests", '{"src": "\\ud800", "dst": "b"}'),
        ]:
            r = _raw_json(c, path, body)
            assert r.status_code == 422, (path, body, r.status_code, r.text)
        assert c.get("/api/v1/me").status_code == 200  # the server carries on


def test_a_run_refused_at_the_edge_leaves_no_record_and_no_running_run(tmp_path: Path) -> None:
    with api_app(tmp_path) as c, raw_agent(c) as (ws, device_id):
        send(ws, m.Profile(profile={"cpu_gflops": 5.0, "ram_available_bytes": 2**30}), src=device_id)
        for bad in ({"seed": 2**64}, {"data_seed": 2**64 + 5}, {"model_options": {"hidden": 2**64}},
                    {"model_options": nested(30)}):
            r = c.post("/api/v1/runs", json={"model": "mlp-digits", "devices": [device_id], "steps": 2, **bad})
            assert r.status_code == 422, (bad, r.text)
        # options that pass the edge but that the model cannot take are refused while planning
        r = c.post("/api/v1/runs", json={"model": "mlp-digits", "devices": [device_id], "steps": 2,
                                         "model_options": {"hidden": 2**62}})
        assert r.status_code == 422 and "cannot plan" in r.json()["detail"], r.text
        store = c.app.state.store  # type: ignore[attr-defined]

        async def runs() -> int:
            async with store.session() as s:
                return (await s.execute(select(func.count()).select_from(Run))).scalar_one()

        assert c.portal.call(runs) == 0  # type: ignore[union-attr]
        assert c.app.state.coordinator.runs.runs == {}  # type: ignore[attr-defined]


def test_a_deep_profile_is_refused_on_the_socket_and_bad_stored_ones_do_not_break_devices(tmp_path: Path) -> None:
    with api_app(tmp_path) as c, raw_agent(c) as (ws, device_id):
        send(ws, m.Profile(profile={"cpu_gflops": 7.0}), src=device_id)
        ws.send_bytes(_deep_profile_frame(900, device_id))
        error = _next_error(ws)
        assert error.code == "invalid_message" and "nested deeper" in error.message, error
        devices = c.get("/api/v1/devices")
        assert devices.status_code == 200 and devices.json()[0]["profile"] == {"cpu_gflops": 7.0}
        store = c.app.state.store  # type: ignore[attr-defined]
        # rows stored before profiles were bounded: one too deep to encode, one too deep to even decode
        c.portal.call(store.devices.set_profile, device_id, nested(900))  # type: ignore[union-attr]
        assert c.get("/api/v1/devices").status_code == 200
        assert c.get(f"/api/v1/devices/{device_id}").json()["profile"] == {}

        async def store_raw() -> None:
            async with store._tx() as s:
                await s.execute(text("UPDATE devices SET profile = :p WHERE id = :d"),
                                {"p": '{"a":' * 5000 + "1" + "}" * 5000, "d": device_id})

        c.portal.call(store_raw)  # type: ignore[union-attr]
        r = c.get("/api/v1/devices")
        assert r.status_code == 200 and r.json()[0]["profile"] == {}


def _deep_profile_frame(depth: int, src: str) -> bytes:
    """A profile frame built by hand: the typed message refuses to be made with such a profile."""
    from neuranet.protocol.envelope import Envelope, encode_frame

    return encode_frame(Envelope(type="profile", body={"profile": nested(depth)}, id=7, src=src))


def _next_error(ws: Any) -> m.Error:
    from api_app import recv

    for _ in range(100):  # skip what the server sends of its own accord (bounded)
        msg = recv(ws)
        if isinstance(msg, m.Error):
            return msg
    raise AssertionError("no error frame from the server")


def test_check_json_value_bounds() -> None:
    bounds = JsonBounds(max_depth=3, max_items=10, max_string=5)
    assert check_json_value({"a": [1, 2.5, None, True, "abc"]}, bounds) == {"a": [1, 2.5, None, True, "abc"]}
    for bad, why in [({"a": {"b": {"c": {}}}}, "deeper"), (list(range(11)), "members"), ("abcdef", "longer"),
                     ({"a": "\ud800"}, "surrogate"), ({"\udc00": 1}, "surrogate"), (2**63, "64 bits"),
                     (-(2**63) - 1, "64 bits"), (float("inf"), "finite"), ({1: 2}, "keys must be strings"),
                     (b"x", "not a JSON value")]:
        with pytest.raises(JsonValueError, match=why):
            check_json_value(bad, bounds)
    check_json_value(nested(5000), JsonBounds(max_depth=10_000, max_items=10_000))  # iterative: no RecursionError


# --- traces ----------------------------------------------------------------------------------


def _trace(hosts: int) -> bytes:
    rows = ["client_id,event_type,event_start,event_end"]
    rows += [f"h{i},1,0,{3600 * (i + 1)}" for i in range(hosts)]
    return ("\n".join(rows) + "\n").encode()


def test_trace_imports_are_idempotent_bounded_per_user_and_removable(tmp_path: Path) -> None:
    with api_app(tmp_path, Limits(max_trace_devices_per_user=5)) as c:
        def put(hosts: int, prefix: str, replace: bool = False) -> Any:
            return c.post("/api/v1/traces", params={"prefix": prefix, "replace": replace}, content=_trace(hosts))

        assert put(3, "seti").json()["devices"] == 3
        again = put(3, "seti")
        assert again.status_code == 409 and "--replace" in again.json()["detail"]
        assert put(2, "seti", replace=True).json()["devices"] == 2
        names = sorted(d["name"] for d in c.get("/api/v1/devices").json())
        assert names == ["seti-h0", "seti-h1"]  # replaced, not added to
        too_many = put(4, "other")
        assert too_many.status_code == 409 and "more than the 5" in too_many.json()["detail"]
        assert put(6, "alone").status_code == 422  # more hosts than any user may have
        assert put(3, "other").status_code == 200
        listed = c.get("/api/v1/traces").json()
        assert [(t["prefix"], t["devices"]) for t in listed] == [("other", 3), ("seti", 2)]
        gone = c.delete("/api/v1/traces/seti")
        assert gone.json() == {"prefix": "seti", "removed": 2}
        assert c.delete("/api/v1/traces/seti").status_code == 404
        assert sorted(d["name"] for d in c.get("/api/v1/devices").json()) == ["other-h0", "other-h1", "other-h2"]
        forecast = c.get("/api/v1/forecast")
        assert forecast.status_code == 200 and len(forecast.json()) == 3  # their history went with them


def test_docs_are_served_from_the_package(tmp_path: Path) -> None:
    with api_app(tmp_path) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page.text)
        urls = [a or b for a, b in urls]
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls), urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"/docs loads {url} from elsewhere"
            assert c.get(url).status_code == 200, url
        assert "http://" not in page.text and "https://" not in page.text



def test_files_put_refuses_a_file_past_the_largest_size_before_uploading(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app
    from neuranet.storage.chunks import MAX_FILE_BYTES

    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    # no server at that address: the refusal comes before anything is sent
    out = CliRunner().invoke(app, ["files", "put", str(huge), "--server", "http://127.0.0.1:9", "--token", "nn_x",
                                   "--no-agent"])
    assert out.exit_code == 1 and "files are stored up to 64.0 GiB" in out.output, out.output


async def test_a_large_body_route_answers_before_the_body_is_read() -> None:
    # Routes with their own, larger limit (a chunk, a trace) read the body after authenticating,
    # bounded (api.read_body). Buffering it first would let anyone without a token make the
    # coordinator hold 64 MiB per connection; the app must be reached with the body unread.
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * 2**20, "more_body": read < 32}

    async def refuses_unread(scope: Any, receive: Any, send: Any) -> None:  # as a route whose token is wrong
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict[str, Any]] = []

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/traces", "headers": []}
    limits = Limits()
    await BodyLimit(refuses_unread, body_limit(limits), buffer_limit=limits.max_json_body_bytes)(scope, receive, record)
    assert sent[0]["status"] == 401 and read == 0
