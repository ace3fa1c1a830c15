"""Devices going online and offline, told to their owners' event streams (from the fleet's back/lost)."""

from __future__ import annotations

from neuranet.server.events import DEVICE_OFFLINE, DEVICE_ONLINE, Event, EventBus
from neuranet.server.fleet import Fleet


class DevicePresence:
    """Publishes ``device.online`` when a device comes back and ``device.offline`` when it is lost or removed.

    A connection that replaces a live one is no change for the owner; the owner of a device is noted while
    it is online, since a lost device's connection is already gone when the fleet says so."""

    def __init__(self, events: EventBus, fleet: Fleet) -> None:
        self._events = events
        self._fleet = fleet
        self._owners: dict[str, str] = {}  # online device -> its user
        fleet.on_back(self._back)
        fleet.on_lost(self._gone)
        fleet.on_removed(self._gone)

    def _back(self, device_id: str) -> None:
        conn = self._fleet.connection(device_id)
        if conn is None or device_id in self._owners:
            return
        self._owners[device_id] = conn.user_id
        self._events.publish(Event(DEVICE_ONLINE, conn.user_id, device_id, {"since": conn.connected_at}))

    def _gone(self, device_id: str) -> None:
        user_id = self._owners.pop(device_id, None)
        if user_id is not None:
            self._events.publish(Event(DEVICE_OFFLINE, user_id, device_id))
