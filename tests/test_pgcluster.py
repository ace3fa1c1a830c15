"""Tests of the throwaway PostgreSQL helper: it starts, serves asyncpg over TCP, and stops."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pgcluster import find_bindir, postgres_unavailable_reason, start_postgres


async def test_select_one(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://neuranet@127.0.0.1:")
    assert postgres_url.endswith("/neuranet")
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("select 1"))).scalar_one() == 1
            assert (await conn.execute(text("select current_database()"))).scalar_one() == "neuranet"
    finally:
        await engine.dispose()


def test_stop_releases_the_port(tmp_path: Path) -> None:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with start_postgres(tmp_path) as pg:
        with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
            pass
        base = pg.base
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pg.port), timeout=5).close()
    if pg.owns_base:
        assert not base.exists()
    pg.stop()  # idempotent


def test_find_bindir_picks_the_newest_complete_version(tmp_path: Path) -> None:
    for version, complete in (("9.6", True), ("15", True), ("16", False), ("13", True), ("notaversion", True)):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        (bindir / "initdb").touch()
        if complete:
            (bindir / "pg_ctl").touch()
    assert find_bindir(tmp_path) == tmp_path / "15" / "bin"


def test_missing_install_gives_a_skip_reason(tmp_path: Path) -> None:
    assert find_bindir(tmp_path) is None
    reason = postgres_unavailable_reason(tmp_path)
    assert reason is not None and "apt-get install postgresql" in reason
