"""The REST routers driven through `Client` against the real app in-process (tests/inprocess.py):
no subprocess, no socket, no agent. What needs no connected device: users and tokens, devices
(simulated ones from an imported trace), runs and deployments refused, files metadata, forecasts,
link tests, and the refusals (401, 403, 404, 409, 422) each in the user's words."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inprocess import InProcess, client, inprocess_app
from neuranet import __version__
from neuranet import api_models as v
from neuranet.client import Client, ClientError, InvalidRequest

TRACE = b"client_id,event_type,event_start,event_end\n" + b"".join(
    f"{c},1,{s},{s + 1800}\n{c},0,{s + 1800},{s + 3600}\n".encode() for c in ("a", "b") for s in range(0, 36000, 3600))
_names = itertools.count()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcess, str]]:
    with inprocess_app(Path(tmp_path_factory.mktemp("routes"))) as started:
        yield started


@pytest.fixture(autouse=True)
def answers_are_documented(coordinator: tuple[InProcess, str]) -> Iterator[None]:
    """Every status a test's requests got is one /openapi.json documents for that operation."""
    transport = coordinator[0]
    first = len(transport.answers)
    yield
    spec = transport.app.openapi()
    operations = [(method.upper(), re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path))), set(op["responses"]))
                  for path, ops in spec["paths"].items() for method, op in ops.items()]
    undocumented = [f"{m} {p} {status}" for m, p, status in transport.answers[first:]
                    if not any(m == om and path.fullmatch(p) and str(status) in statuses
                               for om, path, statuses in operations)]
    assert undocumented == []


@pytest.fixture
def admin(coordinator: tuple[InProcess, str]) -> Iterator[Client]:
    transport, token = coordinator
    with client(transport, token) as c:
        yield c


@pytest.fixture
def user(coordinator: tuple[InProcess, str], admin: Client) -> Iterator[Client]:
    """A fresh non-admin user of its own (no devices, no files)."""
    created = admin.create_user(f"user{next(_names)}")
    with client(coordinator[0], created["token"]) as c:
        yield c


@pytest.fixture
def simulated(user: Client) -> list[v.DeviceView]:
    """Two offline devices of ``user``'s, imported from a trace."""
    user.import_trace(TRACE, prefix="sim")
    return [v.DeviceView.model_validate(d) for d in user.devices()]


def refused(status: int, match: str = "") -> pytest.RaisesExc[ClientError]:
    return pytest.raises(ClientError, match=f"^{status}: .*{match}")


def not_sent(match: str) -> pytest.RaisesExc[InvalidRequest]:
    """The client refuses the body before sending it, with the words the server's 422 has."""
    return pytest.raises(InvalidRequest, match=f"^invalid request: .*{match}")


# --- health and authentication -------------------------------------------------------------


def test_health_says_the_version_and_no_device_online(admin: Client) -> None:
    health = v.Health.model_validate(admin.health())
    assert health.ok and health.version == __version__ and health.online_devices == 0


def test_a_request_without_a_token_is_401_and_says_how_to_pass_one(coordinator: tuple[InProcess, str]) -> None:
    with httpx.Client(transport=coordinator[0], base_url="http://coordinator.test") as raw:
        answer = raw.get("/api/v1/me")
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in v.ErrorBody.model_validate(answer.json()).detail


def test_an_unknown_token_is_401(coordinator: tuple[InProcess, str]) -> None:
    with client(coordinator[0], "not-a-token") as c, refused(401, "invalid API token"):
        c.me()


# --- users and tokens --------------------------------------------------------------------


def test_admin_creates_a_user_who_can_sign_in(admin: Client, coordinator: tuple[InProcess, str]) -> None:
    created = v.NewUser.model_validate(admin.create_user("carol"))
    with client(coordinator[0], created.token) as carol:
        assert carol.me() == {"user_id": created.user_id, "name": "carol", "is_admin": False}
    assert "carol" in {u["name"] for u in admin.users()}
    with refused(409):
        admin.create_user("carol")


def test_a_user_name_is_checked_field_by_field(admin: Client) -> None:
    with refused(422, "name: String should match pattern"):
        admin.request("POST", "/api/v1/users", json={"name": "two words"})
    with not_sent("name: String should match pattern"):
        admin.create_user("two words")


