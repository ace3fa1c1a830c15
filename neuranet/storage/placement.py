"""Which devices hold a chunk's replicas: predicted availability, free quota and spread.

Pure functions over `DeviceView`s (what the coordinator knows of each device now: online or not,
its forecast P(online) at the forecaster's horizons, its free quota). A set of replicas is worth
its *predicted availability*: the weighted mean over the horizons of P(at least one holder is
online), holders taken as independent. That single number gives all three goals at once: reliable
devices add most; a device that sleeps at the same hours as the chunk's other holders adds little
(spread); a full device cannot be chosen at all (quota).

- `place`: the devices a new chunk (or a chunk short of replicas) should go to; greedy on the gain
  in predicted availability, which is submodular, so greedy is within (1 - 1/e) of the best set.
- `plan_moves`: repair and migration for the chunks already stored, at most a byte budget of them
  per call: repair first (a holder lost, or fewer holders than wanted), then the chunks whose
  predicted availability is below their target, most at risk first. A migration copies the chunk
  from an online holder to a better device and drops the holder that is worth least once the copy
  is in, and only when that raises predicted availability by a clear margin: replicas on devices
  that will come back are kept, and nothing moves back and forth on noise.

The caller carries the moves out (copy, confirm, then delete) and calls again later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Horizons of the forecaster: 15 min, 1 h, 6 h, 24 h. Predicted availability is the expected share of
# the next day during which the chunk can be read, each forecast standing for the stretch of the day
# nearest to it: [0, 30 min), [30 min, 3.5 h), [3.5 h, 15 h), [15 h, 24 h).
DEFAULT_WEIGHTS: tuple[float, ...] = (0.5 / 24, 3.0 / 24, 11.5 / 24, 9.0 / 24)
MIN_GAIN = 0.02  # a migration must raise predicted availability by at least this much


class PlacementError(ValueError):
    """A chunk cannot be placed: no device may take it (all full, offline or excluded)."""


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as placement sees it."""

    device_id: str
    online: bool
    p_online: tuple[float, ...]  # P(online at now + h), one per horizon (the weights' order)
    free_bytes: int

    def __post_init__(self) -> None:
        if any(not 0.0 <= p <= 1.0 for p in self.p_online):
            raise ValueError(f"{self.device_id}: probabilities must be in [0, 1], got {self.p_online}")


@dataclass(frozen=True, slots=True)
class ChunkState:
    """A stored chunk: its size, who holds it, how many replicas it should have and the predicted
    availability it should keep."""

    chunk: str
    size: int
    holders: tuple[str, ...]
    replicas: int = 3
    target: float = 0.95


@dataclass(frozen=True, slots=True)
class Move:
    """Copy ``chunk`` from ``source`` to ``target``; once the copy is confirmed, delete it on ``drop``."""

    chunk: str
    size: int
    source: str
    target: str
    drop: str | None = None
    reason: str = "migrate"  # "repair" or "migrate"


def miss_probabilities(devices: Iterable[DeviceView]) -> np.ndarray:
    """P(no device of the set is online) at each horizon (independent devices); 1 for an empty set."""
    out: np.ndarray | None = None
    for d in devices:
        miss = 1.0 - np.asarray(d.p_online, dtype=np.float64)
        out = miss if out is None else out * miss
    return np.ones(len(DEFAULT_WEIGHTS)) if out is None else out


