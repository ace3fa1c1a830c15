"""Baseline forecasters, fitted and scored exactly like `AvailabilityForecast`.

- `Persistence`: the device stays in its current state (probability 1 or 0).
- `TimeOfDayProfile`: the device's own online fraction around the target's time of day over past
  days, refined by the same time of the week over past weeks; sparse profiles are pulled toward the
  device's mean, which is pulled toward the population's, so a new device starts at the average.
- `LogisticRegression`: one L2-regularised logistic regression per horizon on the model's features
  (shared block + that horizon's block) and, like the network, the clock as categories (hour of the
  day now and at the target, day of the week at the target), fitted by Newton's method in numpy.

Each has ``fit(histories, until)`` (use only what is known before ``until``) and
``predict_many(history, times) -> [len(times), len(horizons)]`` probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Self

import numpy as np

from neuranet.forecast.dataset import Samples, grid_times, online_targets, training_samples
from neuranet.forecast.features import WEEK, FeatureConfig, feature_matrix, same_time_profile
from neuranet.forecast.trace import DAY, HOUR, DeviceHistory


class Forecaster(Protocol):
    """What the benchmark needs of a method."""

    name: str
    features: FeatureConfig

    def fit(self, histories: Sequence[DeviceHistory], until: float) -> Self: ...

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray: ...


class Persistence:
    """P(online at t + h) = 1 if online at t else 0, at every horizon."""

    name = "persistence"

    def __init__(self, features: FeatureConfig | None = None) -> None:
        self.features = features or FeatureConfig()

    def fit(self, histories: Sequence[DeviceHistory], until: float) -> Self:
        return self

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        now = history.states_at(np.asarray(times, dtype=np.float64))
        return np.repeat(now[:, None], len(self.features.horizons), axis=1)


class TimeOfDayProfile:
    """The device's own time-of-day / day-of-week online profile at the target time, with priors.

    ``p_mean = (online_4w + mean_prior * population_mean) / (known_4w + mean_prior)``,
    ``p_day = (online_day + day_prior * p_mean) / (known_day + day_prior)`` over +-30 min of the
    target's time of day on each of the last 28 days, and likewise ``p_week`` over the same time of
    the week in the last 8 weeks, pulled toward ``p_day``. `fit` sets the population mean and picks
    the two prior strengths that score best on the fitted past.
    """

    name = "time-of-day profile"
    PRIOR_GRID = (0.25 * HOUR, HOUR, 4 * HOUR, 16 * HOUR, 64 * HOUR)

    def __init__(self, features: FeatureConfig | None = None, day_prior: float = 2 * HOUR,
                 week_prior: float = 4 * HOUR, mean_prior: float = DAY, population_mean: float = 0.5,
                 weeks: int = 8) -> None:
        self.features = features or FeatureConfig()
        self.weeks = weeks
        self.day_prior, self.week_prior, self.mean_prior = day_prior, week_prior, mean_prior
        self.population_mean = population_mean

    def fit(self, histories: Sequence[DeviceHistory], until: float) -> Self:
        pasts = [h.clipped(end=until) for h in histories]
        pasts = [p for p in pasts if len(p)]
        known = sum(float(p.known_seconds(p.start, p.end)) for p in pasts)
        online = sum(float(p.online_seconds(p.start, p.end)) for p in pasts)
        self.population_mean = online / known if known > 0 else 0.5
        parts = [self._parts(p, grid_times(p, p.start, p.end, HOUR)) for p in pasts]
        targets = np.concatenate([online_targets(p, grid_times(p, p.start, p.end, HOUR), self.features.horizons)
                                  for p in pasts])
        ok = ~np.isnan(targets)
        best = (np.inf, self.day_prior, self.week_prior)
        # Strongest priors first, a weaker one only if it scores strictly better: a profile the past
        # never exercised (no week of history yet) keeps a strong prior instead of an arbitrary one.
        for day_prior in reversed(self.PRIOR_GRID):
            for week_prior in reversed(self.PRIOR_GRID):
                pred = np.concatenate([self._combine(q, day_prior, week_prior) for q in parts])
                score = float(np.mean((pred[ok] - targets[ok]) ** 2))
                if score < best[0] - 1e-6:
                    best = (score, day_prior, week_prior)
        _, self.day_prior, self.week_prior = best
        return self

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        return self._combine(self._parts(history, np.asarray(times, np.float64)), self.day_prior, self.week_prior)

    def _parts(self, history: DeviceHistory, t: np.ndarray) -> list[np.ndarray]:
        """Per horizon: device-mean, daily and weekly (online, known) seconds, stacked ``[6, n]``."""
        cfg = self.features
        out = []
        long_online = history.online_seconds(t - cfg.long_window, t)
        long_known = history.known_seconds(t - cfg.long_window, t)
        for h in cfg.horizons:
            daily = same_time_profile(history, t, t + h, DAY, cfg.profile_days, cfg.profile_halfwidth)
            weekly = same_time_profile(history, t, t + h, WEEK, self.weeks, cfg.profile_halfwidth)
            out.append(np.stack([long_online, long_known, *daily, *weekly]))
        return out

    def _combine(self, parts: list[np.ndarray], day_prior: float, week_prior: float) -> np.ndarray:
        columns = []
        for on_all, known_all, on_d, known_d, on_w, known_w in parts:
            mean = (on_all + self.mean_prior * self.population_mean) / (known_all + self.mean_prior)
            daily = (on_d + day_prior * mean) / (known_d + day_prior)
            columns.append((on_w + week_prior * daily) / (known_w + week_prior))
        return np.stack(columns, axis=1)


class LogisticRegression:
    """Per horizon, ``sigmoid(w . inputs + b)`` with an L2 penalty, fitted by Newton's method.

    The inputs are the standardised features of the horizon (`FeatureConfig.horizon_columns`) plus
    one-hot hour of the day now and at the target and day of the week at the target: the network
    looks the clock up in tables, and a linear model deserves the same categories.
    """

    name = "logistic regression"

    def __init__(self, features: FeatureConfig | None = None, l2: float = 1.0, sample_step: float = 900.0,
                 augment: int = 2, seed: int = 0) -> None:
        self.features = features or FeatureConfig()
        self.l2, self.sample_step, self.augment, self.seed = l2, sample_step, augment, seed
        self.weights: list[np.ndarray] = []
        self.mean = np.zeros(0)
        self.scale = np.ones(0)

    def fit(self, histories: Sequence[DeviceHistory], until: float) -> Self:
        rng = np.random.default_rng(self.seed)
        return self.fit_samples(training_samples(list(histories), until, self.features, self.sample_step,
                                                 augment=self.augment, rng=rng))

    def fit_samples(self, samples: Samples) -> Self:
        """Fit on precomputed samples (as `training_samples` returns them)."""
        x = samples.x.astype(np.float64)
        self.mean, self.scale = x.mean(axis=0), x.std(axis=0)
        self.scale[self.scale < 1e-6] = 1.0
        self.weights = []
        for k in range(len(self.features.horizons)):
            y = samples.online[:, k].astype(np.float64)
            ok = ~np.isnan(y)
            self.weights.append(_newton_logistic(self._design(x[ok], k), y[ok], self.l2))
        return self

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        return self.predict_features(feature_matrix(history, times, self.features))

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return np.stack([_sigmoid(self._design(x, k) @ w) for k, w in enumerate(self.weights)], axis=1)

    def _design(self, x: np.ndarray, k: int) -> np.ndarray:
        names = self.features.names
        target = f"h{int(self.features.horizons[k])}"
        columns = self.features.horizon_columns(k)
        z = (x[:, columns] - self.mean[columns]) / self.scale[columns]
        clock = [_one_hot(x[:, names.index("now.tod_hours")], 1.0, 24),
                 _one_hot(x[:, names.index(f"{target}.tod_hours")], 1.0, 24),
                 _one_hot(x[:, names.index(f"{target}.dow_days")], 1.0, 7)]
        return np.column_stack([z, *clock, np.ones(len(x))])


def _one_hot(value: np.ndarray, bins_per_unit: float, bins: int) -> np.ndarray:
    """Right-closed bins ``(k, k + 1]`` as in the network, one-hot without the first bin (the intercept's)."""
    index = np.mod(np.ceil(value * bins_per_unit - 1e-3) - 1, bins).astype(np.int64)
    return np.eye(bins)[index][:, 1:]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _newton_logistic(design: np.ndarray, y: np.ndarray, l2: float, iterations: int = 25) -> np.ndarray:
    """Minimise mean log loss + ``l2 / (2 n)`` |w|^2 (intercept, the last column, unpenalised)."""
    n, d = design.shape
    w = np.zeros(d)
    penalty = np.full(d, l2 / n)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(design @ w)
        grad = design.T @ (p - y) / n + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design / n + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w

