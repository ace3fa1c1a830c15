"""Availability forecasting: trace parsing, features, baselines, metrics and the model, on small inputs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.forecast.baselines import LogisticRegression, Persistence, TimeOfDayProfile, _newton_logistic
from neuranet.forecast.dataset import Samples, online_targets, stay_targets, training_samples
from neuranet.forecast.errors import ForecastError, HistoryError, NotFittedError, TraceError, UnknownDeviceError
from neuranet.forecast.features import UNIX_CLOCK_OFFSET, FeatureConfig, feature_matrix
from neuranet.forecast.metrics import brier, ece, log_loss
from neuranet.forecast.model import AvailabilityForecast, ForecastConfig, _fit_temperature, target_weights
from neuranet.forecast.trace import DAY, HOUR, DeviceHistory, Interval, parse_trace, read_trace, recording_gaps

HEADER = "client_id,event_type,event_start,event_end\n"
CONFIG = FeatureConfig()


def history(device: str, *spans: tuple[float, float, int]) -> DeviceHistory:
    """Intervals given in hours."""
    return DeviceHistory(device, [Interval(a * HOUR, b * HOUR, bool(s)) for a, b, s in spans])


def column(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, CONFIG.names.index(name)]


# -- traces ------------------------------------------------------------------------------------


def test_parse_trace_merges_sorts_and_answers_state_queries() -> None:
    trace = parse_trace(HEADER + "7,1,0,0\n7,0,0,100\n7,1,100,250\n8,1,50,60\n7,1,250,300\n7,0,300,400\n")
    assert sorted(trace) == ["7", "8"]
    h = trace["7"]
    # The empty marker is dropped; the two touching online events are one stretch.
    assert h.intervals == (Interval(0, 100, False), Interval(100, 300, True), Interval(300, 400, False))
    assert list(h.change_times) == [100, 300]
    assert h.online_stretches == ((100, 300),)
    assert DeviceHistory.from_online_intervals("7", h.online_stretches, h.start, h.end).intervals == h.intervals
    # The state at t is the one just before t: unknown at the very start, offline at the change instant.
    assert h.state_at(0) is None and h.state_at(50) is False and h.state_at(100) is False
    assert h.state_at(100.5) is True and h.state_at(400) is False and h.state_at(400.5) is None
    assert float(h.online_seconds(50, 350)) == 200 and float(h.known_seconds(-10, 1000)) == 400
    assert trace.start == 0 and trace.end == 400


def test_recording_gaps_are_long_stretches_without_any_change() -> None:
    # Host 7 changes at 100 and 300, host 8 at 150: the stretches between changes are 50, 150 and 0.
    trace = parse_trace(HEADER + "7,0,0,100\n7,1,100,300\n7,0,300,400\n8,1,0,150\n8,0,150,400\n")
    assert recording_gaps(trace.values(), longer_than=100) == [(150.0, 300.0)]
    assert recording_gaps(trace.values(), longer_than=200) == []
    assert recording_gaps([]) == []


def test_timeline_is_unknown_before_the_first_interval() -> None:
    h = history("d", (1, 2, 1), (2, 3, 0))
    line = h.timeline(0, 3 * HOUR, step=1800)
    assert np.isnan(line[:2]).all()
    assert list(line[2:]) == [1.0, 1.0, 0.0, 0.0]


def test_from_online_intervals_fills_offline_gaps_and_open_stretches() -> None:
    h = DeviceHistory.from_online_intervals("d", [(10, 20), (30, None)], start=0, end=50)
    assert h.intervals == (Interval(0, 10, False), Interval(10, 20, True), Interval(20, 30, False),
                           Interval(30, 50, True))
    # Stretches are clipped to [start, end); one entirely outside is ignored.
    clipped = DeviceHistory.from_online_intervals("d", [(-30, -20), (-5, 5), (45, 60)], start=0, end=50)
    assert clipped.intervals == (Interval(0, 5, True), Interval(5, 45, False), Interval(45, 50, True))
    with pytest.raises(HistoryError, match="overlaps"):
        DeviceHistory.from_online_intervals("d", [(10, 20), (15, 25)], start=0, end=50)
    with pytest.raises(HistoryError, match="ends .* before it starts"):
        DeviceHistory.from_online_intervals("d", [(20, 10)], start=0, end=50)
    with pytest.raises(HistoryError, match="finite times and end >= start"):
        DeviceHistory("d", [Interval(0, math.nan, True)])
    with pytest.raises(HistoryError, match="overlaps"):
        DeviceHistory("d", [Interval(0, 10, True), Interval(5, 20, False)])


@pytest.mark.parametrize(("rows", "line", "message"), [
    ("a,b,c,d\n", 1, "header must be"),
    ("7,1,0,10\n7,1,10\n", 3, "expected 4 fields"),
    ("7,1,0,10\n7,2,10,20\n", 3, "event_type must be 0 .* or 1"),
    ("7,1,0,ten\n", 2, "must be numbers"),
    ("7,1,0,nan\n", 2, "finite"),
    ("7,1,20,10\n", 2, r"ends \(10\) before it starts \(20\)"),
    ("7,1,0,10\n8,0,0,5\n7,0,5,20\n", 4, r"client 7: event \[5, 20\) overlaps \[0, 10\) on line 2"),
    ("7,0,50,60\n7,1,0,55\n", 2, r"overlaps \[0, 55\) on line 3"),  # rows out of order: sorted first
    (",1,0,10\n", 2, "empty client_id"),
])
def test_malformed_traces_name_the_line(rows: str, line: int, message: str) -> None:
    text = rows if rows.startswith("a,b") else HEADER + rows
    with pytest.raises(TraceError, match=message) as info:
        parse_trace(text, source="t.csv")
    assert info.value.line == line
    assert str(info.value).startswith(f"t.csv, line {line}: ")


def test_read_trace_errors_and_unknown_devices(tmp_path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "missing.csv")
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "7,1,0,10\n")
    trace = read_trace(path)
    with pytest.raises(UnknownDeviceError, match="unknown device 'nope' .*1 devices"):
        trace["nope"]


# -- features ------------------------------------------------------------------------------------


def test_features_by_hand() -> None:
    # Offline 0-10 h, online 10-12 h, offline 12-34 h, online 34-40 h; features at 35 h.
    h = history("d", (0, 10, 0), (10, 12, 1), (12, 34, 0), (34, 40, 1))
    x = feature_matrix(h, np.array([35 * HOUR]), CONFIG)
    assert column(x, "now.online_now")[0] == 1.0
    assert column(x, "now.log_run_hours")[0] == pytest.approx(math.log1p(1.0))
    assert column(x, "now.run_censored")[0] == 0.0
    assert column(x, "now.frac_1h")[0] == pytest.approx(1.0)
    assert column(x, "now.frac_6h")[0] == pytest.approx(1 / 6)
    assert column(x, "now.frac_24h")[0] == pytest.approx(2 / 24)  # 11-12 h and 34-35 h
    assert column(x, "now.frac_7d")[0] == pytest.approx(3 / 35)  # only 35 h are known
    assert column(x, "now.coverage_24h")[0] == pytest.approx(1.0)
    assert column(x, "now.log_changes_24h")[0] == pytest.approx(math.log1p(2))  # at 12 h and 34 h
    assert column(x, "now.tod_hours")[0] == pytest.approx(11.0)
    assert column(x, "now.dow_days")[0] == pytest.approx(1 + 11 / 24)
    assert column(x, "now.state_1d_ago")[0] == 1.0 and column(x, "now.known_1d_ago")[0] == 1.0  # 11 h
    # Target 1 h ahead (36 h): a day earlier (12 h) the device had just been online.
    assert column(x, "h3600.state_1d_before")[0] == 1.0
    assert column(x, "h3600.tod_hours")[0] == pytest.approx(12.0)
    # Yesterday over the same hour (11-12 h): online throughout, no change inside it.
    assert column(x, "h3600.frac_same_span_1d_ago")[0] == pytest.approx(1.0)
    assert column(x, "h3600.log_changes_same_span_1d_ago")[0] == 0.0
    # 6 h ahead (41 h): a day earlier (17 h) offline; the day before, 11 h (online) -> 17 h (offline).
    assert column(x, "h21600.state_1d_before")[0] == 0.0
    assert column(x, "h21600.daily_change_rate")[0] == pytest.approx(1 / 2)  # one day, one pseudo-day
    # Profile around 17 h +-30 min on the one past day: offline for the whole hour, pulled toward the
    # device's mean (3/35) by 2 h of pseudo-observation.
    assert column(x, "h21600.daily_profile")[0] == pytest.approx((0 + 2 * 3 / 35) / (1 + 2))


def test_features_see_only_the_past() -> None:
    full = history("d", (0, 30, 0), (30, 31, 1), (31, 50, 0), (50, 80, 1))
    times = np.array([5, 30.5, 31, 40, 49.75]) * HOUR
    for t in times:
        past = full.clipped(end=t)
        other_future = DeviceHistory("d", [*past.intervals, Interval(t, t + 100 * HOUR, False)])
        expected = feature_matrix(full, np.array([t]), CONFIG)
        assert np.array_equal(feature_matrix(past, np.array([t]), CONFIG), expected)
        assert np.array_equal(feature_matrix(other_future, np.array([t]), CONFIG), expected)


def test_features_ignore_device_ids_and_absolute_time() -> None:
    spans = [(0, 9, 0), (9, 17, 1), (17, 33, 0), (33, 41, 1), (41, 60, 0)]
    times = np.array([10, 20, 34, 50]) * HOUR
    base = feature_matrix(history("a", *spans), times, CONFIG)
    assert np.array_equal(feature_matrix(history("b", *spans), times, CONFIG), base)
    week = 7 * 24
    shifted = history("a", *[(a + week, b + week, s) for a, b, s in spans])
    assert np.allclose(feature_matrix(shifted, times + week * HOUR, CONFIG), base, atol=1e-5)
    # The clock offset says where local midnight is: a day later on the clock, a day earlier locally.
    day_later = history("a", *[(a + 24, b + 24, s) for a, b, s in spans])
    local = FeatureConfig(clock_offset=-DAY)
    assert np.allclose(feature_matrix(day_later, times + DAY, local), base, atol=1e-5)


def test_unix_clock_offset_puts_a_monday_at_day_zero() -> None:
    monday_noon = 1_700_438_400 + 12 * HOUR  # 2023-11-20 00:00 UTC was a Monday
    h = DeviceHistory("d", [Interval(monday_noon - HOUR, monday_noon + HOUR, True)])
    x = feature_matrix(h, np.array([monday_noon]), FeatureConfig(clock_offset=UNIX_CLOCK_OFFSET))
    assert x[0, CONFIG.names.index("now.dow_days")] == pytest.approx(0.5)


def test_features_need_a_known_state() -> None:
    h = history("d", (0, 1, 1), (2, 3, 0))  # a gap 1-2 h
    with pytest.raises(HistoryError, match="state unknown at 5400"):
        feature_matrix(h, np.array([1.5 * HOUR]), CONFIG)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 30), st.booleans()), min_size=1, max_size=12),
       st.floats(0.01, 0.99))
def test_features_never_depend_on_the_future(runs: list[tuple[float, bool]], where: float) -> None:
    intervals, t0 = [], 0.0
    for length, online in runs:
        intervals.append(Interval(t0 * HOUR, (t0 + length) * HOUR, online))
        t0 += length
    full = DeviceHistory("d", intervals)
    t = full.start + where * (full.end - full.start)
    assert np.array_equal(feature_matrix(full.clipped(end=t), np.array([t]), CONFIG),
                          feature_matrix(full, np.array([t]), CONFIG))


# -- targets -------------------------------------------------------------------------------------


def test_targets_by_hand() -> None:
    h = history("d", (0, 1, 1), (1, 3, 0), (3, 10, 1))
    times = np.array([0.5, 2.0, 3.5]) * HOUR
    online = online_targets(h, times, (HOUR, 6 * HOUR, DAY))
    assert np.array_equal(online[:, :2], [[0, 1], [0, 1], [1, 1]])  # at 3 h: still offline just before
    assert np.isnan(online[:, 2]).all()
    stay = stay_targets(h, times, (0.25 * HOUR, HOUR, 6 * HOUR))
    assert np.array_equal(stay, [[1, 0, 0], [np.nan] * 3, [1, 1, 1]], equal_nan=True)
    assert np.isnan(stay_targets(h, np.array([9.5 * HOUR]), (HOUR,))).all()  # past the end: unknown


def test_training_samples_never_see_past_until() -> None:
    h = history("d", *[(i, i + 1, i % 2) for i in range(72)])
    samples = training_samples([h], until=40 * HOUR, config=CONFIG, step=1800, augment=2)
    assert samples.times.max() <= 40 * HOUR
    for k, horizon in enumerate(CONFIG.horizons):
        known = ~np.isnan(samples.online[:, k])
        assert (samples.times[known] + horizon <= 40 * HOUR).all()


# -- baselines and metrics -----------------------------------------------------------------------


def test_persistence_repeats_the_current_state() -> None:
    h = history("d", (0, 1, 1), (1, 2, 0))
    p = Persistence().predict_many(h, np.array([0.5, 1.5]) * HOUR)
    assert p.tolist() == [[1.0] * 4, [0.0] * 4]


def test_time_of_day_profile_by_hand() -> None:
    # Online 9-17 h on each of three days; at 8:00 on the fourth, the target 1 h ahead is 9:00.
    h = history("d", *[s for d in range(3) for s in ((24 * d, 24 * d + 9, 0), (24 * d + 9, 24 * d + 17, 1),
                                                    (24 * d + 17, 24 * d + 24, 0))], (72, 80, 0))
    profile = TimeOfDayProfile(day_prior=HOUR, week_prior=HOUR, mean_prior=DAY, population_mean=0.5)
    p = profile.predict_many(h, np.array([80 * HOUR]))[0]
    mean = (24 + DAY / HOUR * 0.5) / (80 + DAY / HOUR)  # 24 h online in 80 h, one day of prior at 0.5
    daily = (3 * 0.5 + 1 * mean) / (3 + 1)  # 8:30-9:30 on three days: half online each
    assert p[1] == pytest.approx(daily)  # no week of history: the weekly part is the daily one
    assert p[0] == pytest.approx((0 + mean) / (3 + 1))  # 8:15 +- 30 min: offline on all three days


def test_logistic_regression_finds_the_maximum_likelihood() -> None:
    x = np.array([0.0] * 10 + [1.0] * 10)
    y = np.array([1.0] * 2 + [0.0] * 8 + [1.0] * 8 + [0.0] * 2)
    w = _newton_logistic(np.column_stack([x, np.ones_like(x)]), y, l2=0.0)
    assert w[1] == pytest.approx(math.log(0.25), abs=1e-6)
    assert w[0] == pytest.approx(math.log(16), abs=1e-6)


def test_logistic_regression_learns_a_diurnal_fleet(fleet: list[DeviceHistory]) -> None:
    model = LogisticRegression(sample_step=1800, augment=0).fit(fleet, until=10 * DAY)
    times = np.arange(10 * DAY + 900, 12 * DAY, 1800.0)
    p = np.concatenate([model.predict_many(h, times) for h in fleet])
    q = np.concatenate([Persistence().predict_many(h, times) for h in fleet])
    y = np.concatenate([online_targets(h, times, CONFIG.horizons) for h in fleet])
    ok = ~np.isnan(y[:, 2])
    assert ((p > 0) & (p < 1)).all()
    assert brier(p[ok, 2], y[ok, 2]) < 0.5 * brier(q[ok, 2], y[ok, 2])


def test_metrics_by_hand() -> None:
    p = np.array([0.1, 0.9, 0.8, 0.3])
    y = np.array([0.0, 1.0, 0.0, 1.0])
    assert brier(p, y) == pytest.approx((0.01 + 0.01 + 0.64 + 0.49) / 4)
    assert log_loss(p, y) == pytest.approx(-(math.log(0.9) * 2 + math.log(0.2) + math.log(0.3)) / 4)
    # Bins: 0.1 -> [0.1, 0.2): |0.1 - 0|; 0.3 -> |0.3 - 1|; 0.8 and 0.9 in their own bins.
    assert ece(p, y) == pytest.approx((0.1 + 0.7 + 0.8 + 0.1) / 4)
    assert ece(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    with pytest.raises(ValueError):
        brier(np.array([0.5]), np.array([1.0, 0.0]))


# -- the model -----------------------------------------------------------------------------------

SMALL = ForecastConfig(members=1, hidden=32, epochs=8, batch_size=128, sample_step=1800, augment=1, learning_rate=3e-3)


def diurnal_fleet(devices: int = 10, days: int = 14, seed: int = 0) -> list[DeviceHistory]:
    """Office machines: online from about 8:00 to about 18:00 on weekdays, off on weekends, with a
    few random short outages; each device keeps its own hours give or take 20 minutes."""
    rng = np.random.default_rng(seed)
    fleet = []
    for d in range(devices):
        on_at, off_at = rng.uniform(7, 9), rng.uniform(17, 19)
        online: list[tuple[float, float]] = []
        for day in range(days):
            if day % 7 >= 5:
                continue
            start = (day * 24 + on_at + rng.normal(0, 0.3)) * HOUR
            end = (day * 24 + off_at + rng.normal(0, 0.3)) * HOUR
            if rng.random() < 0.3:  # a short outage
                cut = rng.uniform(start, end - HOUR)
                online += [(start, cut), (cut + rng.uniform(0.1, 0.5) * HOUR, end)]
            else:
                online.append((start, end))
        fleet.append(DeviceHistory.from_online_intervals(f"dev{d}", online, start=0, end=days * DAY))
    return fleet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: a second thread costs more in handoffs than it saves (and, on a busy
    machine, a lot more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fleet() -> list[DeviceHistory]:
    return diurnal_fleet()


@pytest.fixture(scope="module")
def fitted(fleet: list[DeviceHistory]) -> AvailabilityForecast:
    return AvailabilityForecast(SMALL).fit(fleet, until=10 * DAY)


def test_model_beats_persistence_on_a_diurnal_fleet(fleet: list[DeviceHistory], fitted: AvailabilityForecast) -> None:
    ours, persistence, outcomes = [], [], []
    for h in fleet:
        times = np.arange(10 * DAY + 900, 13 * DAY, 1800.0)
        ours.append(fitted.predict_many(h, times))
        persistence.append(Persistence().predict_many(h, times))
        outcomes.append(online_targets(h, times, SMALL.features.horizons))
    p, q, y = (np.concatenate(a) for a in (ours, persistence, outcomes))
    for k in range(1, 4):  # 1 h, 6 h, 24 h
        ok = ~np.isnan(y[:, k])
        assert brier(p[ok, k], y[ok, k]) < 0.6 * brier(q[ok, k], y[ok, k])
    # The 8:00 switch-on is known: at 7:00 on a weekday, offline now, online in 6 h.
    friday_7am = 11 * DAY + 7 * HOUR
    assert all(fitted.predict(h, at=friday_7am)[21600] > 0.8 for h in fleet if not h.state_at(friday_7am))


def test_new_device_gets_a_sensible_forecast(fitted: AvailabilityForecast) -> None:
    # Enrolled at 9:00 on a Tuesday and online since: four hours of history, none of it like today's
    # evening or tomorrow; the forecast is the fleet's.
    tuesday = 8 * DAY
    newcomer = DeviceHistory.from_online_intervals("new", [(tuesday + 9 * HOUR, None)],
                                                   start=tuesday + 9 * HOUR, end=tuesday + 13 * HOUR)
    p = fitted.predict(newcomer)
    assert set(p) == {900, 3600, 21600, 86400}
    assert p[900] > 0.8 and p[3600] > 0.7  # a working afternoon
    assert p[21600] < 0.3  # 19:00: everyone has gone home
    assert p[86400] > 0.6  # 13:00 on Wednesday: back at work
    assert 0 < fitted.expected_online_seconds(newcomer) < 12 * HOUR


def test_expected_online_time(fleet: list[DeviceHistory], fitted: AvailabilityForecast) -> None:
    h = fleet[0]
    morning, evening, night = 9 * DAY + 11 * HOUR, 9 * DAY + 17 * HOUR, 9 * DAY + 23 * HOUR
    assert h.state_at(morning) and h.state_at(evening) or pytest.skip("outage at the probe times")
    assert fitted.expected_online_seconds(h, at=night) == 0.0
    assert fitted.expected_online_seconds(h, at=morning) > fitted.expected_online_seconds(h, at=evening) > 0
    forecast = fitted.forecast(h, at=morning)
    assert list(forecast.stay.values()) == sorted(forecast.stay.values(), reverse=True)
    assert all(forecast.stay[h] <= forecast.online[h] for h in forecast.stay)  # staying implies being online
    assert forecast.online == fitted.predict(h, at=morning)
    assert forecast.to_json()["online"].keys() == {"900", "3600", "21600", "86400"}
    assert fitted.forecast(h, at=night).stay == {900: 0.0, 3600: 0.0, 21600: 0.0, 86400: 0.0}


def test_save_load_round_trip(tmp_path, fleet: list[DeviceHistory], fitted: AvailabilityForecast) -> None:
    fitted.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["forecast.json", "forecast.safetensors"]
    loaded = AvailabilityForecast.load(tmp_path / "model")
    assert loaded.config == fitted.config
    times = np.arange(10 * DAY, 11 * DAY, 3600.0)
    for h in fleet[:3]:
        assert np.array_equal(loaded.predict_many(h, times), fitted.predict_many(h, times))
        assert loaded.expected_online_seconds(h, at=times[12]) == fitted.expected_online_seconds(h, at=times[12])


def test_recency_weights_by_hand() -> None:
    horizons = (HOUR, DAY)
    times = np.array([0.0, DAY])
    samples = Samples(np.zeros((2, 1), np.float32), np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32),
                      times, np.zeros(2, np.int64))
    mask = np.ones((2, 4), dtype=bool)
    mask[1, 3] = False
    assert (target_weights(samples, mask, horizons, 2 * DAY, 0.0) == mask).all()  # no half-life: the mask
    w = target_weights(samples, mask, horizons, 2 * DAY, DAY)
    age = np.array([[2 * DAY - HOUR, DAY], [DAY - HOUR, 0.0]])  # until - (t + h), online then stay heads
    expected = np.tile(0.5 ** (age / DAY), (1, 2)) * mask
    assert w.dtype == np.float32 and np.allclose(w, expected)


def test_temperature_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=20_000)
    outcomes = (rng.random(20_000) < 1 / (1 + np.exp(-logits / 2))).astype(np.float32)  # truth: half the logit

    class Fixed:
        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1].repeat(1, 2)

    samples = Samples(logits[:, None].astype(np.float32), np.stack([outcomes, outcomes], 1),
                      np.full((20_000, 0), np.nan, np.float32), np.zeros(20_000), np.zeros(20_000, np.int64))
    use = np.ones((20_000, 2), dtype=bool)
    use[:, 1] = False  # nothing selected: left at 1
    scale = _fit_temperature(Fixed(), samples, use)  # type: ignore[arg-type]
    assert scale[0] == pytest.approx(0.5, rel=0.06) and scale[1] == 1.0


def test_calibrated_fit_runs_and_saves(tmp_path, fleet: list[DeviceHistory]) -> None:
    model = AvailabilityForecast(replace(SMALL, epochs=2, calibration_span=2 * DAY)).fit(fleet, until=10 * DAY)
    scale = model._net.scale.numpy()  # type: ignore[union-attr]
    assert scale.shape == (8,) and ((scale >= 0.25) & (scale <= 4)).all()
    loaded = AvailabilityForecast.load(model.save(tmp_path / "m"))
    assert np.array_equal(loaded._net.scale.numpy(), scale)  # type: ignore[union-attr]


def test_fitting_is_deterministic(fleet: list[DeviceHistory], fitted: AvailabilityForecast) -> None:
    again = AvailabilityForecast(SMALL).fit(fleet, until=10 * DAY)
    times = np.arange(10 * DAY, 11 * DAY, 3600.0)
    assert np.array_equal(again.predict_many(fleet[0], times), fitted.predict_many(fleet[0], times))


def test_model_errors(tmp_path, fleet: list[DeviceHistory], fitted: AvailabilityForecast) -> None:
    with pytest.raises(NotFittedError):
        AvailabilityForecast().predict(fleet[0], at=DAY)
    with pytest.raises(HistoryError, match="no known state at"):
        fitted.predict(fleet[0], at=20 * DAY)
    with pytest.raises(HistoryError, match="no known state at"):
        fitted.predict(fleet[0], at=0)
    with pytest.raises(NotFittedError):
        AvailabilityForecast().save(tmp_path / "unfitted")
    with pytest.raises(ForecastError, match="cannot load a forecaster"):
        AvailabilityForecast.load(tmp_path / "nothing")
    with pytest.raises(ForecastError, match="no training samples"):
        AvailabilityForecast(SMALL).fit(fleet, until=-DAY)
    with pytest.raises(ForecastError, match="at least one device history"):
        AvailabilityForecast(SMALL).fit([])
    saved = fitted.save(tmp_path / "old")
    meta = json.loads((saved / "forecast.json").read_text())
    meta["format"] = 0
    (saved / "forecast.json").write_text(json.dumps(meta))
    with pytest.raises(ForecastError, match="another version"):
        AvailabilityForecast.load(saved)
