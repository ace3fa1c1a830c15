"""The REST client on its own: riding out a server that does not answer, and explaining refusals."""

from __future__ import annotations

import pytest

from fabric_helpers import free_port
from neuranet.client import Client, ClientError, Patience, ServerUnreachable, patiently, validation_message
from neuranet.config import ClientConfig


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_poll_retries_with_backoff_then_gives_up_within_its_bound() -> None:
    clock, notes = FakeClock(), []
    patience = Patience(request_timeout=0.5, base=0.5, cap=4.0, give_up=20.0)
    with Client(ClientConfig(f"http://127.0.0.1:{free_port()}", "t"), timeout=0.5) as c:  # nothing listens
        with pytest.raises(ServerUnreachable, match=r"cannot reach the server .*\(no answer for 2\d s\)"):
            patiently(lambda: c.run("r"), patience, notes.append, clock, clock.sleep)
    assert clock.sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 4.0] and 20.0 <= clock.now <= 24.0
    assert len(notes) == 1 and "trying again for up to 20 s" in notes[0]


def test_a_poll_that_gets_through_says_so_and_refusals_are_not_retried() -> None:
    clock, notes, calls = FakeClock(), [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ServerUnreachable("cannot reach the server: connection reset by peer")
        return "ok"

    assert patiently(flaky, Patience(), notes.append, clock, clock.sleep) == "ok"
    assert notes[-1] == "the server answers again after 1.5 s"

    def refused() -> str:
        calls.append(1)
        raise ClientError("404: no run r")

    with pytest.raises(ClientError, match="404"):
        patiently(refused, Patience(), notes.append, clock, clock.sleep)
    assert len(calls) == 4  # once: a refusal is an answer


def test_validation_errors_read_as_one_line_naming_the_field_or_flag() -> None:
    errors = [{"loc": ["body", "steps"], "msg": "Input should be greater than or equal to 1"},
              {"loc": ["body", "schedule"], "msg": "Value error, unknown pipeline schedule 'bogus'"}]
    assert validation_message(errors) == ("steps: Input should be greater than or equal to 1; "
                                          "schedule: unknown pipeline schedule 'bogus'")
    assert validation_message(errors, {"steps": "--steps"}).startswith("--steps: Input")


def test_client_speaks_through_a_given_transport() -> None:
    """Client(transport=) sends through that transport, not the network (#14: routers tested in-process)."""
    import httpx as _httpx

    from neuranet.client import Client as _Client
    from neuranet.config import ClientConfig as _ClientConfig

    seen: list[_httpx.Request] = []

    health = {"ok": True, "version": "9", "online_devices": 2, "fingerprint": None, "coordinator_key": "SHA256:x"}

    def answer(request: _httpx.Request) -> _httpx.Response:
        seen.append(request)
        return _httpx.Response(200, json=health if request.url.path == "/healthz" else {"ok": True})

    with _Client(_ClientConfig("http://coordinator.invalid", "tok"), transport=_httpx.MockTransport(answer)) as client:
        assert client.health() == health
        # An answer not in the shape the route declares (api_models) is refused, saying where.
        with pytest.raises(ClientError, match=r"GET /api/v1/me with a body that is not what the API declares \(user_id"):
            client.me()
    assert [(r.method, r.url.path, r.headers["authorization"]) for r in seen] == [
        ("GET", "/healthz", "Bearer tok"), ("GET", "/api/v1/me", "Bearer tok")]
