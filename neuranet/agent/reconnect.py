"""When the agent dials the coordinator again, and which failures end it: pure policy, no clock inside.

A connection that fails right after its handshake (a server that drops every agent, a proxy that
cuts the upgraded socket, a frame the agent keeps sending and the server keeps refusing) must not
reset the backoff, or the agent reconnects several times a second and the coordinator records a
presence for each. So the backoff starts over only once a connection has stayed up for a while.
Answers that no retry can change (a wrong URL, a refused enrolment, another protocol version) stop
the agent with one line saying what to fix.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from websockets.exceptions import InvalidStatus, InvalidURI

from neuranet.protocol.errors import AuthenticationFailed, VersionMismatch

# HTTP statuses on the upgrade that say "not now" rather than "not here": retried like a refused
# connection. Every other 4xx means the URL, or what stands in front of the coordinator, is wrong.
TRANSIENT_4XX = frozenset({408, 425, 429})


class ServerRefused(Exception):
    """The server's answer says retrying cannot help; the message says what to fix."""


class EnrolmentError(ServerRefused):
    """The server will never accept this agent as it is configured (unknown device, bad join token)."""


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random.Random()) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


@dataclass
class ReconnectBackoff:
    """Delays between connection attempts. ``connected(now)`` when a handshake succeeds;
    ``next_delay(now)`` when an attempt ends, failed or lost, for the wait before the next one.
    The attempt count starts over only when the connection that just ended was up for at least
    ``healthy_after`` seconds."""

    base: float
    cap: float
    healthy_after: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0  # attempts since the last healthy connection
    up_since: float | None = None  # when the current connection's handshake succeeded

    def connected(self, now: float) -> None:
        self.up_since = now

    def next_delay(self, now: float) -> float:
        if self.up_since is not None and now - self.up_since >= self.healthy_after:
            self.attempt = 0
        self.up_since = None
        delay = backoff_delay(self.attempt, self.base, self.cap, self.rng)
        self.attempt += 1
        return delay


def final_refusal(exc: BaseException, url: str) -> ServerRefused | None:
    """The error to stop with when ``exc`` (from dialling ``url`` or its handshake) cannot be fixed by
    retrying; None for failures worth retrying (refused or lost connections, timeouts, 5xx)."""
    if isinstance(exc, ServerRefused):
        return exc
    if isinstance(exc, AuthenticationFailed):
        return EnrolmentError(str(exc))
    if isinstance(exc, VersionMismatch):
        return ServerRefused(f"{exc}: run the same NeuraNet version on the agent and the coordinator at {url}")
    if isinstance(exc, InvalidURI):
        return ServerRefused(f"{url} is not a valid server URL: {exc}")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if 400 <= status < 500 and status not in TRANSIENT_4XX:
            reason = f" {exc.response.reason_phrase}" if exc.response.reason_phrase else ""
            return ServerRefused(f"{url} answered HTTP {status}{reason} to the agent's connection: check --server "
                                 "(the coordinator's URL, e.g. http://host:8420) and any proxy in front of it")
    return None


class Clock(Protocol):
    """Time as the reconnect loop sees it (tests pass one that does not wait)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
