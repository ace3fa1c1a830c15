"""Agents in network namespaces: relayed when they cannot reach each other, direct when they can."""

from __future__ import annotations

import pytest

from fabric_helpers import device_by_name, free_port, run_linktest
from neuranet.fabric import LocalFabric
from netns import Topology, netns_unavailable_reason

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    port = free_port()
    # Plain HTTP on every address (--insecure): the agents reach it from their own namespaces.
    with Topology() as topo, LocalFabric(tmp_path_factory.mktemp("split"),
                                         server_args=["--host", "0.0.0.0", "--insecure"]) as fabric:
        topo.add_ns("a")
        topo.add_ns("b")
        host_a, _ = topo.link_to_host("a")
        host_b, _ = topo.link_to_host("b")
        topo.link_between("a", "b")
        topo.set_between("a", "b", up=False)  # they share a cable that is unplugged for now
        fabric.start_server(port=port)
        for name, host_ip in (("a", host_a), ("b", host_b)):
            fabric.start_agent(name, prefix=topo.exec_argv(name, []), server_url=f"http://{host_ip}:{port}",
                               extra=["--listen-host", "0.0.0.0", "--no-measure"])
        fabric.wait_online(["a", "b"])
        yield topo, fabric


def test_unreachable_peers_relay_through_the_server(split) -> None:
    topo, fabric = split
    with fabric.client() as c:
        a, b = device_by_name(c, "a"), device_by_name(c, "b")
        result = run_linktest(c, a["id"], b["id"], total=8 << 20)
    assert result["ok"], result
    assert result["path"] == "relay" and result["paths_used"] == ["relay"]
    assert not any(ip == "127.0.0.1" for ip, _ in b["profile"]["listen_addrs"][:-1])


def test_reachable_peers_go_direct(split) -> None:
    topo, fabric = split
    topo.set_between("a", "b", up=True)
    try:
        with fabric.client() as c:
            a, b = device_by_name(c, "a"), device_by_name(c, "b")
            result = run_linktest(c, b["id"], a["id"], total=8 << 20)
    finally:
        topo.set_between("a", "b", up=False)
    assert result["ok"], result
    assert result["path"] == "direct"
