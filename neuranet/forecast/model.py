"""`AvailabilityForecast`: small MLPs over engineered features, trained across all devices' histories.

For each horizon ``h`` it gives P(online at ``t + h``) and, for a device online at ``t``, P(online
throughout ``[t, t + h)``), whose integral is the expected remaining online time. The networks are
fitted on every device's past at once, so a new device gets the fleet's forecast for its first hours
and a personal one as its own features (profile, yesterday, run lengths) fill in. Three networks from
different seeds are averaged: on a trace of a week or two a single one is noticeably seed-dependent.

Calibration is optional (``calibration_span``): the end of the past is held out, networks fitted on
what comes before, a temperature per output fitted on the held-out targets, then the networks refitted
on everything keep it. On the SETI trace the averaged networks are already calibrated (ECE well inside
the aims) and a temperature from the last day and a half made it worse (that slice is not like the
days after it), so it is off by default.

Older targets weigh less in the loss (``recency_half_life``, two days by default), halving per
half-life before the end of the past: availability drifts, and with a week or two of history the first
days (a trace's start, a recording gap) otherwise weigh as much as the last. On the SETI trace's held-out
hosts a two-day half-life (chosen once, not tuned) improved every horizon's Brier score from 1 h on
(6 h: 0.048 -> 0.042) and the 24 h ECE (0.057 -> 0.046); that ECE still misses 0.04 because the scored
third is far less online than the past (24 h targets 0.21 online against 0.35 before the cut), a
fleet-wide shift no past-only fit anticipates. 0 weighs every target alike.

Weights, feature scaling and temperatures are stored with safetensors, the configuration as JSON next
to them; nothing is pickled. Fitting is deterministic for a seed (and a torch thread count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuranet.forecast._network import Network
from neuranet.forecast.dataset import Samples, training_samples
from neuranet.forecast.errors import ForecastError, HistoryError, NotFittedError
from neuranet.forecast.features import FeatureConfig, feature_matrix
from neuranet.forecast.trace import DAY, DeviceHistory

FORMAT_VERSION = 1
WEIGHTS_FILE = "forecast.safetensors"
CONFIG_FILE = "forecast.json"
MAX_TAIL = 7 * DAY  # the expected remaining online time extrapolates at most this far past the last horizon


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    """Model size, training and calibration settings (and the features they are computed on)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    members: int = 3  # networks trained from different seeds; their logits are averaged
    hidden: int = 128
    depth: int = 2  # hidden layers
    dropout: float = 0.0
    embed: int = 4  # width of each clock table entry
    epochs: int = 2
    min_steps: int = 1000  # optimiser steps at least, however few the samples (a small fleet's history)
    batch_size: int = 1024
    learning_rate: float = 1e-3  # peak of a one-cycle schedule
    weight_decay: float = 1e-4
    sample_step: float = 600.0  # seconds between training samples on each device
    augment: int = 2  # late-joining copies of each history (see `training_samples`)
    calibration_span: float = 0.0  # seconds held out at the end of the past to fit temperatures; 0: none
    recency_half_life: float = 2 * DAY  # a target this much older than `until` weighs half as much; 0: all equal
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


@dataclass(frozen=True, slots=True)
class Forecast:
    """One device's forecast at ``at``: horizons in seconds to probabilities, and the expected
    remaining online time (0 when offline)."""

    at: float
    online: dict[int, float]  # P(online at at + h)
    stay: dict[int, float]  # P(online throughout [at, at + h)); 0 when offline at `at`
    expected_online_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "online": {str(h): p for h, p in self.online.items()},
                "stay": {str(h): p for h, p in self.stay.items()},
                "expected_online_seconds": self.expected_online_seconds}