def test_only_an_admin_creates_or_lists_users(user: Client) -> None:
    with refused(403, "only an admin can create users"):
        user.create_user("mallory")
    with refused(403, "only an admin can manage users"):
        user.users()


def test_tokens_are_listed_without_secrets_and_revoked(user: Client, coordinator: tuple[InProcess, str]) -> None:
    laptop = user.create_token("laptop", expires_in_seconds=None)
    tokens = [v.TokenView.model_validate(t) for t in user.tokens()]
    assert len(tokens) == 2 and "laptop" in {t.name for t in tokens} and [t.current for t in tokens].count(True) == 1
    assert all(laptop not in t.model_dump_json() for t in tokens)
    other = next(t for t in tokens if t.name == "laptop")
    assert other.expires_at is None and not other.current
    with client(coordinator[0], laptop) as on_laptop:
        assert on_laptop.me()["name"] == user.me()["name"]
        assert user.revoke_token(other.id) == {"revoked": other.id, "name": "laptop"}
        with refused(401):
            on_laptop.me()
    with refused(404):
        user.revoke_token(other.id)


def test_a_token_lifetime_out_of_range_is_422(user: Client) -> None:
    with refused(422, "expires_in_seconds: Input should be greater than 0"):
        user.request("POST", "/api/v1/tokens", json={"name": "never", "expires_in_seconds": 0})
    with not_sent("expires_in_seconds: Input should be greater than 0"):
        user.create_token("never", expires_in_seconds=0)


def test_a_user_cannot_revoke_another_users_token(user: Client, admin: Client) -> None:
    theirs = next(t["id"] for t in admin.tokens() if t["current"])
    with refused(404):
        user.revoke_token(theirs)


def test_a_disabled_user_is_refused_until_enabled(admin: Client, user: Client) -> None:
    name = user.me()["name"]
    assert admin.set_user_disabled(name, True) == {"name": name, "disabled": True}
    with refused(401):
        user.me()
    assert admin.set_user_disabled(name, False) == {"name": name, "disabled": False}
    assert user.me()["name"] == name


def test_disabling_is_refused_for_oneself_an_unknown_user_and_a_non_admin(admin: Client, user: Client) -> None:
    with refused(409, "you cannot disable yourself"):
        admin.set_user_disabled("admin", True)
    with refused(404):
        admin.set_user_disabled("nobody-here", True)
    with refused(403):
        user.set_user_disabled("admin", True)


def test_a_join_token_is_made_with_its_expiry(user: Client) -> None:
    token = v.NewJoinToken.model_validate(user.create_join_token(ttl_seconds=600))
    assert token.join_token
    with refused(422, "ttl_seconds"):
        user.request("POST", "/api/v1/join-tokens", json={"ttl_seconds": -1})


# --- devices, traces and forecasts --------------------------------------------------------


def test_a_new_user_has_no_devices_runs_files_or_traces(user: Client) -> None:
    assert user.devices() == [] and user.runs() == [] and user.files() == [] and user.traces() == []
    assert user.forecast() == []


@pytest.mark.parametrize("path", ["", "/history", "/telemetry", "/chunks", "/forecast"])
def test_an_unknown_device_is_404_on_every_device_route(user: Client, path: str) -> None:
    with refused(404, "no device ghost among your devices"):
        user.request("GET", f"/api/v1/devices/ghost{path}")


def test_an_imported_trace_gives_offline_devices_with_history(user: Client, simulated: list[v.DeviceView]) -> None:
    assert sorted(d.name for d in simulated) == ["sim-a", "sim-b"]
    assert not any(d.online for d in simulated) and all(d.profile["simulated"] for d in simulated)
    device = simulated[0]
    assert v.DeviceView.model_validate(user.request("GET", f"/api/v1/devices/{device.id}")) == device
    history = v.PresenceHistory.model_validate(user.request("GET", f"/api/v1/devices/{device.id}/history"))
    assert len(history.intervals) == 10 and all(i.end is not None for i in history.intervals)
    assert user.request("GET", f"/api/v1/devices/{device.id}/telemetry") == []
    chunks = v.DeviceChunks.model_validate(user.device_chunks(device.id))
    assert (chunks.chunks, chunks.bytes, chunks.chunk_ids) == (0, 0, [])
    assert [v.TraceSummary.model_validate(t).devices for t in user.traces()] == [2]


