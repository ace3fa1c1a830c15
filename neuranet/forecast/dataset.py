"""Training and evaluation samples: times on a grid per device, their features and what happened next.

Two targets per horizon ``h`` at time ``t``: whether the device is online at ``t + h`` ("online"),
and, for a device online at ``t``, whether it stays online throughout ``[t, t + h)`` ("stay", whose
integral is the expected remaining online time). A target is NaN where the history does not say.
Fitting "until" a time clips every history there first, so no feature and no target can see later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np

from neuranet.forecast.features import FeatureConfig, feature_matrix
from neuranet.forecast.trace import DAY, DeviceHistory


@dataclass(frozen=True, slots=True)
class Samples:
    """Rows of features and targets; ``device`` indexes the histories they came from."""

    x: np.ndarray  # float32 [n, features]
    online: np.ndarray  # float32 [n, horizons]: 1/0/NaN
    stay: np.ndarray  # float32 [n, horizons]: 1/0/NaN (NaN also where offline at t)
    times: np.ndarray  # float64 [n]
    device: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.times)

    @staticmethod
    def concat(parts: list[Samples], width: int, horizons: int) -> Samples:
        """All rows of ``parts``, in order (empty ones of the given shape if there are none)."""
        if not parts:
            empty = np.zeros((0, horizons), np.float32)
            return Samples(np.zeros((0, width), np.float32), empty, empty.copy(), np.zeros(0), np.zeros(0, np.int64))
        return Samples(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Samples)))

    def select(self, rows: np.ndarray) -> Samples:
        """The rows selected by a boolean mask or index array."""
        return Samples(*(getattr(self, f.name)[rows] for f in fields(Samples)))


def grid_times(history: DeviceHistory, start: float, end: float, step: float, phase: float = 0.0) -> np.ndarray:
    """Times ``phase + k * step`` in ``(max(start, history.start), min(end, history.end)]`` where the state is known."""
    lo, hi = max(start, history.start), min(end, history.end)
    if not (hi > lo):
        return np.zeros(0)
    first = phase + step * math.floor((lo - phase) / step + 1)
    t = np.arange(first, hi + 1e-9, step, dtype=np.float64)
    t = t[t > lo]
    return t[~np.isnan(history.states_at(t))]


def online_targets(history: DeviceHistory, times: np.ndarray, horizons: Iterable[float]) -> np.ndarray:
    """State at ``t + h`` per time and horizon: 1/0, NaN unknown."""
    return np.stack([history.states_at(times + h) for h in horizons], axis=1).astype(np.float32)


def stay_targets(history: DeviceHistory, times: np.ndarray, horizons: Iterable[float]) -> np.ndarray:
    """Whether a device online at ``t`` stays online throughout ``[t, t + h)``: 1/0, NaN unknown or offline at ``t``.

    A change exactly at ``t`` ends the stay (the state at ``t`` is the one just before it); one exactly at
    ``t + h`` does not."""
    now = history.states_at(times)
    out = []
    for h in horizons:
        n_changes = history.changes_between(times, times + h)
        fully_known = history.known_seconds(times, times + h) >= h - 1e-6
        y = np.where(n_changes > 0, 0.0, np.where(fully_known, 1.0, np.nan))
        out.append(np.where(now == 1.0, y, np.nan))
    return np.stack(out, axis=1).astype(np.float32)


def device_samples(history: DeviceHistory, times: np.ndarray, config: FeatureConfig, device: int = 0) -> Samples:
    """Features and both targets at the given times (where the state is known)."""
    return Samples(
        x=feature_matrix(history, times, config),
        online=online_targets(history, times, config.horizons),
        stay=stay_targets(history, times, config.horizons),
        times=np.asarray(times, dtype=np.float64),
        device=np.full(len(times), device, dtype=np.int64),
    )


def training_samples(histories: list[DeviceHistory], until: float, config: FeatureConfig, step: float,
                     augment: int = 0, rng: np.random.Generator | None = None) -> Samples:
    """Samples from every history's past before ``until`` (targets also before ``until``).

    ``augment`` extra copies of each history start at a random later time, as if the device had
    joined then: the model then meets short histories at every time of the day and week instead of
    only at the very start of the data, so history length cannot stand in for absolute time. The
    start times and each copy's grid phase are drawn from ``rng``.
    """
    rng = rng or np.random.default_rng(0)
    parts = []
    for i, full in enumerate(histories):
        past = full.clipped(end=until)
        if not len(past):
            continue
        starts = [past.start]
        span = past.end - past.start - DAY
        if augment and span > 0:
            starts += list(past.start + rng.uniform(0.0, span, size=augment))
        for s in starts:
            h = past if s == past.start else past.clipped(start=s)
            times = grid_times(h, h.start, h.end, step, phase=float(rng.uniform(0.0, step)))
            if len(times):
                parts.append(device_samples(h, times, config, device=i))
    return Samples.concat(parts, config.width, len(config.horizons))
