"""Schemathesis against the coordinator's own /openapi.json: no route answers 5xx, whatever it is sent,
and every answer is one the schema documents (its status, content type and body schema).

A real app (real SQLite store and hub) behind uvicorn on loopback, called with an admin's token so
requests get past authentication into the routes. Bounded: EXAMPLES cases per route, no shrinking
database, so the whole run stays well under a minute or two on a busy machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from api_app import served_app

# Per route and method. The suite runs a derandomized 50 (the same cases every run, so CI is
# reproducible); NEURANET_API_FUZZ_EXAMPLES=300 runs the long pass with fresh cases.
EXAMPLES = int(os.environ.get("NEURANET_API_FUZZ_EXAMPLES", "50"))
DERANDOMIZE = "NEURANET_API_FUZZ_EXAMPLES" not in os.environ


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with served_app(tmp_path_factory.mktemp("fuzz")) as (url, token):
        yield url, token


@pytest.fixture(scope="module")
def api_schema(served: tuple[str, str]) -> schemathesis.BaseSchema:
    url, _ = served
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


# The event stream does not end while the client listens (tests/test_event_stream.py covers it)
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/api/v1/events")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_route_answers_a_server_error(case: schemathesis.Case, served: tuple[str, str]) -> None:
    _, token = served
    response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} answered {response.status_code}: {response.text[:500]}\n"
        f"{case.as_curl_command()}")
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                             response_schema_conformance])