def test_a_forecast_of_a_simulated_device_without_a_model_is_persistence(user: Client,
                                                                          simulated: list[v.DeviceView]) -> None:
    forecast = v.Forecast.model_validate(user.forecast(simulated[0].id))
    assert forecast.method == "persistence" and forecast.simulated and forecast.model.kind == "persistence"
    assert {h.p_online for h in forecast.horizons} == {float(forecast.online)}
    assert len(user.forecast()) == 2 and user.forecast(simulated=False) == []


def test_another_user_cannot_see_the_devices(admin: Client, simulated: list[v.DeviceView]) -> None:
    with refused(404):
        admin.forecast(simulated[0].id)
    assert simulated[0].id not in {d["id"] for d in admin.devices()}


def test_a_trace_is_refused_twice_replaced_and_removed(user: Client, simulated: list[v.DeviceView]) -> None:
    with refused(409):
        user.import_trace(TRACE, prefix="sim")
    replaced = v.TraceImported.model_validate(user.import_trace(TRACE, prefix="sim", replace=True))
    assert replaced.devices == 2 and set(replaced.ids).isdisjoint(d.id for d in simulated)
    assert user.remove_trace("sim") == {"prefix": "sim", "removed": 2}
    assert user.devices() == []
    with refused(404, "no trace imported as 'sim'"):
        user.remove_trace("sim")


def test_a_bad_trace_is_422_with_its_line(user: Client) -> None:
    with refused(422, "line 2"):
        user.import_trace(b"client_id,event_type,event_start,event_end\n1,7,0,10\n")
    with refused(422, "UTF-8"):
        user.import_trace(b"\xff\xfe")


def test_only_an_admin_retrains_the_forecaster(user: Client) -> None:
    with refused(403):
        user.retrain_forecaster()


def test_a_removed_device_is_gone_from_the_list(user: Client, simulated: list[v.DeviceView]) -> None:
    removed = v.DeviceRemoved.model_validate(user.remove_device(simulated[0].id))
    assert (removed.removed, removed.replicas, removed.sole_copies) == (simulated[0].id, 0, 0)
    assert [d["id"] for d in user.devices()] == [simulated[1].id]
    with refused(404):
        user.remove_device(simulated[0].id)


# --- link tests ----------------------------------------------------------------------------


def test_link_tests_are_refused_for_unknown_same_or_offline_devices(user: Client,
                                                                      simulated: list[v.DeviceView]) -> None:
    a, b = (d.id for d in simulated)
    with refused(404, "no device ghost"):
        user.start_linktest("ghost", b, 1024, 1024)
    with refused(422, "different devices"):
        user.start_linktest(a, a, 1024, 1024)
    with refused(409, "offline"):
        user.start_linktest(a, b, 1024, 1024)
    with refused(422, "total_bytes"):
        user.request("POST", "/api/v1/linktests", json={"src": a, "dst": b, "total_bytes": 0})
    with not_sent("total_bytes"):
        user.start_linktest(a, b, 0, 1024)
    with refused(404, "no link test nope"):
        user.linktest("nope")


# --- runs and deployments ------------------------------------------------------------------


def test_an_unknown_model_is_422_naming_the_built_in_ones(user: Client) -> None:
    with refused(422, "unknown model 'resnet-9000'; built-in models are: .*mlp"):
        user.start_run(model="resnet-9000")


def test_a_run_needs_devices_that_are_online(user: Client, simulated: list[v.DeviceView]) -> None:
    with refused(409, "none of your devices is online"):
        user.start_run(model="mlp-digits")
    with refused(404, "no device 'ghost' among your devices"):
        user.start_run(model="mlp-digits", devices=["ghost"])
    with refused(409, "device sim-a is offline"):
        user.start_run(model="mlp-digits", devices=["sim-a"])
    with refused(409, "3 devices asked for, but only 0"):
        user.start_run(model="mlp-digits", devices=3)