def availability(devices: Iterable[DeviceView], weights: Sequence[float] = DEFAULT_WEIGHTS) -> float:
    """Predicted availability of a chunk held by ``devices``: weighted mean of P(some holder online)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(np.dot(w, 1.0 - miss_probabilities(devices)) / w.sum())


def _best_addition(miss: np.ndarray, candidates: Iterable[DeviceView], size: int, free: Mapping[str, int],
                   weights: np.ndarray) -> DeviceView | None:
    """The candidate that adds most predicted availability (ties: more free space), or None."""
    best, best_key = None, None
    for d in candidates:
        if free.get(d.device_id, d.free_bytes) < size:
            continue
        gain = float(np.dot(weights, miss * np.asarray(d.p_online)))
        key = (round(gain, 9), free.get(d.device_id, d.free_bytes), d.device_id)
        if best_key is None or key > best_key:
            best, best_key = d, key
    return best


def place(size: int, replicas: int, devices: Sequence[DeviceView], holders: Iterable[str] = (),
          exclude: Iterable[str] = (), weights: Sequence[float] = DEFAULT_WEIGHTS,
          online_only: bool = True, free: Mapping[str, int] | None = None) -> list[str]:
    """Devices to add so that a chunk of ``size`` bytes has ``replicas`` holders (greedy, best first).

    ``holders`` already have it; ``exclude`` may not get it. With ``online_only`` (what a real
    upload needs) only online devices are chosen. Returns fewer devices than asked when no more
    can take it; raises `PlacementError` when none can and some were needed.
    """
    if size < 0 or replicas < 1:
        raise ValueError(f"size must be >= 0 and replicas >= 1, got {size}, {replicas}")
    by_id = {d.device_id: d for d in devices}
    held = [by_id[h] for h in holders if h in by_id]
    taken = set(holders) | set(exclude)
    pool = [d for d in devices if d.device_id not in taken and (d.online or not online_only)]
    free = dict(free or {})
    w = np.asarray(weights, dtype=np.float64)
    miss = miss_probabilities(held)
    chosen: list[str] = []
    while len(held) + len(chosen) < replicas:
        d = _best_addition(miss, pool, size, free, w)
        if d is None:
            break
        chosen.append(d.device_id)
        pool = [p for p in pool if p.device_id != d.device_id]
        miss = miss * (1.0 - np.asarray(d.p_online))
    if not chosen and len(held) < replicas:
        raise PlacementError(_why_not(size, devices, taken, online_only, free))
    return chosen


def _why_not(size: int, devices: Sequence[DeviceView], taken: set[str], online_only: bool,
             free: Mapping[str, int]) -> str:
    others = [d for d in devices if d.device_id not in taken]
    if not others:
        return "no device to store it on (every device already holds it or is excluded)"
    online = [d for d in others if d.online or not online_only]
    if not online:
        return f"no device is online to store it on ({len(others)} offline)"
    most = max(free.get(d.device_id, d.free_bytes) for d in online)
    return (f"storage quota full: a chunk of {size} bytes does not fit on any online device "
            f"(the most free space left is {most} bytes)")


def plan_moves(chunks: Iterable[ChunkState], devices: Sequence[DeviceView], budget_bytes: int,
               lost: Iterable[str] = (), weights: Sequence[float] = DEFAULT_WEIGHTS,
               min_gain: float = MIN_GAIN) -> list[Move]:
    """Repairs and migrations worth doing now, most urgent first, within ``budget_bytes`` of copies.

    ``lost`` devices count as gone (departed, or offline past the repair deadline): their replicas
    are replaced and then dropped. Copies go from an online holder to an online device with room.
    """
    by_id = {d.device_id: d for d in devices}
    gone = set(lost)
    w = np.asarray(weights, dtype=np.float64)
    free = {d.device_id: d.free_bytes for d in devices}
    candidates = [d for d in devices if d.online and d.device_id not in gone]
    urgent: list[tuple[tuple[int, float], ChunkState]] = []
    for c in chunks:
        alive = [by_id[h] for h in c.holders if h in by_id and h not in gone]
        short = len(alive) < c.replicas
        score = availability(alive, w)
        if short or score < c.target:
            urgent.append(((0 if short else 1, score), c))
    urgent.sort(key=lambda item: item[0])
    moves: list[Move] = []
    spent = 0
    for _, c in urgent:
        if spent + c.size > budget_bytes:
            continue
        move = _repair(c, by_id, gone, candidates, free, w) or _migrate(c, by_id, gone, candidates, free, w, min_gain)
        if move is not None:
            moves.append(move)
            spent += c.size
            free[move.target] = free.get(move.target, 0) - c.size
    return moves


def _source(c: ChunkState, by_id: Mapping[str, DeviceView], gone: set[str]) -> DeviceView | None:
    """The online holder to copy from: the one least needed (most likely online anyway, any will do)."""
    online = [by_id[h] for h in c.holders if h in by_id and h not in gone and by_id[h].online]
    return max(online, key=lambda d: (d.p_online[0], d.device_id)) if online else None


def _repair(c: ChunkState, by_id: Mapping[str, DeviceView], gone: set[str], candidates: Sequence[DeviceView],
            free: dict[str, int], w: np.ndarray) -> Move | None:
    alive = [by_id[h] for h in c.holders if h in by_id and h not in gone]
    if len(alive) >= c.replicas:
        return None
    source = _source(c, by_id, gone)
    if source is None:
        return None
    pool = [d for d in candidates if d.device_id not in c.holders]
    target = _best_addition(miss_probabilities(alive), pool, c.size, free, w)
    if target is None:
        return None
    dead = [h for h in c.holders if h not in {a.device_id for a in alive}]
    return Move(c.chunk, c.size, source.device_id, target.device_id, drop=dead[0] if dead else None, reason="repair")


def _migrate(c: ChunkState, by_id: Mapping[str, DeviceView], gone: set[str], candidates: Sequence[DeviceView],
             free: dict[str, int], w: np.ndarray, min_gain: float) -> Move | None:
    holders = [by_id[h] for h in c.holders if h in by_id and h not in gone]
    source = _source(c, by_id, gone)
    if source is None:
        return None
    before = availability(holders, w)
    pool = [d for d in candidates if d.device_id not in c.holders]
    target = _best_addition(miss_probabilities(holders), pool, c.size, free, w)
    if target is None:
        return None
    grown = [*holders, target]
    if len(grown) <= c.replicas:
        drop = None
        after = availability(grown, w)
    else:  # drop the holder whose loss costs least once the copy is in
        drop_dev = max(holders, key=lambda d: (availability([g for g in grown if g is not d], w), d.device_id))
        drop = drop_dev.device_id
        after = availability([g for g in grown if g is not drop_dev], w)
    if after < before + min_gain:
        return None
    return Move(c.chunk, c.size, source.device_id, target.device_id, drop=drop)