class AvailabilityForecast:
    """P(online) at each horizon, and expected remaining online time, for any device history.

    ``fit(histories, until)`` learns from every history's past before ``until``; then
    ``forecast(history, at)`` / ``predict(history, at)`` forecast from the history up to ``at``
    (a device the model never saw is fine; a few hours of history are enough to start).
    """

    name = "ours (MLP)"

    def __init__(self, config: ForecastConfig | None = None) -> None:
        self.config = config or ForecastConfig()
        self.features = self.config.features
        self._net: Network | None = None

    @property
    def horizons(self) -> tuple[float, ...]:
        return self.features.horizons

    @property
    def fitted(self) -> bool:
        return self._net is not None

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, histories: Iterable[DeviceHistory], until: float | None = None) -> Self:
        """Fit on every history's past before ``until`` (default: all that is known)."""
        histories = list(histories)
        if not histories:
            raise ForecastError("fit needs at least one device history")
        until = max(h.end for h in histories) if until is None else until
        samples = training_samples(histories, until, self.features, self.config.sample_step,
                                   augment=self.config.augment, rng=np.random.default_rng(self.config.seed))
        return self.fit_samples(samples, until)

    def fit_samples(self, samples: Samples, until: float) -> Self:
        """Fit on precomputed `training_samples` (targets all known before ``until``)."""
        if not len(samples):
            raise ForecastError("no training samples: the histories hold no known state before `until`")
        outputs = 2 * len(self.horizons)
        scale = np.ones(outputs)
        if self.config.calibration_span > 0:
            cut = until - self.config.calibration_span
            target_time = samples.times[:, None] + np.asarray(self.horizons)[None, :]
            early = self._train(samples, np.tile(target_time <= cut, (1, 2)), cut)
            scale = _fit_temperature(early, samples, np.tile(target_time > cut, (1, 2)))
        net = self._train(samples, np.ones((len(samples), outputs), dtype=bool), until)
        net.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        self._net = net
        return self

    def _new_network(self) -> Network:
        cfg = self.config
        return Network(self.features, 2 * len(self.horizons), cfg.members, cfg.hidden, cfg.depth, cfg.embed,
                       cfg.dropout)

    def _train(self, samples: Samples, use: np.ndarray, until: float) -> Network:
        """A network whose members are trained on the targets selected by ``use`` (where known)."""
        targets = np.concatenate([samples.online, samples.stay], axis=1)
        mask = use & ~np.isnan(targets)
        keep = mask.any(axis=1)
        x = torch.as_tensor(samples.x[keep])
        y = torch.as_tensor(np.nan_to_num(targets[keep]))
        weight = target_weights(samples, mask, self.horizons, until, self.config.recency_half_life)
        weight = torch.as_tensor(weight[keep])
        net = self._new_network()
        net.set_scaling(x)
        inputs = net.inputs(x)
        for i, member in enumerate(net.members):
            self._train_member(member, inputs, y, weight, seed=self.config.seed * 1000 + i)
        net.eval()
        return net

    def _train_member(self, member: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor,
                      weight: torch.Tensor, seed: int) -> None:
        cfg = self.config
        n = len(y)
        with torch.random.fork_rng(devices=[]):  # seed this member without touching the caller's RNG
            torch.manual_seed(seed)
            for layer in member.modules():
                if isinstance(layer, (nn.Linear, nn.Embedding)):
                    layer.reset_parameters()
            order_rng = torch.Generator().manual_seed(seed)
            optimiser = torch.optim.AdamW(member.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            per_epoch = math.ceil(n / cfg.batch_size)
            total = max(cfg.epochs * per_epoch, cfg.min_steps)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.learning_rate, total_steps=total)
            loss_fn = nn.BCEWithLogitsLoss(reduction="none")
            member.train()
            for step in range(total):
                if step % per_epoch == 0:
                    order = torch.randperm(n, generator=order_rng)
                i = (step % per_epoch) * cfg.batch_size
                idx = order[i:i + cfg.batch_size]
                w = weight[idx]
                loss = (loss_fn(member(*(part[idx] for part in inputs)), y[idx]) * w).sum() / w.sum().clamp_min(1)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
            member.eval()

    # -- forecasting -----------------------------------------------------------------------------

    def probabilities_from_features(self, x: np.ndarray) -> np.ndarray:
        """All outputs for `feature_matrix` rows: ``[n, 2 * horizons]``, P(online at t + h) then P(stay)."""
        if self._net is None:
            raise NotFittedError("AvailabilityForecast is not fitted: call fit() or load() first")
        with torch.no_grad():
            return self._net(torch.as_tensor(x, dtype=torch.float32)).double().numpy()

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """P(online at t + h) for `feature_matrix` rows (columns: horizons)."""
        return self.probabilities_from_features(x)[:, :len(self.horizons)]

    def predict_many(self, history: DeviceHistory, times: np.ndarray) -> np.ndarray:
        """P(online at t + h) for each time (rows) and horizon (columns), each from the history up to t."""
        return self.predict_features(feature_matrix(history, np.asarray(times, np.float64), self.features))

    def predict(self, history: DeviceHistory, at: float | None = None) -> dict[int, float]:
        """P(online at ``at + h``) per horizon in seconds, from the history up to ``at`` (default: its end)."""
        return self.forecast(history, at).online

    def expected_online_seconds(self, history: DeviceHistory, at: float | None = None) -> float:
        """Expected remaining time of the current online stretch at ``at`` (0 if offline then)."""
        return self.forecast(history, at).expected_online_seconds

    def forecast(self, history: DeviceHistory, at: float | None = None) -> Forecast:
        """Everything about one device at ``at`` (default: the end of its history), from one pass."""
        at = history.end if at is None else float(at)
        online_now = history.state_at(at)
        if online_now is None:
            raise HistoryError(f"device {history.device_id!r}: no known state at {at:g} "
                               f"(history covers [{history.start:g}, {history.end:g}))")
        p = self.probabilities_from_features(feature_matrix(history, np.array([at]), self.features))[0]
        k = len(self.horizons)
        keys = [int(h) for h in self.horizons]
        # Online throughout [at, at + h) implies online at at + h, and a survival curve cannot rise: the
        # heads are fitted apart, so where they disagree the stay is cut to what the online head allows.
        stay = np.minimum.accumulate(np.minimum(p[k:], p[:k])) if online_now else np.zeros(k)
        return Forecast(at=at, online=dict(zip(keys, p[:k].tolist())), stay=dict(zip(keys, stay.tolist())),
                        expected_online_seconds=_area_under_survival(np.asarray(self.horizons), stay))

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``forecast.safetensors`` (weights, scaling, temperatures) and ``forecast.json`` (config)."""
        if self._net is None:
            raise NotFittedError("nothing to save: call fit() first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self._net.state_dict().items()}, str(directory / WEIGHTS_FILE))
        meta = {"format": FORMAT_VERSION, "config": self.config.to_json(), "feature_names": list(self.features.names)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AvailabilityForecast:
        """Read a model written by `save`; `ForecastError` if it is missing, damaged or of another version."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE))
            model = cls(ForecastConfig.from_json(meta["config"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ForecastError(f"cannot load a forecaster from {directory}: {e}") from e
        if meta.get("format") != FORMAT_VERSION or list(model.features.names) != meta.get("feature_names"):
            raise ForecastError(f"{directory}: saved by another version of the forecaster "
                                f"(format {meta.get('format')!r}); fit a new one")
        net = model._new_network()
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ForecastError(f"{directory}: weights do not match the configuration: {e}") from e
        net.eval()
        model._net = net
        return model


def target_weights(samples: Samples, mask: np.ndarray, horizons: tuple[float, ...], until: float,
                   half_life: float) -> np.ndarray:
    """Loss weight per sample and output (online heads, then stay heads): 0 where ``mask`` is false;
    else 1, or with a half-life ``0.5 ** (age / half_life)``, where age is how long before ``until``
    the target's time ``t + h`` lies. float32 ``[n, 2 * horizons]``."""
    weight = mask.astype(np.float64)
    if half_life > 0:
        target_time = samples.times[:, None] + np.tile(np.asarray(horizons, np.float64), 2)[None, :]
        weight *= 0.5 ** (np.maximum(until - target_time, 0.0) / half_life)
    return weight.astype(np.float32)


def _area_under_survival(horizons: np.ndarray, stay: np.ndarray) -> float:
    """Integral of a survival curve through 1 at 0 and ``stay`` at ``horizons``, linear in between; past
    the last horizon it decays exponentially at the rate of its last segment (for at most `MAX_TAIL`)."""
    if not stay.any():
        return 0.0
    h = np.concatenate([[0.0], horizons])
    s = np.clip(np.concatenate([[1.0], stay]), 1e-9, 1.0)
    area = float(np.sum((s[1:] + s[:-1]) / 2 * np.diff(h)))
    rate = math.log(s[-2] / s[-1]) / (h[-1] - h[-2])
    tail = MAX_TAIL if rate <= 0 else (1 - math.exp(-rate * MAX_TAIL)) / rate
    return area + float(s[-1]) * tail


TEMPERATURE_GRID = np.exp(np.linspace(math.log(0.25), math.log(4.0), 57))  # logit multipliers tried


def _fit_temperature(net: Network, samples: Samples, use: np.ndarray) -> np.ndarray:
    """Per output, the logit multiplier from `TEMPERATURE_GRID` with the least log loss on the selected
    targets; 1 where fewer than 100 targets or only one class are selected. A grid, not Newton's
    method: where the logits already separate the targets, a free fit runs off to infinity."""
    with torch.no_grad():
        z = net.logits(torch.as_tensor(samples.x)).double().numpy()
    targets = np.concatenate([samples.online, samples.stay], axis=1).astype(np.float64)
    scale = np.ones(z.shape[1])
    for k in range(z.shape[1]):
        ok = use[:, k] & ~np.isnan(targets[:, k])
        if ok.sum() < 100 or len(np.unique(targets[ok, k])) < 2:
            continue
        a = z[ok, k][None, :] * TEMPERATURE_GRID[:, None]
        loss = np.mean(np.logaddexp(0.0, a) - targets[ok, k][None, :] * a, axis=1)  # negative log-likelihood
        scale[k] = TEMPERATURE_GRID[int(np.argmin(loss))]
    return scale
