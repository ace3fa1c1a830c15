"""Device availability histories: parse a trace CSV, ask a device's state at a time, sample a timeline.

A history is a device's known states as sorted, non-overlapping half-open intervals ``[start, end)``;
time between intervals is unknown. The state *at* ``t`` is the state just before ``t`` (the interval
with ``start < t <= end``), i.e. what an observer at ``t`` has already seen: every feature computed at
``t`` then depends on ``(-inf, t]`` only. Times are seconds on any clock (trace seconds, Unix time).

The trace format is the SETI@home availability trace's (``shared/data/README.md``)::

    client_id,event_type,event_start,event_end
    108,0,0,20094        # 1 = online, 0 = offline; seconds from the start of the trace
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuranet.forecast.errors import HistoryError, TraceError, UnknownDeviceError

TRACE_COLUMNS = ("client_id", "event_type", "event_start", "event_end")
DAY = 86_400.0
HOUR = 3_600.0


@dataclass(frozen=True, slots=True)
class Interval:
    """One stretch of known state, ``[start, end)`` in seconds."""

    start: float
    end: float
    online: bool


class DeviceHistory:
    """A device's known online/offline intervals, with fast vectorised queries.

    Touching intervals in the same state are merged and empty ones dropped, so every boundary
    between two adjacent intervals is a state change.
    """

    __slots__ = ("device_id", "_starts", "_ends", "_online", "_knots", "_cum_known", "_cum_online", "_changes")

    def __init__(self, device_id: str, intervals: Iterable[Interval]) -> None:
        self.device_id = device_id
        given = list(intervals)
        for iv in given:
            if not (math.isfinite(iv.start) and math.isfinite(iv.end)) or iv.end < iv.start:
                raise HistoryError(f"device {device_id!r}: an interval needs finite times and end >= start, got {iv}")
        merged: list[list[float]] = []  # [start, end, online]
        for iv in sorted((iv for iv in given if iv.end > iv.start), key=lambda iv: (iv.start, iv.end)):
            if merged and iv.start < merged[-1][1]:
                raise HistoryError(f"device {device_id!r}: interval [{iv.start:g}, {iv.end:g}) overlaps "
                                   f"[{merged[-1][0]:g}, {merged[-1][1]:g})")
            if merged and iv.start == merged[-1][1] and bool(merged[-1][2]) == iv.online:
                merged[-1][1] = iv.end
            else:
                merged.append([iv.start, iv.end, float(iv.online)])
        table = np.array(merged, dtype=np.float64).reshape(-1, 3)
        self._starts, self._ends = table[:, 0].copy(), table[:, 1].copy()
        self._online = table[:, 2] > 0.5
        # Cumulative known / online seconds are piecewise linear in time: knots at every boundary.
        lengths = self._ends - self._starts
        known_before = np.concatenate([[0.0], np.cumsum(lengths)])
        online_before = np.concatenate([[0.0], np.cumsum(lengths * self._online)])
        x = np.stack([self._starts, self._ends], axis=1).ravel()
        keep = np.concatenate([[True], np.diff(x) > 0]) if len(x) else np.zeros(0, dtype=bool)
        self._knots = x[keep]
        self._cum_known = np.stack([known_before[:-1], known_before[1:]], axis=1).ravel()[keep]
        self._cum_online = np.stack([online_before[:-1], online_before[1:]], axis=1).ravel()[keep]
        touching = self._starts[1:] == self._ends[:-1]
        self._changes = self._starts[1:][touching]

    @classmethod
    def from_online_intervals(cls, device_id: str, online: Iterable[tuple[float, float | None]],
                              start: float, end: float) -> DeviceHistory:
        """A history from the online stretches alone (as the server records presence).

        Time in ``[start, end)`` outside every online stretch is offline; a stretch with no end
        (still online) lasts until ``end``; stretches are clipped to ``[start, end)``.
        """
        if end < start:
            raise HistoryError(f"device {device_id!r}: end {end:g} is before start {start:g}")
        stretches = [(s, end if e is None else e) for s, e in online]
        for s, e in stretches:
            if e < s:
                raise HistoryError(f"device {device_id!r}: online stretch ends ({e:g}) before it starts ({s:g})")
        intervals: list[Interval] = []
        cursor = start
        for s, e in sorted((max(s, start), min(e, end)) for s, e in stretches):
            if e <= s:  # outside [start, end)
                continue
            if s < cursor:
                raise HistoryError(f"device {device_id!r}: online stretch starting at {s:g} overlaps the one "
                                   f"ending at {cursor:g}")
            intervals += [Interval(cursor, s, False), Interval(s, e, True)]
            cursor = e
        intervals.append(Interval(cursor, end, False))
        return cls(device_id, intervals)

    # -- shape -------------------------------------------------------------------------------

    @property
    def start(self) -> float:
        """Start of the first known interval (NaN for an empty history)."""
        return float(self._starts[0]) if len(self._starts) else math.nan

    @property
    def end(self) -> float:
        """End of the last known interval (NaN for an empty history)."""
        return float(self._ends[-1]) if len(self._ends) else math.nan

    @property
    def intervals(self) -> tuple[Interval, ...]:
        return tuple(Interval(float(s), float(e), bool(o)) for s, e, o in zip(self._starts, self._ends, self._online))

    @property
    def online_stretches(self) -> tuple[tuple[float, float], ...]:
        """The ``(start, end)`` of every online stretch: what the server stores as presence intervals."""
        return tuple((float(s), float(e)) for s, e, o in zip(self._starts, self._ends, self._online) if o)

    @property
    def change_times(self) -> np.ndarray:
        """Times at which the state is known to have changed, ascending."""
        return self._changes

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"DeviceHistory({self.device_id!r}, {len(self)} intervals, [{self.start:g}, {self.end:g}))"

    def clipped(self, start: float = -math.inf, end: float = math.inf) -> DeviceHistory:
        """The part of this history inside ``[start, end)``: a late-joining device, or the past before ``end``."""
        ivs = [Interval(max(s, start), min(e, end), o) for s, e, o in zip(self._starts, self._ends, self._online)]
        return DeviceHistory(self.device_id, [iv for iv in ivs if iv.end > iv.start])

    # -- queries (vectorised over times) ------------------------------------------------------

    def states_at(self, times: np.ndarray | Sequence[float]) -> np.ndarray:
        """State just before each time: 1.0 online, 0.0 offline, NaN unknown."""
        t = np.asarray(times, dtype=np.float64)
        i = np.searchsorted(self._ends, t, side="left")
        inside = i < len(self._ends)
        i_ok = np.minimum(i, max(len(self._ends) - 1, 0))
        known = inside & (self._starts[i_ok] < t) if len(self._ends) else np.zeros(t.shape, dtype=bool)
        out = np.full(t.shape, np.nan)
        if len(self._ends):
            out[known] = self._online[i_ok[known]]
        return out

    def state_at(self, t: float) -> bool | None:
        """Whether the device was online just before ``t``; None where unknown."""
        s = float(self.states_at([t])[0])
        return None if math.isnan(s) else s > 0.5

    def run_starts_at(self, times: np.ndarray) -> np.ndarray:
        """Start of the known stretch of constant state that contains each time (NaN where unknown)."""
        t = np.asarray(times, dtype=np.float64)
        out = np.full(t.shape, np.nan)
        if not len(self._ends):
            return out
        i = np.minimum(np.searchsorted(self._ends, t, side="left"), len(self._ends) - 1)
        known = (self._starts[i] < t) & (t <= self._ends[i])
        out[known] = self._starts[i[known]]
        return out

    def known_seconds(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Seconds of known state in ``[a, b)`` (elementwise)."""
        return self._cum(self._cum_known, b) - self._cum(self._cum_known, a)

    def online_seconds(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Seconds online in ``[a, b)`` (elementwise)."""
        return self._cum(self._cum_online, b) - self._cum(self._cum_online, a)

    def changes_between(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """Number of state changes in ``[a, b)`` (elementwise). A change exactly at ``b`` is not counted:
        the state at ``b`` is the one before it, so an observer at ``b`` has not seen it yet."""
        return (np.searchsorted(self._changes, b, side="left")
                - np.searchsorted(self._changes, a, side="left")).astype(np.float64)

    def _cum(self, values: np.ndarray, x: np.ndarray | float) -> np.ndarray:
        if not len(self._knots):
            return np.zeros(np.shape(x))
        return np.interp(np.asarray(x, dtype=np.float64), self._knots, values)

    def timeline(self, start: float, end: float, step: float = 300.0) -> np.ndarray:
        """Online fraction of each ``step``-second bin from ``start`` to ``end``; NaN where nothing is known."""
        if step <= 0 or end < start:
            raise ValueError("timeline needs step > 0 and end >= start")
        edges = start + step * np.arange(int(math.ceil((end - start) / step)) + 1)
        edges[-1] = max(edges[-1], end) if len(edges) > 1 else edges[-1]
        known = np.diff(self._cum(self._cum_known, edges))
        online = np.diff(self._cum(self._cum_online, edges))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(known > 0, online / np.where(known > 0, known, 1.0), np.nan)


class Trace(Mapping[str, DeviceHistory]):
    """Histories of many devices by id; looking up an id it lacks raises `UnknownDeviceError`."""

    def __init__(self, histories: Mapping[str, DeviceHistory] | Iterable[DeviceHistory]) -> None:
        items = histories.values() if isinstance(histories, Mapping) else histories
        self._by_id = {h.device_id: h for h in items}

    def __getitem__(self, device_id: str) -> DeviceHistory:
        try:
            return self._by_id[device_id]
        except KeyError:
            raise UnknownDeviceError(f"unknown device {device_id!r} (the trace has {len(self)} devices)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def start(self) -> float:
        return min(h.start for h in self.values())

    @property
    def end(self) -> float:
        return max(h.end for h in self.values())


def recording_gaps(histories: Iterable[DeviceHistory], longer_than: float = DAY) -> list[tuple[float, float]]:
    """Stretches longer than ``longer_than`` in which no device of a trace changes state: on a trace
    recorded from many hosts, the gaps in the recording that hold the last state. (On the SETI trace
    hosts change only at a few shared moments a day, and every day has a 16-hour stretch without a
    change, so shorter ones are its normal calendar.)"""
    changes = np.unique(np.concatenate([h.change_times for h in histories] or [np.zeros(0)]))
    return [(float(a), float(b)) for a, b in itertools.pairwise(changes) if b - a > longer_than]


def read_trace(path: str | Path) -> Trace:
    """Parse a trace CSV file (see the module docstring); raises `TraceError` naming file and line."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            return parse_trace(f, source=str(path))
    except OSError as e:
        raise TraceError(f"cannot read: {e.strerror or e}", source=str(path)) from e


def parse_trace(lines: Iterable[str] | str, source: str = "trace") -> Trace:
    """Parse trace CSV text (a string or lines) into per-device histories.

    Raises `TraceError` with the 1-based line number for a missing or wrong header, a row with the
    wrong number of fields, a non-numeric or non-finite time, an event type other than 0/1, an event
    that ends before it starts, or two events of one device that overlap.
    """
    reader = csv.reader(io.StringIO(lines) if isinstance(lines, str) else lines)
    header = next(reader, None)
    if header is None or tuple(c.strip() for c in header) != TRACE_COLUMNS:
        raise TraceError(f"header must be {','.join(TRACE_COLUMNS)}, got {','.join(header or []) or 'nothing'}",
                         line=1, source=source)
    rows: dict[str, list[tuple[Interval, int]]] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        device, interval = _parse_row(row, line, source)
        rows.setdefault(device, []).append((interval, line))
    return Trace(_history(device, events, source) for device, events in rows.items())


def _parse_row(row: list[str], line: int, source: str) -> tuple[str, Interval]:
    if len(row) != len(TRACE_COLUMNS):
        raise TraceError(f"expected {len(TRACE_COLUMNS)} fields ({','.join(TRACE_COLUMNS)}), got {len(row)}",
                         line=line, source=source)
    device, kind, start_text, end_text = (c.strip() for c in row)
    if not device:
        raise TraceError("empty client_id", line=line, source=source)
    if kind not in ("0", "1"):
        raise TraceError(f"event_type must be 0 (offline) or 1 (online), got {kind!r}", line=line, source=source)
    try:
        start, end = float(start_text), float(end_text)
    except ValueError:
        raise TraceError(f"event_start and event_end must be numbers, got {start_text!r}, {end_text!r}",
                         line=line, source=source) from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise TraceError("event_start and event_end must be finite", line=line, source=source)
    if end < start:
        raise TraceError(f"event ends ({end:g}) before it starts ({start:g})", line=line, source=source)
    return device, Interval(start, end, kind == "1")


def _history(device: str, events: list[tuple[Interval, int]], source: str) -> DeviceHistory:
    # Empty events carry no state; dropping them first keeps a zero-length marker from "overlapping".
    events = sorted(((iv, line) for iv, line in events if iv.end > iv.start), key=lambda e: (e[0].start, e[0].end))
    for (prev, prev_line), (cur, line) in zip(events, events[1:]):
        if cur.start < prev.end:
            raise TraceError(f"client {device}: event [{cur.start:g}, {cur.end:g}) overlaps "
                             f"[{prev.start:g}, {prev.end:g}) on line {prev_line}", line=line, source=source)
    return DeviceHistory(device, (iv for iv, _ in events))
