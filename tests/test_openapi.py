"""/openapi.json describes every answer: each operation's 2xx body has a schema, and each error it
documents has the ``{"detail": ...}`` body."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from neuranet.config import ServerConfig
from neuranet.server.app import create_app

METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return create_app(ServerConfig(data_dir=Path(tmp_path_factory.mktemp("openapi")))).openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()
            if method in METHODS]


def _schema(response: dict[str, Any]) -> dict[str, Any]:
    content = response.get("content", {})
    return next(iter(content.values()), {}).get("schema", {}) if content else {}


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _is_stream(response: dict[str, Any]) -> bool:
    """Server-sent events: a stream of text whose events the route's description names."""
    return "text/event-stream" in response.get("content", {})


def _is_described(spec: dict[str, Any], schema: dict[str, Any]) -> bool:
    """A schema that says what is in the body: a named model, an array of them, or bytes."""
    schema = _resolve(spec, schema)
    if schema.get("type") == "array":
        return _is_described(spec, schema.get("items", {}))
    if schema.get("type") == "string" and schema.get("format") == "binary":
        return True
    return schema.get("type") == "object" and bool(schema.get("properties"))


def test_the_app_has_the_routes_the_cli_uses(spec: dict[str, Any]) -> None:
    ops = {(m, p) for m, p, _ in _operations(spec)}
    assert {("GET", "/healthz"), ("GET", "/api/v1/devices"), ("POST", "/api/v1/runs"),
            ("GET", "/api/v1/files/{name}"), ("GET", "/api/v1/forecast"), ("DELETE", "/api/v1/tokens/{token_id}")} <= ops
    assert len(ops) >= 39


def test_every_operation_documents_a_2xx_body_with_a_schema(spec: dict[str, Any]) -> None:
    undescribed = []
    for method, path, op in _operations(spec):
        ok = [r for status, r in op["responses"].items() if status.startswith("2")]
        if not ok or not all(_is_stream(r) or _is_described(spec, _schema(r)) for r in ok):
            undescribed.append(f"{method} {path}")
    assert undescribed == []


def test_every_documented_error_has_the_detail_body(spec: dict[str, Any]) -> None:
    wrong = []
    for method, path, op in _operations(spec):
        for status, response in op["responses"].items():
            if status[0] in "45":
                body = _resolve(spec, _schema(response))
                if "detail" not in body.get("properties", {}):
                    wrong.append(f"{method} {path} {status}")
    assert wrong == []


def test_every_authenticated_operation_documents_401(spec: dict[str, Any]) -> None:
    missing = [f"{m} {p}" for m, p, op in _operations(spec) if p.startswith("/api/") and "401" not in op["responses"]]
    assert missing == []


def test_a_domain_error_is_documented_with_its_status_and_meaning(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/api/v1/runs/{run_id}/weights"]["get"]["responses"]
    assert "not there" in responses["404"]["description"]
    assert responses["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "application/octet-stream" in responses["200"]["content"]


def test_every_json_body_route_documents_a_malformed_or_too_large_body(spec: dict[str, Any]) -> None:
    missing = [f"{m} {p}" for m, p, op in _operations(spec)
               if "application/json" in op.get("requestBody", {}).get("content", {})
               and not {"400", "413", "422"} <= set(op["responses"])]
    assert missing == []
    assert "/api/v1/tokens" in spec["paths"] and "400" in spec["paths"]["/api/v1/tokens"]["post"]["responses"]


# Each Client method with arguments for one call; a new method is added here (the test below checks).
CLIENT_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "health": ((), {}), "me": ((), {}), "create_token": (("laptop",), {}), "tokens": ((), {}),
    "revoke_token": (("t1",), {}), "remove_device": (("d1",), {"force": True}), "users": ((), {}),
    "set_user_disabled": (("bob", True), {}), "create_join_token": ((60.0,), {}), "create_user": (("bob",), {}),
    "devices": ((), {}), "start_linktest": (("a", "b", 1, 1), {}), "linktest": (("t1",), {}),
    "start_run": ((), {"model": "mlp-digits"}), "run": (("r1",), {}), "runs": ((), {}),
    "deploy": ((), {"model": "mlp-digits"}), "deployment": (("p1",), {}), "infer": (("p1", [[0.0]]), {}),
    "generate": (("p1", "hi"), {}), "stop_deployment": (("p1",), {}), "forecast": (("d1",), {}),
    "retrain_forecaster": ((), {}), "import_trace": ((b"",), {}), "traces": ((), {}), "remove_trace": (("p",), {}),
    "run_weights": (("r1",), {}), "put_chunk": (("c1", b"x", 1), {}), "get_chunk": (("c1",), {}),
    "commit_file": (({"name": "a", "size": 0, "sha256": "0" * 64, "chunks": []},), {}), "files": ((), {}), "file_info": (("a b.txt",), {}),
    "delete_file": (("a b.txt",), {}), "device_chunks": (("d1",), {}),
}
NOT_ONE_REQUEST = {"close", "request", "base_url", "resolve_device", "events"}  # helpers; events streams


def test_every_request_the_client_makes_is_a_documented_operation(spec: dict[str, Any]) -> None:
    import re

    from neuranet.client import Client, ClientError
    from neuranet.config import ClientConfig

    public = {n for n in dir(Client) if not n.startswith("_")} - NOT_ONE_REQUEST
    assert public == set(CLIENT_CALLS), "give each new Client method a call in CLIENT_CALLS"
    sent: list[httpx.Request] = []
    answer = {"token": "t", "outputs": [], "text": ""}

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=answer)

    operations = [(m, re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)))) for m, p, _ in _operations(spec)]
    with Client(ClientConfig(server_url="http://coordinator.test", token="t"), transport=httpx.MockTransport(record)) as c:
        for name, (args, kwargs) in CLIENT_CALLS.items():
            try:
                getattr(c, name)(*args, **kwargs)
            except ClientError as exc:  # the stand-in answer is not the route's shape: refused after it was sent
                assert "not what the API declares" in str(exc) or name == "resolve_device", exc
        with pytest.raises(ClientError):
            c.forecast()  # the other path of forecast()
    undocumented = [f"{r.method} {r.url.path}" for r in sent
                    if not any(r.method == m and path.fullmatch(r.url.path) for m, path in operations)]
    assert len(sent) == len(CLIENT_CALLS) + 1 and undocumented == []


def test_every_json_request_body_is_a_model_of_api_requests(spec: dict[str, Any]) -> None:
    """The routers take the models the client builds its bodies from (and a web UI reads from the spec)."""
    from pydantic import BaseModel

    from neuranet import api_requests

    def model(schema: dict[str, Any]) -> str:  # an optional body is anyOf [the model, null]
        refs = [s["$ref"] for s in [schema, *schema.get("anyOf", [])] if "$ref" in s]
        return refs[0].rsplit("/", 1)[-1] if len(refs) == 1 else ""

    bodies = {f"{m} {p}": model(_schema({"content": op["requestBody"]["content"]}))
              for m, p, op in _operations(spec)
              if "application/json" in op.get("requestBody", {}).get("content", {})}
    assert {"POST /api/v1/runs", "POST /api/v1/deployments", "POST /api/v1/files", "POST /api/v1/users"} <= set(bodies)
    foreign = {op: name for op, name in bodies.items()
               if not (isinstance(getattr(api_requests, name, None), type)
                       and issubclass(getattr(api_requests, name), BaseModel))}
    assert foreign == {}
