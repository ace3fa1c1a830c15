"""Which direct-link addresses a device advertises, and which of them the coordinator gives a peer.

A loopback address reaches the device only from its own machine: given to a peer elsewhere, it makes
that peer dial *its own* loopback (in the worst case some other local service). So the coordinator
hands out loopback addresses only to a peer on the same host, and never addresses no peer can use
(link-local, unspecified, multicast, reserved) or host names (which the dialer would resolve where
the advertiser cannot control what they mean).
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

Address = tuple[str, int]
MAX_ADVERTISED = 16


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name, or an IPv6 address with a zone (%eth0), which is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def usable_by_peer(addrs: list[Address], same_host: bool) -> list[Address]:
    """The addresses of ``addrs`` a peer can dial: IP literals that route, loopback only when ``same_host``."""
    out: list[Address] = []
    for host, port in addrs:
        ip = _ip(host)
        if ip is None or not 0 < port < 65536:
            continue
        if ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved:
            continue
        if ip.is_loopback and not same_host:
            continue
        if (str(ip), port) not in out:
            out.append((str(ip), port))
    return out


def same_host(ip_a: str, machine_a: str, ip_b: str, machine_b: str) -> bool:
    """Whether two agents run on one machine, as the coordinator can tell: they connect from the same
    address *and* report the same machine id. The address alone is not enough (devices behind one NAT,
    or every agent when a reverse proxy fronts the server), nor is the id alone (network namespaces
    and containers on one machine do not share a loopback)."""
    a, b = _ip(ip_a), _ip(ip_b)
    if a is None or b is None or not machine_a or machine_a != machine_b:
        return False
    return a == b or (a.is_loopback and b.is_loopback)  # both on the server's host, over IPv4 and IPv6


def local_addresses(port: int, listen_host: str) -> list[Address]:
    """Addresses a peer might reach this listener on, most specific first (loopback last)."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return [(listen_host, port)]
    found: list[Address] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET:
                found.append((a.address, port))
    return usable_by_peer(found, same_host=False)[: MAX_ADVERTISED - 1] + [("127.0.0.1", port)]
