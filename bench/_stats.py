"""Units, percentiles and number formatting shared by the benchmarks in bench/."""

from __future__ import annotations

import math
import statistics

KiB = 1024
MiB = 1024 * KiB
MB = 1e6  # throughput unit: 10**6 bytes


def size_name(n: int) -> str:
    """A message size as ``"4 KiB"`` or ``"16 MiB"``."""
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (integer 1-99), interpolated between samples; any order; NaN if empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def percentile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 100]); NaN if empty."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def fmt_ms(x: float) -> str:
    """Milliseconds to one decimal, or ``n/a`` for NaN."""
    return "n/a" if math.isnan(x) else f"{x:.1f} ms"
