"""A local fabric of real processes: one coordinator and N agents on this machine.

Used by ``neuranet demo``, the integration tests and the benchmarks, so all of
them exercise the same executables a user runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from neuranet.client import Client, ClientError, load_client_config
from neuranet.config import ClientConfig


class FabricError(Exception):
    """A local process failed to start or come online; the message holds its log tail."""


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class LocalFabric:
    def __init__(self, root: Path, server_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.server_args = server_args or []
        self.env = {**os.environ, "NEURANET_HOME": str(root), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""
        self.token = ""

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def _spawn(self, args: list[str], log_name: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.root / f"{log_name}.log", "ab") as log:  # the child keeps its own copy of the fd
            return subprocess.Popen([*(prefix or []), sys.executable, "-m", "neuranet", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start_server(self, timeout: float = 30.0, port: int = 0) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.server_dir / "server.json"
        info.unlink(missing_ok=True)
        self.server = self._spawn(["server", "--port", str(port), "--data-dir", str(self.server_dir), *self.server_args], "server")
        deadline = time.monotonic() + timeout
        while not info.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise FabricError(f"server did not start:\n{_tail(self.root / 'server.log')}")
            time.sleep(0.05)
        self.url = json.loads(info.read_text())["url"]
        self.token = load_client_config(None, None, self.root).token
        return self.url

    def client(self, token: str | None = None) -> Client:
        ca = next((Path(a) for i, a in enumerate(self.server_args) if i and self.server_args[i - 1] == "--tls-cert"), None)
        if "--self-signed" in self.server_args:
            ca = self.server_dir / "tls" / "cert.pem"  # the server's own certificate, made at its first start
        return Client(ClientConfig(self.url, token or self.token, ca_cert=ca))

    def start_agent(self, name: str, token: str | None = None, extra: list[str] | None = None,
                    prefix: list[str] | None = None, server_url: str | None = None) -> subprocess.Popen[bytes]:
        data_dir = self.root / "agents" / name
        args = ["agent", "--server", server_url or self.url, "--data-dir", str(data_dir), "--name", name]
        if not (data_dir / "device.json").exists():
            with self.client(token) as c:
                args += ["--join-token", c.create_join_token()["join_token"]]
        proc = self._spawn([*args, *(extra or [])], f"agent-{name}", prefix)
        self.agents[name] = proc
        return proc

    def wait_online(self, names: list[str], timeout: float = 60.0, token: str | None = None) -> dict[str, dict[str, Any]]:
        """Block until every named agent is online; returns their device records by name."""
        deadline = time.monotonic() + timeout
        with self.client(token) as c:
            while True:
                try:
                    online = {d["name"]: d for d in c.devices() if d["online"]}
                except ClientError:
                    online = {}
                if all(n in online for n in names):
                    return {n: online[n] for n in names}
                for n in names:
                    proc = self.agents.get(n)
                    if proc is not None and proc.poll() is not None:
                        raise FabricError(f"agent {n} exited with {proc.returncode}:\n{_tail(self.root / f'agent-{n}.log')}")
                if time.monotonic() > deadline:
                    missing = [n for n in names if n not in online]
                    raise FabricError(f"agents {missing} not online after {timeout:.0f}s")
                time.sleep(0.1)

    def kill_agent(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(name)
        _stop(proc, sig)

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        if self.server is not None:
            _stop(self.server, sig)
            self.server = None

    def close(self) -> None:
        for name in list(self.agents):
            self.kill_agent(name, signal.SIGTERM)
        self.stop_server()

    def __enter__(self) -> "LocalFabric":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
