"""The forecaster's exception tree: bad traces, bad histories, unknown devices, unfitted models."""

from __future__ import annotations


class ForecastError(Exception):
    """Base of every error the forecasting package raises on purpose."""


class TraceError(ForecastError, ValueError):
    """A trace file cannot be read; ``line`` is the 1-based line of the offending row (None: the file)."""

    def __init__(self, message: str, line: int | None = None, source: str | None = None) -> None:
        where = f"{source or 'trace'}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.line = line
        self.source = source


class HistoryError(ForecastError, ValueError):
    """A device history is inconsistent (overlapping intervals, end before start) or does not cover a time."""


class UnknownDeviceError(ForecastError, KeyError):
    """A device id that the trace or the caller's histories do not contain."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown device"


class NotFittedError(ForecastError, RuntimeError):
    """A model was asked for forecasts before ``fit`` or ``load``."""
