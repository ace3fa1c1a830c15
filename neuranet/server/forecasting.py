"""The coordinator's availability forecasts: one model trained across every device's presence history.

`ForecastService` keeps an `AvailabilityForecast` (saved with safetensors under the blob directory, so
it survives restarts), retrains it in a worker thread on a schedule (request handling goes on), and
answers per-device forecasts from the store's presence intervals: P(online) 15 min / 1 h / 6 h / 24 h
ahead, P(staying online throughout), the expected remaining online time, and recent history. Until a
model has been trained it answers with persistence (the current state) and says so.

Imported traces become simulated devices whose history ends where the trace ends; they are forecast
as of that moment. Times are Unix seconds (UTC clock for time of day and day of week).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuranet.server.events import FORECAST_REFRESHED, Event, EventBus
from neuranet.server.fleet import Outlook
from neuranet.tasks import OwnedTasks

if TYPE_CHECKING:
    from neuranet.forecast.model import AvailabilityForecast
    from neuranet.forecast.trace import DeviceHistory, Trace
    from neuranet.server.store import Store

log = logging.getLogger("neuranet.forecast")
HISTORY_SHOWN = 3 * 86400.0  # history returned with a forecast, for timelines and plots
TRAIN_WINDOW = 28 * 86400.0  # the forecaster learns from each device's last four weeks
MIN_TRAIN_SECONDS = 2 * 3600.0  # a device with less history than this adds nothing to training
WEEK = 7 * 86400.0
REFRESH_INTERVAL = 300.0  # seconds between refreshes of every device's outlook (the fleet view reads them)


def trace_base(trace_end: float, now: float, clock_offset: float) -> float:
    """Unix time for trace time 0: a Monday 00:00 UTC (trace time 0 is read as a Monday midnight),
    late enough that the trace ends as close before ``now`` as that allows."""
    return math.floor((now - trace_end + clock_offset) / WEEK) * WEEK - clock_offset


class ForecastService:
    def __init__(self, store: "Store", model_dir: Path, retrain_interval: float,
                 options: dict[str, Any] | None = None, events: EventBus | None = None) -> None:
        self.store = store
        self.events = events or EventBus(history=0)  # every user hears of a refresh (it names no one's devices)
        self.options = dict(options or {})  # ForecastConfig fields
        self.model_dir = model_dir
        self.retrain_interval = retrain_interval
        self.model: AvailabilityForecast | None = None
        self.trained_at: float | None = None
        self.trained_on = 0  # devices in the last training
        self.next_fit_at: float | None = None  # when the schedule next retrains (Unix time)
        self._lock = asyncio.Lock()
        self._tasks = OwnedTasks("forecast")  # the retraining schedule, the outlook refreshes
        # device -> its latest outlook, read synchronously by the fleet view (HostView.p_online); none
        # before the first fit, and none for a device whose state changed since (see `stale`)
        self._outlooks: dict[str, Outlook] = {}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        from neuranet.forecast.errors import ForecastError
        from neuranet.forecast.model import AvailabilityForecast

        if (self.model_dir / "forecast.json").exists():
            try:
                self.model = await asyncio.to_thread(AvailabilityForecast.load, self.model_dir)
                self.trained_at = self.model_dir.joinpath("forecast.json").stat().st_mtime
            except ForecastError as exc:
                log.warning("ignoring the saved forecaster: %s", exc)
        self._tasks.spawn(self._schedule(), name="forecast-retrain")
        self._tasks.spawn(self._refreshing(), name="forecast-refresh")

    async def close(self) -> None:
        await self._tasks.close()

    async def _schedule(self) -> None:
        from neuranet.forecast.errors import ForecastError

        while True:
            due = 0.0 if self.trained_at is None else self.trained_at + self.retrain_interval - time.time()
            delay = max(due, 60.0 if self.trained_at is None else 0.0)
            self.next_fit_at = time.time() + delay
            await asyncio.sleep(delay)
            try:
                await self.retrain()
            except ForecastError as exc:  # e.g. no history yet: try again in a while
                log.info("forecaster not retrained: %s", exc)
                self.next_fit_at = time.time() + min(600.0, self.retrain_interval)
                await asyncio.sleep(min(600.0, self.retrain_interval))
            except Exception:
                log.exception("retraining the forecaster failed")
                await asyncio.sleep(self.retrain_interval)

    # --- training -----------------------------------------------------------------------

    async def histories(self, device_ids: list[str] | None = None) -> dict[str, tuple[Any, "DeviceHistory"]]:
        """Devices (all, or those named) with a usable history: id -> (row, history up to now or its trace end)."""
        from neuranet.forecast.errors import HistoryError
        from neuranet.forecast.trace import DeviceHistory

        now = time.time()
        out = {}
        for device_id, (device, online) in (await self.store.presence.all_presence(device_ids)).items():
            end = (device.profile or {}).get("history_end") or now
            if end <= device.created_at:
                continue
            try:
                out[device_id] = (device, DeviceHistory.from_online_intervals(device_id, online, device.created_at, end))
            except HistoryError as exc:
                log.warning("skipping the history of %s: %s", device_id, exc)
        return out

    async def retrain(self) -> dict[str, Any]:
        """Fit a new model on every device's recent history (in a thread), save it, and swap it in."""
        from neuranet.forecast.errors import ForecastError
        from neuranet.forecast.features import UNIX_CLOCK_OFFSET, FeatureConfig
        from neuranet.forecast.model import AvailabilityForecast, ForecastConfig

        async with self._lock:
            histories = []
            for _, h in (await self.histories()).values():
                if h.end - h.start >= MIN_TRAIN_SECONDS:
                    histories.append(h.clipped(h.end - TRAIN_WINDOW))
            if not histories:
                raise ForecastError(f"no device has {MIN_TRAIN_SECONDS / 3600:.0f} h of history to learn from yet")
            config = ForecastConfig(features=FeatureConfig(clock_offset=UNIX_CLOCK_OFFSET), **self.options)

            def fit() -> AvailabilityForecast:
                model = AvailabilityForecast(config).fit(histories)
                model.save(self.model_dir)
                return model

            started = time.time()
            self.model = await asyncio.to_thread(fit)
            self.trained_at, self.trained_on = time.time(), len(histories)
            log.info("forecaster retrained on %d devices in %.1f s", len(histories), self.trained_at - started)
        await self.refresh()
        self.events.publish(Event(FORECAST_REFRESHED, None, "forecast", {"trained_at": self.trained_at}))
        return self.info()

    def info(self) -> dict[str, Any]:
        """Which method answers forecasts: the trained model ("mlp"), or "persistence" (every device stays
        as it is now) until the first fit, which needs a device with `MIN_TRAIN_SECONDS` of history."""
        return {"kind": "mlp" if self.model is not None else "persistence",
                "trained_at": self.trained_at, "devices": self.trained_on, "next_fit_at": self.next_fit_at,
                "min_history_seconds": MIN_TRAIN_SECONDS}

    # --- outlooks: what the fleet view reads ----------------------------------------------

    def outlook(self, device_id: str) -> Outlook | None:
        """The device's latest outlook (P(online) per horizon, expected online time), or None: no
        trained model yet, no usable history, or its state changed since the last refresh."""
        return self._outlooks.get(device_id)

    def stale(self, device_id: str) -> None:
        """The device went offline or came back: its outlook no longer holds until the next refresh."""
        self._outlooks.pop(device_id, None)

    async def refresh(self, device_ids: list[str] | None = None) -> None:
        """Forecast every device (or those named) as of now, in a thread, into the outlooks."""
        from neuranet.forecast.features import HORIZONS

        model = self.model
        if model is None:
            self._outlooks.clear()
            return
        histories = await self.histories(device_ids)

        def run() -> dict[str, Outlook]:
            out = {}
            for device_id, (_, history) in histories.items():
                try:
                    f = model.forecast(history, history.end)
                except Exception:  # a history the model cannot read: no outlook (readers fall back to persistence)
                    log.debug("no outlook for %s", device_id, exc_info=True)
                    continue
                out[device_id] = Outlook(tuple(min(1.0, max(0.0, f.online[int(h)])) for h in HORIZONS),
                                         f.expected_online_seconds)
            return out

        fresh = await asyncio.to_thread(run)
        if device_ids is None:
            self._outlooks = fresh
        else:
            for device_id in device_ids:
                self._outlooks.pop(device_id, None)
            self._outlooks.update(fresh)

    async def _refreshing(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing the device outlooks failed")
            await asyncio.sleep(REFRESH_INTERVAL)

    # --- forecasts ----------------------------------------------------------------------

    async def forecast(self, device: Any, online: list[tuple[float, float | None]], now: float | None = None) -> dict[str, Any]:
        """One device's forecast as of now (or the end of its history, for an imported one)."""
        from neuranet.forecast.features import HORIZONS
        from neuranet.forecast.trace import DeviceHistory

        at = (device.profile or {}).get("history_end") or now or time.time()
        start = min(device.created_at, at - 1.0)
        history = DeviceHistory.from_online_intervals(device.id, online, start, at)
        model = self.model
        is_online = bool(history.state_at(at))
        expected: float | None
        if model is None:  # persistence: the state now at every horizon, and no estimate of how long
            p_online = {int(h): float(is_online) for h in HORIZONS}
            stay = dict(p_online)
            expected = None
        else:
            result = await asyncio.to_thread(model.forecast, history, at)
            p_online, stay, expected = result.online, result.stay, result.expected_online_seconds
        shown = [[max(s, at - HISTORY_SHOWN), e if e is None or e <= at else at] for s, e in online
                 if (e is None or e > at - HISTORY_SHOWN) and s < at]
        return {"device": device.id, "name": device.name, "at": at, "online": is_online,
                "simulated": bool((device.profile or {}).get("simulated")),
                "horizons": [{"seconds": h, "p_online": p_online[h], "p_stay_online": stay[h]} for h in p_online],
                "expected_online_seconds": expected, "history": shown, "model": self.info(),
                "method": "mlp" if model is not None else "persistence"}


def import_trace_devices(trace: "Trace", now: float, clock_offset: float, prefix: str) -> list[tuple[str, dict[str, Any], float, list[tuple[float, float]]]]:
    """An imported trace as simulated devices for `Store.add_simulated_devices` (times moved to Unix time)."""
    base = trace_base(trace.end, now, clock_offset)
    devices = []
    for client_id, h in trace.items():
        online = [(base + iv.start, base + iv.end) for iv in h.intervals if iv.online]
        profile = {"simulated": True, "trace_prefix": prefix, "trace_client": client_id, "history_end": base + h.end}
        devices.append((f"{prefix}-{client_id}"[:100], profile, base + h.start, online))
    return devices


def trace_prefix_of(name: str, profile: Any) -> str | None:
    """The prefix of the trace import a device came from, or None for a real device. Devices imported
    before the prefix was recorded are recognised by their name, ``<prefix>-<client>``."""
    if not isinstance(profile, dict) or not profile.get("simulated"):
        return None
    if isinstance(profile.get("trace_prefix"), str):
        return profile["trace_prefix"]
    client = f"-{profile.get('trace_client')}"
    return name[: -len(client)] if name.endswith(client) and len(name) > len(client) else None
