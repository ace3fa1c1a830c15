"""`AvailabilityForecast`: one small MLP over engineered features, trained across all devices' histories.

For each horizon ``h`` it gives P(online at ``t + h``) and, for a device online at ``t``, P(online
throughout ``[t, t + h)``), whose integral is the expected remaining online time. The network is
fitted on every device's past at once, so a new device gets the population's forecast for its
first hours and a personal one as its own features (profile, run lengths) fill in.

Calibration: the last ``calibration_span`` seconds of the past are held out, a first network is fitted
on what comes before, and per output a Platt scaling ``sigmoid(a * logit + b)`` is fitted on the held-out
targets; then the network is refitted on the whole past with the same seed and keeps that scaling.

Weights (and the feature scaling and calibration) are stored with safetensors, the configuration as
JSON next to them; nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuranet.forecast.dataset import Samples, training_samples
from neuranet.forecast.errors import ForecastError, HistoryError, NotFittedError
from neuranet.forecast.features import FeatureConfig, feature_matrix
from neuranet.forecast.trace import DAY, DeviceHistory

FORMAT_VERSION = 1
WEIGHTS_FILE = "forecast.safetensors"
CONFIG_FILE = "forecast.json"


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    """Model size, training and calibration settings (features in ``features``)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    hidden: int = 64
    depth: int = 2  # hidden layers
    dropout: float = 0.0
    embed: int = 4  # width of the time-of-day and day-of-week tables
    epochs: int = 12
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    sample_step: float = 600.0  # seconds between training samples on each device
    augment: int = 2  # late-joining copies of each history (see `training_samples`)
    calibration_span: float = 1.5 * DAY  # held out at the end of the past to fit calibration; 0: none
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = {f.name: getattr(self.features, f.name) for f in fields(FeatureConfig) if f.init}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ForecastConfig:
        data = dict(data)
        feats = dict(data.pop("features"))
        feats["horizons"] = tuple(feats["horizons"])
        return cls(features=FeatureConfig(**feats), **data)


TOD_BINS = 96  # 15-minute bins of the local time of day


def _bins(value: torch.Tensor, bins_per_unit: float, bins: int) -> torch.Tensor:
    """Right-closed bins ``(k, k + 1]``: a time exactly on an edge belongs to the bin before it, as the
    state at that time is the one just before it."""
    return torch.remainder(torch.ceil(value * bins_per_unit - 1e-3) - 1, bins).long()


class _Network(nn.Module):
    """Standardise, embed the clock, MLP, one logit per output; ``scale``/``shift`` hold the calibration.

    The local time of day of "now" and of every target is looked up in a table of 15-minute bins as
    well as given as smooth harmonics: daily edges such as scheduled shutdowns are sharp, which a
    table learns directly and smooth inputs only with large weights. The day of the week enters only
    for the targets (as harmonics): with a week or two of data, the day of the week together with the
    time of day names one moment of the past, which the network would otherwise memorise, while the
    target's kind of day (a weekend) is what a forecast needs.
    """

    def __init__(self, features: FeatureConfig, outputs: int, hidden: int, depth: int, dropout: float,
                 embed: int) -> None:
        super().__init__()
        width = features.width
        names = features.names
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.register_buffer("scale", torch.ones(outputs))
        self.register_buffer("shift", torch.zeros(outputs))
        ignored = [n.endswith((".tod_hours", ".dow_days")) or n.startswith("now.dow_") for n in names]
        self.register_buffer("used", ~torch.tensor(ignored))
        prefixes = ["now"] + [f"h{int(h)}" for h in features.horizons]
        self._tod = [names.index(f"{p}.tod_hours") for p in prefixes]
        self.tod_table = nn.Embedding(TOD_BINS, embed)
        layers: list[nn.Module] = []
        d = width + embed * len(prefixes)
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
            d = hidden
        layers.append(nn.Linear(d, outputs))
        self.mlp = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits. A feature that never varied in training (std 0) is ignored too: its
        weights were never trained, so any value it later takes would only add noise."""
        z = (x - self.mean) / self.std.clamp_min(1e-6)
        z = torch.where(self.used & (self.std > 0), z, torch.zeros_like(z))
        tod = self.tod_table(_bins(x[:, self._tod], TOD_BINS / 24, TOD_BINS)).flatten(1)
        return self.mlp(torch.cat([z, tod], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities."""
        return torch.sigmoid(self.logits(x) * self.scale + self.shift)


