"""Scores of probabilistic forecasts of a binary outcome: Brier score, log loss, calibration error."""

from __future__ import annotations

import numpy as np

LOG_LOSS_EPS = 1e-4  # probabilities are clipped to [eps, 1 - eps], so a certain miss costs ~9.2 nats, not infinity


def _check(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(p, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if p.shape != y.shape or not len(p):
        raise ValueError(f"need as many probabilities as outcomes (at least one), got {p.shape} and {y.shape}")
    return p, y


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference between probability and outcome (0 best, 0.25 for a constant 0.5)."""
    p, y = _check(p, y)
    return float(np.mean((p - y) ** 2))


def log_loss(p: np.ndarray, y: np.ndarray, eps: float = LOG_LOSS_EPS) -> float:
    """Mean negative log-likelihood in nats, probabilities clipped to ``[eps, 1 - eps]``."""
    p, y = _check(p, y)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: over ``bins`` equal-width probability bins, the sample-weighted
    mean of |mean probability - observed frequency|. Probability 1.0 falls in the last bin."""
    p, y = _check(p, y)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / count.sum())
