"""Network-namespace topologies for tests that need a split network (needs root and iproute2).

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Topology() as topo:
        topo.add_ns("a"); topo.add_ns("b")
        host_a, ip_a = topo.link_to_host("a")
        ip_ab, ip_ba = topo.link_between("a", "b")
        proc = topo.popen("a", [sys.executable, "-c", "..."])
        topo.set_between("a", "b", up=False)

Isolation is deliberate: no ip_forward, no default routes, no bridges. A
namespace reaches the root namespace only at the host end of its own veth, and
another namespace only over a direct veth, so nothing leaves the machine.
Addresses come from 10.213.0.0/16, one /30 per veth pair.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

SUBNET = ipaddress.IPv4Network("10.213.0.0/16")
PREFIX = "nn"
IFNAMSIZ = 15  # Linux interface names are at most 15 bytes
_IP_TIMEOUT = 10.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or tearing down a topology."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why namespace topologies cannot be built here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root or in a privileged container)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: apt-get install iproute2"
    # Being root is not enough in an unprivileged container: try what the tests will do.
    probe = f"{PREFIX}probe{secrets.token_hex(3)}"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"cannot create a network namespace: {done.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `ip`: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class _Resources:
    """What a topology created, kept apart from it so a finalizer can clean up."""

    namespaces: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            # popen() starts each command in its own session, so its pgid is its pid.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _cleanup(res: _Resources) -> list[str]:
    """Delete everything in ``res``; keep going after failures and return them."""
    problems: list[str] = []
    for proc in res.procs:
        _kill_group(proc)
    res.procs.clear()
    for ns in res.namespaces:
        # Stragglers that left popen's process group still pin the namespace: they are ours too.
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for link in res.host_links:
        # Usually already gone with its namespace peer; only a half-built pair remains.
        if _ip("link", "show", "dev", link, check=False).returncode == 0:
            done = _ip("link", "del", "dev", link, check=False)
            if done.returncode != 0:
                problems.append(f"link {link}: {done.stderr.strip()}")
    res.host_links.clear()
    for ns in res.namespaces:
        done = _ip("netns", "del", ns, check=False)
        if done.returncode != 0 and "No such file" not in done.stderr:
            problems.append(f"netns {ns}: {done.stderr.strip()}")
    res.namespaces.clear()
    return problems


@dataclass(frozen=True)
class _Pair:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str


class Topology:
    """A set of namespaces and veth links that is deleted as a whole on ``close()``."""

    def __init__(self) -> None:
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsError(reason)
        self.tag = PREFIX + secrets.token_hex(3)  # unique per topology, shared by all its names
        self._res = _Resources()
        self._ns: dict[str, str] = {}
        self._between: dict[frozenset[str], _Pair] = {}
        self._used: list[ipaddress.IPv4Network] = []
        self._links = 0
        self._finalizer = weakref.finalize(self, _cleanup, self._res)

    # --- naming and addressing ---------------------------------------------------

    def ns_name(self, ns: str) -> str:
        """The real (global) namespace name of logical namespace ``ns``."""
        try:
            return self._ns[ns]
        except KeyError:
            raise NetnsError(f"no namespace {ns!r} in this topology (add_ns first)") from None

    def _ifname(self, role: str) -> str:
        name = f"{self.tag}{role}{self._links}"
        assert len(name) <= IFNAMSIZ, name
        return name

    def _taken_in_root(self) -> list[ipaddress.IPv4Network]:
        taken = []
        for cmd in (("-j", "-4", "addr", "show"), ("-j", "-4", "route", "show", "table", "all")):
            for entry in json.loads(_ip(*cmd).stdout or "[]"):
                if "addr_info" in entry:
                    for a in entry["addr_info"]:
                        taken.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
                elif entry.get("dst", "default") != "default":
                    try:
                        taken.append(ipaddress.IPv4Network(entry["dst"], strict=False))
                    except ValueError:
                        pass  # e.g. "broadcast"/"local" entries with odd dst forms
        return taken

    def _allocate(self) -> tuple[str, str]:
        """A /30 in SUBNET clashing neither with this topology nor the root namespace."""
        # Random rather than sequential, so topologies in parallel test processes rarely meet.
        taken = self._used + self._taken_in_root()
        rng = random.Random(secrets.randbits(64))
        for _ in range(1000):
            net = ipaddress.IPv4Network((int(SUBNET.network_address) + 4 * rng.randrange(SUBNET.num_addresses // 4), 30))
            if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
                self._used.append(net)
                first, second = list(net.hosts())
                return str(first), str(second)
        raise NetnsError(f"no free /30 left in {SUBNET}")

    # --- building ------------------------------------------------------------------

    def add_ns(self, ns: str) -> str:
        """Create namespace ``ns`` with only ``lo`` up; returns its real name."""
        if ns in self._ns:
            raise NetnsError(f"namespace {ns!r} already exists in this topology")
        real = f"{self.tag}-{ns}"
        _ip("netns", "add", real)
        self._res.namespaces.append(real)
        self._ns[ns] = real
        _ip("-n", real, "link", "set", "dev", "lo", "up")
        return real

    def _bring_up(self, netns: str | None, dev: str, ip: str) -> None:
        pre = ("-n", netns) if netns else ()
        # No IPv6 link-local address means no DAD/router solicitations: the link stays silent.
        _ip(*pre, "link", "set", "dev", dev, "addrgenmode", "none")
        _ip(*pre, "addr", "add", f"{ip}/30", "dev", dev)
        _ip(*pre, "link", "set", "dev", dev, "up")

    def link_to_host(self, ns: str) -> tuple[str, str]:
        """Connect ``ns`` to the root namespace with a veth pair; returns ``(host_ip, ns_ip)``."""
        real = self.ns_name(ns)
        self._links += 1
        host_if, ns_if = self._ifname("h"), self._ifname("n")
        host_ip, ns_ip = self._allocate()
        _ip("link", "add", "name", host_if, "type", "veth", "peer", "name", ns_if, "netns", real)
        self._res.host_links.append(host_if)
        self._bring_up(None, host_if, host_ip)
        self._bring_up(real, ns_if, ns_ip)
        return host_ip, ns_ip

    def link_between(self, ns_a: str, ns_b: str) -> tuple[str, str]:
        """Connect two namespaces with a direct veth pair; returns ``(ip_a, ip_b)``."""
        key = frozenset((ns_a, ns_b))
        if ns_a == ns_b or key in self._between:
            raise NetnsError(f"cannot link {ns_a!r} and {ns_b!r} (same namespace or already linked)")
        real_a, real_b = self.ns_name(ns_a), self.ns_name(ns_b)
        self._links += 1
        if_a, if_b = self._ifname("a"), self._ifname("b")
        ip_a, ip_b = self._allocate()
        # Created inside ns_a so no end ever exists in the root namespace.
        _ip("-n", real_a, "link", "add", "name", if_a, "type", "veth", "peer", "name", if_b, "netns", real_b)
        self._between[key] = _Pair(ns_a, ns_b, if_a, if_b, ip_a, ip_b)
        self._bring_up(real_a, if_a, ip_a)
        self._bring_up(real_b, if_b, ip_b)
        return ip_a, ip_b

    def set_between(self, ns_a: str, ns_b: str, up: bool) -> None:
        """Bring the direct link between two namespaces down or back up (both ends)."""
        pair = self._between.get(frozenset((ns_a, ns_b)))
        if pair is None:
            raise NetnsError(f"no direct link between {ns_a!r} and {ns_b!r}")
        state = "up" if up else "down"
        for ns, dev in ((pair.ns_a, pair.if_a), (pair.ns_b, pair.if_b)):
            # Down removes the /30 route, so connects fail at once (ENETUNREACH) rather than time out.
            _ip("-n", self.ns_name(ns), "link", "set", "dev", dev, state)

    # --- running -------------------------------------------------------------------

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside ``ns``."""
        return ["ip", "netns", "exec", self.ns_name(ns), *argv]

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; it (and its children) is killed on close()."""
        kw.setdefault("start_new_session", True)  # so close() can kill the whole process group
        proc = subprocess.Popen(self.exec_argv(ns, argv), **kw)
        self._res.procs.append(proc)
        return proc

    def run(self, ns: str, argv: list[str], *, timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``ns`` to completion (bounded by ``timeout``)."""
        return subprocess.run(self.exec_argv(ns, argv), timeout=timeout, **kw)

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Kill started processes and delete all namespaces and links; safe to call twice."""
        self._finalizer.detach()
        problems = _cleanup(self._res)
        if problems:
            raise NetnsError("teardown left resources behind: " + "; ".join(problems))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except NetnsError:
            if exc_type is None:
                raise
            # A teardown problem must not mask the failure that got us here.
