"""The composition root: the one place that builds the coordinator's parts and wires them together.

The hub keeps connections, membership, link grants and relaying; each feature book gets only what it
uses (the :class:`~neuranet.server.fleet.Fleet` view of the devices, the store, forecasts, other
books) and hands the hub the messages it takes. A new feature adds its own files and a line here.
"""

from __future__ import annotations

import time
from typing import Callable

from neuranet.config import ServerConfig
from neuranet.server.blobs import BlobStore
from neuranet.server.device_events import DevicePresence
from neuranet.server.events import EventBus
from neuranet.server.files import FileBook
from neuranet.server.forecasting import ForecastService
from neuranet.server.hub import Hub
from neuranet.server.runs import RunBook
from neuranet.server.serving import ServeBook
from neuranet.server.store import Store
from neuranet.tasks import OwnedTasks


class Coordinator:
    """Store, hub, forecasts and the feature books of one coordinator, started and closed together."""

    def __init__(self, config: ServerConfig, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.hub = Hub(config, store, clock)
        self.fleet = self.hub.fleet
        # what clients hear (GET /api/v1/events); ids from the wall clock, so one resuming across a restart
        # is told of a gap rather than handed reused ids
        self.events = EventBus(config.limits.max_queued_events_per_stream, config.limits.max_event_streams_per_user,
                               first_seq=time.time_ns() // 1000)
        DevicePresence(self.events, self.fleet)
        self.forecasts = ForecastService(store, config.blob_dir / "forecast", config.forecast_retrain_interval,
                                         config.forecast_options, events=self.events)
        self.fleet.use_forecasts(self.forecasts.outlook)  # HostView.p_online: the service's latest outlooks
        self.fleet.on_lost(self.forecasts.stale)  # a forecast made while a device was up says little once it is down
        self.fleet.on_back(self.forecasts.stale)
        self.blobs = BlobStore(config.blob_dir / "blobs")
        self.runs = RunBook(self.fleet, store, self.forecasts, self.blobs, config.run_rejoin_grace, events=self.events)
        self.serving = ServeBook(self.fleet, store, self.runs, events=self.events)
        self.files = FileBook(self.fleet, store, self.forecasts, config.file_repair_interval, config.file_lost_after,
                              config.file_orphan_after, max_inventory=config.limits.max_inventory_chunks)
        for book in (self.runs, self.serving, self.files):
            self.hub.handles(book.handlers())
        self._loops = OwnedTasks("coordinator")

    async def start(self) -> None:
        """Take up the work the last coordinator left, then start the background loops: hub maintenance
        (liveness, history), file repair, forecast retraining."""
        await self.blobs.open()
        await self.runs.restore()
        await self.serving.restore()
        self._loops.spawn(self.hub.maintain(), name="hub-maintain")
        self._loops.spawn(self.files.maintain(), name="file-repair")
        await self.forecasts.start()

    async def close(self) -> None:
        """Stop the loops and the books, then the connections (ending their presence); the store stays open."""
        self.events.close()  # streams end first: the server waits for open responses before it stops
        await self._loops.close()
        await self.forecasts.close()
        await self.runs.close()
        await self.serving.close()
        await self.files.close()
        await self.hub.shutdown()