class AvailabilityForecast:
    """P(online) at each horizon, and expected remaining online time, for any device history.

    ``fit(histories, until)`` learns from every history's past before ``until``; ``predict(history, at)``
    then forecasts from the history up to ``at`` (a device the model has never seen is fine).
    """

    name = "ours (MLP)"

    def __init__(self, config: ForecastConfig | None = None) -> None:
        self.config = config or ForecastConfig()
        self.features = self.config.features
        self._net: _Network | None = None

    @property
    def horizons(self) -> tuple[float, ...]:
        return self.features.horizons

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, histories: Sequence[DeviceHistory], until: float | None = None) -> Self:
        """Fit on every history's past before ``until`` (default: everything known)."""
        histories = list(histories)
        if not histories:
            raise ForecastError("fit needs at least one device history")
        until = max(h.end for h in histories) if until is None else until
        rng = np.random.default_rng(self.config.seed)
        samples = training_samples(histories, until, self.features, self.config.sample_step,
                                   augment=self.config.augment, rng=rng)
        return self.fit_samples(samples, until)

    def fit_samples(self, samples: Samples, until: float) -> Self:
        """Fit on precomputed `training_samples` (all with targets known before ``until``)."""
        if not len(samples):
            raise ForecastError("no training samples: the histories hold no known state before `until`")
        cut = until - self.config.calibration_span
        horizons = np.asarray(self.horizons)
        scale = np.ones(2 * len(horizons))
        shift = np.zeros(2 * len(horizons))
        if self.config.calibration_span > 0:
            # Targets known before the cut train the first network; those that become known after it calibrate.
            target_time = samples.times[:, None] + horizons[None, :]
            early = np.tile(target_time <= cut, (1, 2))
            first = self._train(samples, early)
            late = np.tile(target_time > cut, (1, 2))
            scale, shift = _fit_platt(first, samples, late)
        self._net = self._train(samples, np.ones((len(samples), 2 * len(horizons)), dtype=bool))
        self._net.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        self._net.shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
        return self

    def _train(self, samples: Samples, use: np.ndarray) -> _Network:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        targets = np.concatenate([samples.online, samples.stay], axis=1)
        mask = use & ~np.isnan(targets)
        keep = mask.any(axis=1)
        x = torch.as_tensor(samples.x[keep])
        y = torch.as_tensor(np.nan_to_num(targets[keep]))
        m = torch.as_tensor(mask[keep].astype(np.float32))
        net = _Network(self.features, y.shape[1], cfg.hidden, cfg.depth, cfg.dropout, cfg.embed)
        net.mean.copy_(x.mean(dim=0))
        std = x.std(dim=0)
        net.std.copy_(torch.where(std > 1e-4, std, torch.zeros_like(std)))
        optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.learning_rate, total_steps=steps)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        net.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=generator)
            for i in range(0, len(x), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = (loss_fn(net.logits(x[idx]), y[idx]) * m[idx]).sum() / m[idx].sum().clamp_min(1.0)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
        net.eval()
        return net

    # -- forecasting -----------------------------------------------------------------------------

    def _network(self) -> _Network:
        if self._net is None:
            raise NotFittedError("AvailabilityForecast is not fitted: call fit() or load() first")
        return self._net

    def _probabilities(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        return self.probabilities_from_features(feature_matrix(history, times, self.features))

    def probabilities_from_features(self, x: np.ndarray) -> np.ndarray:
        """All outputs for precomputed `feature_matrix` rows: ``[n, 2 * horizons]``, online then stay."""
        net = self._network()
        with torch.no_grad():
            return net(torch.as_tensor(x, dtype=torch.float32)).double().numpy()

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """P(online at t + h) for precomputed `feature_matrix` rows."""
        return self.probabilities_from_features(x)[:, :len(self.horizons)]

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        """P(online at t + h) for each time (rows) and horizon (columns)."""
        return self._probabilities(history, np.asarray(times, np.float64))[:, :len(self.horizons)]

    def predict(self, history: DeviceHistory, at: float | None = None) -> dict[int, float]:
        """P(online at ``at + h``) per horizon in seconds, from the history up to ``at`` (default: its end)."""
        at = self._check_time(history, at)
        p = self.predict_many(history, np.array([at]))[0]
        return {int(h): float(v) for h, v in zip(self.horizons, p)}

    def stay_probabilities(self, history: DeviceHistory, at: float | None = None) -> dict[int, float]:
        """P(online throughout ``[at, at + h)``) per horizon; all 0 when offline at ``at``."""
        at = self._check_time(history, at)
        if not history.state_at(at):
            return {int(h): 0.0 for h in self.horizons}
        p = self._probabilities(history, np.array([at]))[0, len(self.horizons):]
        return {int(h): float(v) for h, v in zip(self.horizons, np.minimum.accumulate(p))}

    def expected_online_seconds(self, history: DeviceHistory, at: float | None = None) -> float:
        """Expected remaining time of the current online stretch (0 if offline at ``at``).

        The survival curve runs through 1 at 0 and the stay probabilities at the horizons, linearly in
        between; past the last horizon it decays exponentially at the rate of its last segment.
        """
        stay = self.stay_probabilities(history, at)
        if not any(stay.values()):
            return 0.0
        h = np.array([0.0, *stay.keys()])
        s = np.clip(np.array([1.0, *stay.values()]), 1e-6, 1.0)
        area = float(np.sum((s[1:] + s[:-1]) / 2 * np.diff(h)))
        decay = math.log(s[-2] / s[-1]) / (h[-1] - h[-2])
        tail = s[-1] / decay if decay > 0 else 7 * DAY * s[-1]
        return area + min(tail, 7 * DAY * s[-1])

    def _check_time(self, history: DeviceHistory, at: float | None) -> float:
        at = history.end if at is None else float(at)
        if history.state_at(at) is None:
            raise HistoryError(f"device {history.device_id!r}: no known state at {at:g} "
                               f"(history covers [{history.start:g}, {history.end:g}))")
        return at

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``forecast.safetensors`` (weights, scaling, calibration) and ``forecast.json`` (config)."""
        net = self._network()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / WEIGHTS_FILE))
        meta = {"format": FORMAT_VERSION, "config": self.config.to_json(), "feature_names": list(self.features.names)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AvailabilityForecast:
        """Read a model written by `save`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise ForecastError(f"cannot load a forecaster from {directory}: {e}") from e
        if meta.get("format") != FORMAT_VERSION:
            raise ForecastError(f"{directory}: unsupported forecaster format {meta.get('format')!r}")
        model = cls(ForecastConfig.from_json(meta["config"]))
        if list(model.features.names) != meta.get("feature_names"):
            raise ForecastError(f"{directory}: saved with different features than this version computes")
        cfg = model.config
        net = _Network(model.features, 2 * len(model.horizons), cfg.hidden, cfg.depth, cfg.dropout, cfg.embed)
        net.load_state_dict(state)
        net.eval()
        model._net = net
        return model


def _fit_platt(net: _Network, samples: Samples, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output, ``a, b`` minimising the log loss of ``sigmoid(a * logit + b)`` on the selected targets."""
    with torch.no_grad():
        z = net.logits(torch.as_tensor(samples.x)).double().numpy()
    targets = np.concatenate([samples.online, samples.stay], axis=1).astype(np.float64)
    scale, shift = np.ones(z.shape[1]), np.zeros(z.shape[1])
    for k in range(z.shape[1]):
        ok = use[:, k] & ~np.isnan(targets[:, k])
        if ok.sum() < 50 or len(np.unique(targets[ok, k])) < 2:
            continue
        a, b = _platt(z[ok, k], targets[ok, k])
        scale[k], shift[k] = a, b
    return scale, shift


def _platt(z: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    w = np.array([1.0, 0.0])
    design = np.column_stack([z, np.ones_like(z)])
    ridge = np.diag([1e-4, 1e-4])
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ w)))
        grad = design.T @ (p - y) / len(y) + ridge @ (w - [1.0, 0.0])
        hess = (design * (p * (1 - p))[:, None]).T @ design / len(y) + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-9:
            break
    return float(w[0]), float(w[1])
