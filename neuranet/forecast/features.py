"""Features of a device's past at a time ``t``, for forecasting whether it is online at ``t + h``.

Every feature depends on the history up to ``t`` only (never on what follows; a change exactly at
``t`` is not seen yet, see `DeviceHistory`), and on time only through the local time of day and day
of the week: never absolute time, never the device's id, so a forecaster fitted on some devices and
some weeks applies to others. Nothing counts the history's length beyond a day (coverage of the
last day, rates rather than counts over a week), so on a trace whose devices all start together,
history length cannot stand in for absolute time.

Per time there is one block of shared features (the state now and how long it has lasted, recent
online fractions and change counts, the clock, the state a day ago) and one block per horizon,
about the target time ``u = t + h``: its clock, the state a day before it, the device's own profile
around that time of day, what the device did over the same stretch of the day on past days.
`FeatureConfig.names` lists the columns of `feature_matrix` in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neuranet.forecast.errors import HistoryError
from neuranet.forecast.trace import DAY, HOUR, DeviceHistory

WEEK = 7 * DAY
HORIZONS: tuple[float, ...] = (15 * 60.0, HOUR, 6 * HOUR, DAY)
UNIX_CLOCK_OFFSET = 3 * DAY  # 1970-01-01 was a Thursday: Unix time + 3 days = seconds since a Monday 00:00 UTC

TOD_HARMONICS = 8  # sin/cos of 1x..8x the daily phase: sharp daily edges (8:00 shutdowns) need more than 1x
# Local hour of the day [0, 24) and day of the week [0, 7), then their harmonics.
_CLOCK_NAMES = ("tod_hours", "dow_days") + tuple(
    f"tod_{f}{k}" for k in range(1, TOD_HARMONICS + 1) for f in ("sin", "cos")) + ("dow_sin", "dow_cos")
SHARED_NAMES: tuple[str, ...] = (
    "online_now", "log_run_hours", "run_censored",
    "frac_1h", "frac_6h", "frac_24h", "frac_7d", "coverage_24h",
    "log_changes_24h", "log_changes_per_day_7d",
    *_CLOCK_NAMES,
    "state_1d_ago", "known_1d_ago",
)
HORIZON_NAMES: tuple[str, ...] = (
    *_CLOCK_NAMES,
    "state_1d_before", "known_1d_before", "daily_profile", "log_daily_profile_hours",
    "frac_same_span_1d_ago", "log_changes_same_span_1d_ago",
    "same_start_profile", "log_same_start_days", "daily_change_rate",
)


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """What `feature_matrix` computes; stored with a model so it is computed the same way later."""

    horizons: tuple[float, ...] = HORIZONS  # seconds ahead, ascending
    clock_offset: float = 0.0  # added to history times to get local seconds since a Monday 00:00
    profile_days: int = 28  # past days in the daily time-of-day profile
    profile_halfwidth: float = 1800.0  # the profile at time of day x averages [x - w, x + w]
    profile_prior_seconds: float = 2 * HOUR  # pseudo-observation pulling a sparse profile to the device mean
    long_window: float = 28 * DAY  # "all" history fraction looks back this far
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.horizons or any(h <= 0 for h in self.horizons) or list(self.horizons) != sorted(self.horizons):
            raise ValueError(f"horizons must be positive and ascending, got {self.horizons}")
        if max(self.horizons) > DAY:
            raise ValueError("horizons beyond a day are not supported (the state a day before the target "
                             "would be in the future)")
        names = [f"now.{n}" for n in SHARED_NAMES]
        names += [f"h{int(h)}.{n}" for h in self.horizons for n in HORIZON_NAMES]
        object.__setattr__(self, "names", tuple(names))

    @property
    def width(self) -> int:
        return len(self.names)

    def horizon_columns(self, k: int) -> np.ndarray:
        """Columns for horizon index ``k``: the shared block and that horizon's block."""
        shared = np.arange(len(SHARED_NAMES))
        start = len(SHARED_NAMES) + k * len(HORIZON_NAMES)
        return np.concatenate([shared, np.arange(start, start + len(HORIZON_NAMES))])


