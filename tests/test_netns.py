"""Tests of the netns helper: a namespace reaches its host end, and other namespaces only over a direct link."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import NetnsError, Topology, netns_unavailable_reason

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason()))

PORT = 40123  # a fresh namespace has no listeners, so any fixed port is free there
FAIL_FAST_S = 3.0

# Run inside a namespace: try one TCP connect and report the outcome as JSON.
CONNECT = """
import errno, json, socket, sys, time
start = time.monotonic()
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.sendall(b"hi")
        result = {"ok": True, "reply": s.recv(16).decode()}
except OSError as exc:
    result = {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc))}
result["seconds"] = time.monotonic() - start
print(json.dumps(result))
"""

# Run inside a namespace: listen on all its addresses, say "ready", answer every client with "hello".
SERVE = """
import socket, sys
srv = socket.socket()
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.recv(16)
        conn.sendall(b"hello")
"""


def python(code: str, *args: object) -> list[str]:
    # -I -S: isolated and without site, so startup inside the namespace stays fast.
    return [sys.executable, "-I", "-S", "-c", code, *map(str, args)]


def connect_from(topo: Topology, ns: str, host: str, port: int, timeout: float = 5.0) -> dict:
    done = topo.run(ns, python(CONNECT, host, port, timeout), capture_output=True, text=True, timeout=timeout + 10)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def serve_in(topo: Topology, ns: str, port: int = PORT) -> subprocess.Popen:
    proc = topo.popen(ns, python(SERVE, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=10):
            pytest.fail(f"server in {ns} did not start")
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"server in {ns} failed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc


def assert_unreachable(result: dict) -> None:
    assert not result["ok"], result
    # No route at all, so the kernel refuses at once instead of letting SYNs time out.
    assert result["errno"] in ("ENETUNREACH", "EHOSTUNREACH"), result
    assert result["seconds"] < FAIL_FAST_S, result


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


def test_namespace_reaches_its_host_ip(topo: Topology) -> None:
    topo.add_ns("a")
    host_ip, ns_ip = topo.link_to_host("a")
    with socket.create_server((host_ip, 0)) as srv:
        srv.settimeout(10)
        port = srv.getsockname()[1]
        client = topo.popen("a", python(CONNECT, host_ip, port, 5), stdout=subprocess.PIPE, text=True)
        conn, (peer_ip, _) = srv.accept()
        with conn:
            assert conn.recv(16) == b"hi"
            conn.sendall(b"yo")
        out, _ = client.communicate(timeout=10)
    assert peer_ip == ns_ip
    assert json.loads(out)["reply"] == "yo"


def test_namespaces_linked_only_through_the_host_cannot_reach_each_other(topo: Topology) -> None:
    topo.add_ns("a")
    topo.add_ns("b")
    host_a, _ = topo.link_to_host("a")
    host_b, ip_b = topo.link_to_host("b")
    serve_in(topo, "b")
    # The listener is reachable in principle: the root namespace has a route to it.
    with socket.create_connection((ip_b, PORT), timeout=5) as s:
        s.sendall(b"x")
        assert s.recv(16) == b"hello"
    assert_unreachable(connect_from(topo, "a", ip_b, PORT))
    assert_unreachable(connect_from(topo, "a", host_b, PORT))
    assert connect_from(topo, "a", host_a, 9)["errno"] == "ECONNREFUSED"  # own host end: reachable, nobody listening


def test_direct_link_connects_namespaces_and_can_go_down_and_up(topo: Topology) -> None:
    topo.add_ns("a")
    topo.add_ns("b")
    topo.link_to_host("a")
    _, host_side_b = topo.link_to_host("b")
    ip_a, ip_b = topo.link_between("a", "b")
    serve_in(topo, "b")
    assert connect_from(topo, "a", ip_b, PORT)["reply"] == "hello"
    # The direct link is a link, not a router: b's host-facing address stays out of reach.
    assert_unreachable(connect_from(topo, "a", host_side_b, PORT))

    topo.set_between("a", "b", up=False)
    assert_unreachable(connect_from(topo, "a", ip_b, PORT))
    topo.set_between("a", "b", up=True)
    assert connect_from(topo, "a", ip_b, PORT)["ok"]
    assert ip_a != ip_b


def test_isolation_settings_are_left_alone() -> None:
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    before = forward.read_text()
    with Topology() as topo:
        topo.add_ns("a")
        topo.link_to_host("a")
        routes = topo.run("a", ["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
        assert "default" not in routes
        assert len(routes.strip().splitlines()) == 1, routes  # only the /30 of its own veth
        assert forward.read_text() == before


def test_teardown_removes_namespaces_links_and_processes() -> None:
    with Topology() as topo:
        topo.add_ns("a")
        topo.add_ns("b")
        topo.link_to_host("a")
        topo.link_between("a", "b")
        proc = serve_in(topo, "a")
        tag = topo.tag
        names = [topo.ns_name("a"), topo.ns_name("b")]
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(n in listed for n in names)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert tag not in links


def test_teardown_runs_after_a_failure_inside_the_block() -> None:
    with pytest.raises(ZeroDivisionError):
        with Topology() as topo:
            topo.add_ns("a")
            topo.link_to_host("a")
            name = topo.ns_name("a")
            1 / 0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert name not in listed


def test_misuse_raises_typed_errors(topo: Topology) -> None:
    topo.add_ns("a")
    with pytest.raises(NetnsError):
        topo.add_ns("a")
    with pytest.raises(NetnsError):
        topo.link_to_host("missing")
    with pytest.raises(NetnsError):
        topo.link_between("a", "a")
    with pytest.raises(NetnsError):
        topo.set_between("a", "b", up=True)


def test_interface_names_fit_the_kernel_limit(topo: Topology) -> None:
    for i in range(12):
        topo.add_ns(f"n{i}")
        topo.link_to_host(f"n{i}")
    # Creating them at all proves every name fit; double-check none collided.
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert sum(topo.tag in line for line in links.splitlines()) == 12
