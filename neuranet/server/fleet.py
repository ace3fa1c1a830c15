"""The fleet as the feature books see it: which devices are online, what they offer, and a way to reach them.

The hub owns the connections; :class:`Fleet` is the narrow view of them that runs, serving and
files use instead of reaching into the hub: ask whether a device is online, read its
:class:`HostView`, send it a message, and hear (in registration order) when it is lost or back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from neuranet.protocol import messages as m
from neuranet.protocol.device_profile import DeviceProfile
from neuranet.protocol.errors import ProtocolError

if TYPE_CHECKING:
    from neuranet.server.hub import AgentConnection

log = logging.getLogger("neuranet.fleet")

DeviceListener = Callable[[str], None]
ConnectionListener = Callable[["AgentConnection"], None]


@dataclass(frozen=True)
class Outlook:
    """A device's availability forecast as of when it was made: P(online) per horizon and how long it
    is expected to stay online (None: the model gave no estimate)."""

    p_online: tuple[float, ...]  # one per forecast horizon (neuranet.forecast.features.HORIZONS)
    expected_online_seconds: float | None = None


Outlooks = Callable[[str], "Outlook | None"]  # device -> its latest forecast, when there is one


@dataclass(frozen=True)
class HostView:
    """One device as the books read it, at the moment it was asked for."""

    device_id: str
    user_id: str
    name: str
    online: bool
    profile: DeviceProfile
    p_online: tuple[float, ...] | None = None  # per forecast horizon; None: no forecast yet
    expected_online_seconds: float | None = None  # from the forecast; None: no estimate
    free_bytes: int | None = None  # storage it offers, free; None: not reported
    server_rtt_ms: float | None = None
    server_bandwidth_bps: float | None = None


class Fleet:
    """The online devices behind a narrow surface; the hub calls :meth:`lost`/:meth:`back` as they come and go."""

    def __init__(self, conns: Mapping[str, "AgentConnection"], outlooks: Outlooks | None = None) -> None:
        self._conns = conns
        self._outlooks: Outlooks = outlooks or (lambda _device_id: None)
        self._lost: list[DeviceListener] = []
        self._back: list[DeviceListener] = []
        self._replaced: list[ConnectionListener] = []
        self._removed: list[DeviceListener] = []

    # --- reading ----------------------------------------------------------------------

    def online(self, device_id: str) -> bool:
        return device_id in self._conns

    def online_ids(self) -> list[str]:
        return list(self._conns)

    def connection(self, device_id: str) -> "AgentConnection | None":
        """The live connection, for a book that correlates answers with the connection a request went out on."""
        return self._conns.get(device_id)

    def use_forecasts(self, outlooks: Outlooks) -> None:
        """Where views read each device's forecast from (the coordinator's forecast service)."""
        self._outlooks = outlooks

    def host(self, device_id: str, name: str = "", stored_profile: object = None) -> HostView | None:
        """The device's view if it is online; ``stored_profile`` stands in for a profile it has not sent yet."""
        if device_id not in self._conns:
            return None
        return self.view(device_id, name, stored_profile)

    def view(self, device_id: str, name: str = "", stored_profile: object = None, user_id: str = "") -> HostView:
        """The device's view online or not: an offline one reads ``stored_profile`` (its last stored
        profile) and still has its forecast, which is what placing data on it needs."""
        conn = self._conns.get(device_id)
        profile = DeviceProfile.of((conn.profile if conn is not None else None) or stored_profile)
        outlook = self._outlooks(device_id)
        return HostView(device_id, conn.user_id if conn is not None else user_id, name or device_id, conn is not None,
                        profile, outlook.p_online if outlook else None,
                        outlook.expected_online_seconds if outlook else None,
                        profile.disk_free_bytes, profile.server_rtt_ms, profile.server_bandwidth_bps)

    def hosts(self, device_ids: Iterable[str]) -> list[HostView]:
        """Views of those of ``device_ids`` that are online, in order."""
        return [v for v in (self.host(d) for d in device_ids) if v is not None]

    def profile(self, device_id: str) -> dict[str, object]:
        """The raw profile the device last reported ({} when offline or none yet)."""
        conn = self._conns.get(device_id)
        return dict(conn.profile) if conn is not None and conn.profile else {}

    # --- reaching ----------------------------------------------------------------------

    def send(self, device_id: str, msg: m.Message, payload: bytes = b"") -> bool:
        """Queue ``msg`` for the device; False when it is offline (or its queue refused the message)."""
        conn = self._conns.get(device_id)
        if conn is None:
            return False
        try:
            conn.send(msg, payload=payload)
        except ProtocolError as exc:
            log.warning("cannot send %s to %s: %s", msg.TYPE, device_id, exc)
            return False
        return True

    # --- listening ---------------------------------------------------------------------

    def on_lost(self, cb: DeviceListener) -> None:
        self._lost.append(cb)

    def on_back(self, cb: DeviceListener) -> None:
        self._back.append(cb)

    def on_replaced(self, cb: ConnectionListener) -> None:
        """Called with the old connection when a device reconnects before its old connection ended."""
        self._replaced.append(cb)

    def on_removed(self, cb: DeviceListener) -> None:
        """Called when a device is removed by its owner (its records are gone)."""
        self._removed.append(cb)

    def lost(self, device_id: str) -> None:
        _call(self._lost, device_id)

    def back(self, device_id: str) -> None:
        _call(self._back, device_id)

    def replaced(self, conn: "AgentConnection") -> None:
        _call(self._replaced, conn)

    def removed(self, device_id: str) -> None:
        _call(self._removed, device_id)


def _call(listeners: list, arg: object) -> None:
    """Each listener in registration order; one that fails is logged and the rest still hear."""
    for cb in listeners:
        try:
            cb(arg)
        except Exception:
            log.exception("fleet listener %r failed", cb)
