"""The forecaster's network: standardised features and clock tables into an ensemble of small MLPs.

The clock enters through tables: the local time of day of "now" and of every target in 15-minute
bins, and the day of the week of every target. Daily edges (scheduled shutdowns) are sharp, which a
table learns directly and smooth harmonics only with large weights; and the days of a week are
categories, not points on a circle: as harmonics, a weekday between two unusual days (the first days
of a trace, a weekend) inherits their behaviour. The day of the week of "now" is left out: with a
week or two of data it would, with the time of day, name one moment of the past for the network to
memorise, while what a forecast needs is the kind of day the target falls on.
"""

from __future__ import annotations

import torch
from torch import nn

from neuranet.forecast.features import FeatureConfig

TOD_BINS = 96  # 15-minute bins of the local time of day
DOW_BINS = 7


def clock_bins(value: torch.Tensor, bins_per_unit: float, bins: int) -> torch.Tensor:
    """Right-closed bins ``(k, k + 1]``: a time exactly on an edge belongs to the bin before it, as the
    state at that time is the one just before it (the tolerance absorbs float32 rounding)."""
    return torch.remainder(torch.ceil(value * bins_per_unit - 1e-3) - 1, bins).long()


class Member(nn.Module):
    """One network of the ensemble: clock tables and an MLP over the standardised features."""

    def __init__(self, inputs: int, horizons: int, outputs: int, hidden: int, depth: int, embed: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tod_table = nn.Embedding(TOD_BINS, embed)
        self.dow_table = nn.Embedding(DOW_BINS, embed)
        layers: list[nn.Module] = []
        width = inputs + embed * (1 + 2 * horizons)  # time of day now; time and day of each target
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = hidden
        layers.append(nn.Linear(width, outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, tod_bins: torch.Tensor, dow_bins: torch.Tensor) -> torch.Tensor:
        clock = [self.tod_table(tod_bins).flatten(1), self.dow_table(dow_bins).flatten(1)]
        return self.mlp(torch.cat([z, *clock], dim=1))


class Network(nn.Module):
    """Standardise, average the members' logits, calibrate by a temperature per output (``scale``).

    ``mean``/``std``/``scale`` are buffers, so the state dict (what is saved) holds everything.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor
    used: torch.Tensor

    def __init__(self, features: FeatureConfig, outputs: int, members: int, hidden: int, depth: int,
                 embed: int, dropout: float = 0.0) -> None:
        super().__init__()
        names = features.names
        self.register_buffer("mean", torch.zeros(features.width))
        self.register_buffer("std", torch.ones(features.width))
        self.register_buffer("scale", torch.ones(outputs))
        # Raw clock values go to the tables; the day of the week only as a category (see above).
        clock = [n.endswith(".tod_hours") or ".dow_" in n for n in names]
        self.register_buffer("used", ~torch.tensor(clock))
        targets = [f"h{int(h)}" for h in features.horizons]
        self._tod = [names.index(f"{p}.tod_hours") for p in ["now", *targets]]
        self._dow = [names.index(f"{p}.dow_days") for p in targets]
        self.members = nn.ModuleList(
            Member(features.width, len(targets), outputs, hidden, depth, embed, dropout) for _ in range(members))

    def set_scaling(self, x: torch.Tensor) -> None:
        """Standardise by these training rows. A feature that never varied in them gets std 0 and is
        zeroed from then on: its weights were never trained, so any value it later took would be noise."""
        std = x.std(dim=0)
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(torch.where(std > 1e-4, std, torch.zeros_like(std)))

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised features, time-of-day bins and day-of-week bins, as the members take them."""
        z = (x - self.mean) / self.std.clamp_min(1e-6)
        z = torch.where(self.used & (self.std > 0), z, torch.zeros_like(z))
        return z, clock_bins(x[:, self._tod], TOD_BINS / 24, TOD_BINS), clock_bins(x[:, self._dow], 1.0, DOW_BINS)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits: the members' mean."""
        z, tod, dow = self.inputs(x)
        return torch.stack([m(z, tod, dow) for m in self.members]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities."""
        return torch.sigmoid(self.logits(x) * self.scale)