def test_a_run_request_is_checked_field_by_field(user: Client) -> None:
    for field, value, why in [("steps", 0, "steps: Input should be greater than or equal to 1"),
                              ("optimizer", "adagrad", "optimizer: unknown optimiser 'adagrad'"),
                              ("schedule", "sideways", "schedule: unknown pipeline schedule 'sideways'")]:
        with refused(422, why):
            user.request("POST", "/api/v1/runs", json={"model": "mlp-digits", field: value})
        with not_sent(why):
            user.start_run(model="mlp-digits", **{field: value})


def test_unknown_runs_and_deployments_are_404(user: Client) -> None:
    with refused(404, "no run nope"):
        user.run("nope")
    with pytest.raises(ClientError, match="404: no run nope"):
        user.run_weights("nope")
    with refused(404, "no deployment nope"):
        user.deployment("nope")
    with refused(404, "no deployment nope"):
        user.infer("nope", [[0.0]])
    with refused(404, "no deployment nope"):
        user.generate("nope", "hello")
    with refused(404, "no deployment nope"):
        user.stop_deployment("nope")


def test_a_deployment_needs_devices_and_valid_inputs(user: Client) -> None:
    with refused(409, "none of your devices is online"):
        user.deploy(model="mlp-digits")
    with refused(422, "inputs: List should have at least 1 item"):
        user.request("POST", "/api/v1/deployments/nope/infer", json={"inputs": []})
    with not_sent("inputs: List should have at least 1 item"):
        user.infer("nope", [])
    with refused(422, "prompt"):
        user.request("POST", "/api/v1/deployments/nope/generate", json={"prompt": ""})
    with not_sent("prompt"):
        user.generate("nope", "")


# --- files ---------------------------------------------------------------------------------

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def test_an_empty_file_is_committed_listed_shown_and_deleted(user: Client) -> None:
    committed = v.FileCommitted.model_validate(
        user.commit_file({"name": "empty.txt", "size": 0, "sha256": EMPTY_SHA, "replicas": 2, "chunks": []}))
    assert (committed.size, committed.chunks, committed.encrypted, committed.replicas) == (0, 0, False, 2)
    assert [f["name"] for f in user.files()] == ["empty.txt"]
    info = v.FileDetail.model_validate(user.file_info("empty.txt"))
    assert info.chunk_list == [] and info.retrievable_now and info.sealing is None
    with refused(409):
        user.commit_file({"name": "empty.txt", "size": 0, "sha256": EMPTY_SHA, "chunks": []})
    assert user.delete_file("empty.txt") == {"deleted": "empty.txt", "replicas_freed": 0}
    with refused(404, "no file named 'empty.txt'"):
        user.file_info("empty.txt")
    with refused(404):
        user.delete_file("empty.txt")


def test_a_manifest_whose_chunks_do_not_hold_the_file_is_422(user: Client) -> None:
    chunk = {"id": hashlib.sha256(b"x").hexdigest(), "size": 1}
    manifest = {"name": "short", "size": 5, "sha256": EMPTY_SHA, "chunks": [chunk]}
    with refused(422, "hold 1 bytes, not the file's 5"):
        user.request("POST", "/api/v1/files", json=manifest)
    with not_sent("hold 1 bytes, not the file's 5"):
        user.commit_file(manifest)


def test_a_manifest_naming_chunks_never_uploaded_is_refused(user: Client) -> None:
    chunk = {"id": hashlib.sha256(b"x").hexdigest(), "size": 1}
    with refused(409, "1 chunk\\(s\\) of 'ghost' are not stored .*upload them first"):
        user.commit_file({"name": "ghost", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest(), "chunks": [chunk]})
    assert user.files() == []


def test_chunk_names_and_contents_are_checked(user: Client) -> None:
    with refused(422, "not a chunk name"):
        user.put_chunk("nothex", b"x", 1)
    with refused(422, "content does not match its hash"):
        user.put_chunk(hashlib.sha256(b"x").hexdigest(), b"y", 1)
    with refused(409, "none of your devices offers storage"):
        user.put_chunk(hashlib.sha256(b"x").hexdigest(), b"x", 1)
    with pytest.raises(ClientError, match="404: you store no chunk"):
        user.get_chunk(hashlib.sha256(b"x").hexdigest())
