"""Shared pytest fixtures: a session-wide throwaway PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgcluster import postgres_unavailable_reason, start_postgres


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy async URL of a fresh server with an empty ``neuranet`` database.

    Skips when PostgreSQL cannot run here; a server that is installed but fails
    to start is an error, not a skip, so a broken setup is not silently ignored.
    """
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with start_postgres(tmp_path_factory.mktemp("postgres")) as cluster:
        yield cluster.url