def feature_matrix(history: DeviceHistory, times: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Features at each time (rows) from the history up to that time; float32 ``[len(times), config.width]``.

    Raises `HistoryError` where the device's state at a time is unknown (before its history, in a gap
    or after its end): there is nothing to forecast from there.
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    now = history.states_at(t)
    if np.isnan(now).any():
        bad = float(t[np.isnan(now)][0])
        raise HistoryError(f"device {history.device_id!r}: state unknown at {bad:g} "
                           f"(history covers [{history.start:g}, {history.end:g}))")
    frac_all, _ = _frac(history, t - config.long_window, t, now)
    shared = _shared_features(history, t, now, config)
    blocks = [shared] + [_horizon_features(history, t, now, h, frac_all, config) for h in config.horizons]
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _frac(history: DeviceHistory, a: np.ndarray, b: np.ndarray,
          fill: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Online fraction of the known time in ``[a, b)`` (``fill`` where none is known) and the known seconds."""
    known = history.known_seconds(a, b)
    online = history.online_seconds(a, b)
    safe = np.where(known > 0, known, 1.0)
    return np.where(known > 0, online / safe, fill), known


def _clock(t: np.ndarray, config: FeatureConfig) -> list[np.ndarray]:
    local = t + config.clock_offset
    day = 2 * np.pi * np.mod(local, DAY) / DAY
    week = 2 * np.pi * np.mod(local, WEEK) / WEEK
    daily = [f(k * day) for k in range(1, TOD_HARMONICS + 1) for f in (np.sin, np.cos)]
    return [np.mod(local, DAY) / HOUR, np.mod(local, WEEK) / DAY, *daily, np.sin(week), np.cos(week)]


def _state_before(history: DeviceHistory, at: np.ndarray, fill: np.ndarray) -> list[np.ndarray]:
    """The state at earlier times ``at`` (all <= now) and whether it is known; ``fill`` where unknown."""
    s = history.states_at(at)
    known = ~np.isnan(s)
    return [np.where(known, s, fill), known.astype(np.float64)]


def _shared_features(history: DeviceHistory, t: np.ndarray, now: np.ndarray, config: FeatureConfig) -> np.ndarray:
    run_start = history.run_starts_at(t)
    run_hours = (t - run_start) / HOUR
    censored = (run_start <= history.start).astype(np.float64)
    frac_all, _ = _frac(history, t - config.long_window, t, now)
    fracs = [_frac(history, t - w, t, frac_all) for w in (HOUR, 6 * HOUR, DAY, WEEK)]
    known_24h, known_7d = fracs[2][1], fracs[3][1]
    # A rate, not a count: a count over a week would grow with the history's length for a week.
    changes_per_day = history.changes_between(t - WEEK, t) / np.maximum(known_7d / DAY, 1.0)
    columns = [
        now, np.log1p(run_hours), censored,
        fracs[0][0], fracs[1][0], fracs[2][0], fracs[3][0], known_24h / DAY,
        np.log1p(history.changes_between(t - DAY, t)), np.log1p(changes_per_day),
        *_clock(t, config),
        *_state_before(history, t - DAY, frac_all),
    ]
    return np.stack(columns, axis=1)


def same_time_profile(history: DeviceHistory, t: np.ndarray, target: np.ndarray, period: float, periods: int,
                      halfwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """Online and known seconds around ``target - k * period`` (k = 1..periods), counting only time <= ``t``.

    With ``period`` a day this is the device's time-of-day profile at the target's time of day; with a
    week, its day-of-week profile.
    """
    online = np.zeros_like(t)
    known = np.zeros_like(t)
    for k in range(1, periods + 1):
        centre = target - k * period
        b = np.minimum(centre + halfwidth, t)
        a = np.minimum(centre - halfwidth, b)
        online += history.online_seconds(a, b)
        known += history.known_seconds(a, b)
    return online, known


def past_days_transitions(history: DeviceHistory, t: np.ndarray, now: np.ndarray, h: float,
                          days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the device did over the same stretch of the day on past days (``t - k days`` to ``t + h - k days``).

    Returns, per time: on how many past days the state at the start was known and equal to ``now``,
    on how many of those it was online at the end, on how many days both ends were known, and on
    how many of those the state at the end differed from the start.
    """
    matching = np.zeros_like(t)
    matching_online = np.zeros_like(t)
    both = np.zeros_like(t)
    changed = np.zeros_like(t)
    for k in range(1, days + 1):
        start = history.states_at(t - k * DAY)
        end = history.states_at(np.minimum(t + h - k * DAY, t))  # <= t; min() only undoes rounding
        known = ~np.isnan(start) & ~np.isnan(end)
        same = known & (start == now)
        matching += same
        matching_online += same & (end == 1.0)
        both += known
        changed += known & (start != end)
    return matching, matching_online, both, changed


def _horizon_features(history: DeviceHistory, t: np.ndarray, now: np.ndarray, h: float, frac_all: np.ndarray,
                      config: FeatureConfig) -> np.ndarray:
    u = t + h
    u_day_before = np.minimum(u - DAY, t)  # <= t as h <= a day; min() only undoes rounding
    prior = config.profile_prior_seconds
    on_d, known_d = same_time_profile(history, t, u, DAY, config.profile_days, config.profile_halfwidth)
    daily = (on_d + prior * frac_all) / (known_d + prior)
    span_frac, _ = _frac(history, t - DAY, u_day_before, daily)
    matching, matching_online, both, changed = past_days_transitions(history, t, now, h, config.profile_days)
    # One pseudo-day pulls each rate toward its uninformed value (the daily profile; no change).
    columns = [
        *_clock(u, config),
        *_state_before(history, u_day_before, daily),
        daily, np.log1p(known_d / HOUR),
        span_frac, np.log1p(history.changes_between(t - DAY, u_day_before)),
        (matching_online + daily) / (matching + 1.0), np.log1p(matching), changed / (both + 1.0),
    ]
    return np.stack(columns, axis=1)
