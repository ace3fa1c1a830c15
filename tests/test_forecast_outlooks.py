"""The forecast service fills the outlooks the fleet view reads (HostView.p_online): after a fit every
device with history has one, a device whose state changed loses it until refreshed (real store, a small
model; no agents)."""

from __future__ import annotations

import time

import pytest

from neuranet.forecast.features import HORIZONS, UNIX_CLOCK_OFFSET
from neuranet.forecast.trace import parse_trace
from neuranet.server.fleet import Fleet
from neuranet.server.forecasting import ForecastService, import_trace_devices, trace_prefix_of
from neuranet.server.store import Store
from test_forecast_server import office_and_roamer_trace

FAST = {"epochs": 1, "hidden": 16, "members": 1, "min_steps": 50, "augment": 0}


@pytest.fixture
async def store(tmp_path):
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.migrate()
    yield store
    await store.close()


async def test_outlooks_follow_fits_and_state_changes(store: Store, tmp_path) -> None:
    user, _ = await store.users.create_user("alice")
    trace = parse_trace(office_and_roamer_trace(hosts=2, days=3), "test trace")
    devices = import_trace_devices(trace, time.time(), UNIX_CLOCK_OFFSET, "t")
    ids = await store.traces.add_simulated_devices(user.user_id, devices, prefix_of=trace_prefix_of, prefix="t")
    service = ForecastService(store, tmp_path / "forecast", 3600.0, FAST)
    fleet = Fleet({})
    fleet.use_forecasts(service.outlook)
    await service.refresh()
    assert all(fleet.view(d).p_online is None for d in ids)  # no model yet: no forecast, readers use persistence

    await service.retrain()
    for d in ids:
        view = fleet.view(d)
        assert view.p_online is not None and len(view.p_online) == len(HORIZONS)
        assert all(0.0 <= p <= 1.0 for p in view.p_online) and view.expected_online_seconds is not None

    service.stale(ids[0])  # it went offline or came back: the old outlook no longer holds
    assert fleet.view(ids[0]).p_online is None and fleet.view(ids[1]).p_online is not None
    await service.refresh([ids[0]])
    assert fleet.view(ids[0]).p_online is not None
