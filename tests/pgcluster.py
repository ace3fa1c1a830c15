"""Throwaway PostgreSQL servers for tests: initdb + pg_ctl in a temp dir, trust auth, 127.0.0.1 only.

Usage::

    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with start_postgres(tmp_path) as pg:
        engine = create_async_engine(pg.url)

initdb refuses to run as root, so under root every server-side command runs as
the ``postgres`` system user (via ``runuser``) in a directory that user owns.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PG_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the system account initdb/pg_ctl run as when we are root
DB_USER = "neuranet"
DB_NAME = "neuranet"
INSTALL_HINT = "apt-get install postgresql"
# A unix socket path must fit sockaddr_un (108 bytes incl. NUL) with ".s.PGSQL.NNNNN" appended.
_MAX_SOCKET_DIR = 80
_START_ATTEMPTS = 3


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be run here at all; ``str()`` is a skip reason."""


class PostgresStartError(RuntimeError):
    """The binaries exist but the server did not come up; carries the log tail."""


def find_bindir(root: Path = PG_ROOT) -> Path | None:
    """Return the ``bin`` dir of the newest installed version that has initdb and pg_ctl."""
    candidates = []
    for d in root.glob("*/bin"):
        version = d.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) and (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            candidates.append((tuple(int(p) for p in version.split(".")), d))
    return max(candidates)[1] if candidates else None


def postgres_unavailable_reason(root: Path = PG_ROOT) -> str | None:
    """Why a throwaway server cannot be started here, or None when it can."""
    if find_bindir(root) is None:
        return f"PostgreSQL not installed (no {root}/*/bin/initdb): {INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user for initdb to run as: {INSTALL_HINT}"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` (util-linux) is missing, so initdb cannot drop root"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    """A running server; ``url`` is an SQLAlchemy async URL. Stop it with ``stop()`` or ``with``."""

    bindir: Path
    base: Path
    port: int
    as_user: str | None
    owns_base: bool
    _stopped: bool = field(default=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def dsn(self) -> str:
        """Plain libpq/asyncpg DSN for code that does not go through SQLAlchemy."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no server log: {exc})"

    def stop(self) -> None:
        """Stop the server and remove what start_postgres created; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        _stop_server(self.bindir, self.datadir, self.as_user)
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server_cmd(argv: list[str], as_user: str | None) -> list[str]:
    return ["runuser", "-u", as_user, "--", *argv] if as_user else argv


def _run(argv: list[str], as_user: str | None, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # cwd must be readable by the server user, or initdb complains about the caller's cwd.
    return subprocess.run(
        _server_cmd(argv, as_user), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _stop_server(bindir: Path, datadir: Path, as_user: str | None) -> None:
    if not (datadir / "postmaster.pid").exists():
        return
    # "immediate" skips the shutdown checkpoint: nothing in a throwaway cluster is worth it.
    try:
        done = _run([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "-t", "20", "stop"],
                    as_user, datadir.parent, timeout=30)
        if done.returncode == 0:
            return
    except subprocess.TimeoutExpired:
        pass
    # pg_ctl failed: kill the postmaster we started, identified by its own pid file.
    try:
        pid = int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 9)
    except (OSError, ValueError):
        pass


def _make_base(tmp_path: Path, as_user: str | None) -> tuple[Path, bool]:
    """Pick the cluster's directory; returns (dir, whether we must delete it ourselves)."""
    base = Path(tmp_path) / "pg"
    if as_user is None and len(str(base / "sock")) <= _MAX_SOCKET_DIR:
        (base / "sock").mkdir(mode=0o700, parents=True)
        return base, False
    # pytest's tmp_path sits under a root-only 0700 dir the server user cannot enter,
    # and may be too long for a unix socket path, so use a short dir in the system temp.
    base = Path(tempfile.mkdtemp(prefix="nnpg-"))
    (base / "sock").mkdir(mode=0o700)
    if as_user is not None:
        pw = pwd.getpwnam(as_user)
        for d in (base, base / "sock"):
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return base, True


def start_postgres(tmp_path: Path, *, timeout: float = 60.0) -> PgCluster:
    """Create, start and return a fresh cluster with database ``neuranet``.

    Raises PostgresUnavailable when PostgreSQL cannot run here (skip) and
    PostgresStartError, with the server log tail, when it fails to come up (fail).
    """
    reason = postgres_unavailable_reason()
    if reason:
        raise PostgresUnavailable(reason)
    bindir = find_bindir()
    assert bindir is not None
    as_user = SERVER_USER if os.geteuid() == 0 else None
    base, owns_base = _make_base(tmp_path, as_user)
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PostgresStartError(
                f"PostgreSQL did not start within {timeout:.0f}s; server log tail:\n{cluster.log_tail()}"
            )
        return remaining

    cluster = PgCluster(bindir=bindir, base=base, port=0, as_user=as_user, owns_base=owns_base)
    try:
        _initdb(cluster, left)
        for attempt in range(_START_ATTEMPTS):
            cluster.port = free_port()
            if _pg_ctl_start(cluster, left):
                break
            # Only a port grabbed by someone else between free_port() and bind is worth a retry.
            if "already in use" not in cluster.log_tail() or attempt == _START_ATTEMPTS - 1:
                raise PostgresStartError(f"pg_ctl start failed; server log tail:\n{cluster.log_tail()}")
        _createdb(cluster, left)
    except subprocess.TimeoutExpired as exc:
        tail = cluster.log_tail()  # read before stop() deletes the directory holding the log
        cluster.stop()
        cmd = list(exc.cmd)
        program = Path(cmd[cmd.index("--") + 1] if "--" in cmd else cmd[0]).name  # past runuser's prefix
        raise PostgresStartError(f"{program} timed out after {exc.timeout:.1f}s; server log tail:\n{tail}") from None
    except BaseException:
        cluster.stop()
        raise
    # Backstop for a test run that dies without reaching its teardown.
    weakref.finalize(cluster, _stop_server, bindir, cluster.datadir, as_user)
    return cluster


def _initdb(cluster: PgCluster, left: Callable[[], float]) -> None:
    argv = [
        str(cluster.bindir / "initdb"),
        "-D", str(cluster.datadir),
        "-U", DB_USER,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",  # the host's locale may not exist; C collation is all tests need
        "--no-sync",
    ]
    done = _run(argv, cluster.as_user, cluster.base, timeout=left())
    if done.returncode != 0:
        raise PostgresStartError(f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{cluster.socket_dir}'",
        # Durability is pointless for a throwaway cluster and costs seconds per test run.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "50",
        "shared_buffers": "16MB",
    }
    # Root may append directly; otherwise we are the owner. Later settings win over initdb's.
    with open(cluster.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.writelines(f"{k} = {v}\n" for k, v in settings.items())


def _pg_ctl_start(cluster: PgCluster, left: Callable[[], float]) -> bool:
    wait = max(1, int(left()))
    argv = [
        str(cluster.bindir / "pg_ctl"),
        "-D", str(cluster.datadir),
        "-l", str(cluster.logfile),
        "-o", f"-p {cluster.port}",
        # -w waits until the server reports ready to accept connections, bounded by -t.
        "-w", "-t", str(wait),
        "start",
    ]
    try:
        done = _run(argv, cluster.as_user, cluster.base, timeout=wait + 10)
    except subprocess.TimeoutExpired:
        raise PostgresStartError(f"pg_ctl start hung; server log tail:\n{cluster.log_tail()}") from None
    return done.returncode == 0


def _createdb(cluster: PgCluster, left: Callable[[], float]) -> None:
    # Over TCP on purpose: proves the server accepts exactly the connections tests will make.
    argv = [str(cluster.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", DB_USER, DB_NAME]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=left(), check=False)
    if done.returncode != 0:
        raise PostgresStartError(
            f"createdb {DB_NAME} failed: {done.stderr.strip()}\nserver log tail:\n{cluster.log_tail()}"
        )
