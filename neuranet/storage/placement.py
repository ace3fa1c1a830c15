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


class _Pool:
    """Devices as arrays, for scoring sets of them and picking the best addition to a set quickly."""

    def __init__(self, devices: Sequence[DeviceView], weights: Sequence[float]) -> None:
        self.devices = list(devices)
        self.index = {d.device_id: i for i, d in enumerate(self.devices)}
        self.ids = [d.device_id for d in self.devices]
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()
        self.p = np.array([d.p_online for d in self.devices], dtype=np.float64).reshape(-1, len(w))

    def miss(self, members: Iterable[int]) -> np.ndarray:
        """P(none of the members is online) per horizon (independent devices; 1 for none)."""
        return np.prod(1.0 - self.p[list(members)], axis=0)

    def worth(self, members: Iterable[int]) -> float:
        """Predicted availability of a set: the weighted mean over the horizons of P(some member online)."""
        return float(np.dot(self.w, 1.0 - self.miss(members)))

    def best(self, miss: np.ndarray, allowed: np.ndarray, size: int, free: np.ndarray) -> int | None:
        """The allowed device with room that adds most predicted availability to a set that misses
        with ``miss`` (ties: more free space, then the larger id), or None."""
        rows = np.flatnonzero(allowed & (free >= size))
        if not len(rows):
            return None
        gain = np.round(self.p[rows] @ (self.w * miss), 9)
        top = rows[gain == gain.max()]
        top = top[free[top] == free[top].max()]
        return int(max(top, key=lambda n: self.ids[n]))


def availability(devices: Iterable[DeviceView], weights: Sequence[float] = DEFAULT_WEIGHTS) -> float:
    """Predicted availability of a chunk held by ``devices``: weighted mean of P(some holder online)."""
    pool = _Pool(list(devices), weights)
    return pool.worth(range(len(pool.devices)))


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
    pool = _Pool(devices, weights)
    held = [pool.index[h] for h in holders if h in pool.index]
    taken = set(holders) | set(exclude)
    allowed = np.array([d.device_id not in taken and (d.online or not online_only) for d in pool.devices], dtype=bool)
    free = dict(free or {})
    room = np.array([free.get(d.device_id, d.free_bytes) for d in pool.devices], dtype=np.int64)
    miss = pool.miss(held)
    chosen: list[str] = []
    while len(held) + len(chosen) < replicas:
        n = pool.best(miss, allowed, size, room)
        if n is None:
            break
        chosen.append(pool.ids[n])
        allowed[n] = False
        miss = miss * (1.0 - pool.p[n])
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
    plan = _Planner(devices, set(lost), weights, min_gain)
    urgent: list[tuple[tuple[int, float], ChunkState]] = []
    for c in chunks:
        alive = plan.alive(c)
        short = len(alive) < c.replicas
        score = plan.pool.worth(alive)
        if short or score < c.target:
            urgent.append(((0 if short else 1, score), c))
    urgent.sort(key=lambda item: item[0])
    moves: list[Move] = []
    spent = 0
    for _, c in urgent:
        if spent + c.size > budget_bytes:
            continue
        move = plan.repair(c) or plan.migrate(c)
        if move is not None:
            moves.append(move)
            spent += c.size
            plan.free[plan.pool.index[move.target]] -= c.size
    return moves


class _Planner:
    """One `plan_moves` call: the devices, who counts as gone, and the free space left."""

    def __init__(self, devices: Sequence[DeviceView], gone: set[str], weights: Sequence[float],
                 min_gain: float) -> None:
        self.pool = _Pool(devices, weights)
        self.gone, self.min_gain = gone, min_gain
        self.free = np.array([d.free_bytes for d in self.pool.devices], dtype=np.int64)
        self.candidates = np.array([d.online and d.device_id not in gone for d in self.pool.devices], dtype=bool)

    def alive(self, c: ChunkState) -> list[int]:
        """Pool rows of the chunk's holders that are known and not gone."""
        return [self.pool.index[h] for h in c.holders if h in self.pool.index and h not in self.gone]

    def _source(self, alive: list[int]) -> int | None:
        """The online holder to copy from: the one least needed (most likely online anyway, any will do)."""
        online = [n for n in alive if self.pool.devices[n].online]
        return max(online, key=lambda n: (self.pool.p[n, 0], self.pool.ids[n])) if online else None

    def _target(self, c: ChunkState, alive: list[int]) -> int | None:
        allowed = self.candidates.copy()
        allowed[[self.pool.index[h] for h in c.holders if h in self.pool.index]] = False
        return self.pool.best(self.pool.miss(alive), allowed, c.size, self.free)

    def _move(self, c: ChunkState, source: int, target: int, drop: str | None, reason: str) -> Move:
        ids = self.pool.ids
        return Move(c.chunk, c.size, ids[source], ids[target], drop=drop, reason=reason)

    def repair(self, c: ChunkState) -> Move | None:
        alive = self.alive(c)
        if len(alive) >= c.replicas:
            return None
        source = self._source(alive)
        target = self._target(c, alive) if source is not None else None
        if source is None or target is None:
            return None
        living = {self.pool.ids[n] for n in alive}
        dead = [h for h in c.holders if h not in living]
        return self._move(c, source, target, dead[0] if dead else None, "repair")

    def migrate(self, c: ChunkState) -> Move | None:
        alive = self.alive(c)
        source = self._source(alive)
        target = self._target(c, alive) if source is not None else None
        if source is None or target is None:
            return None
        worth = self.pool.worth
        before = worth(alive)
        grown = [*alive, target]
        if len(grown) <= c.replicas:
            drop = None
            after = worth(grown)
        else:  # drop the holder whose loss costs least once the copy is in
            left = {n: worth([g for g in grown if g != n]) for n in alive}
            dropped = max(alive, key=lambda n: (left[n], self.pool.ids[n]))
            drop, after = self.pool.ids[dropped], left[dropped]
        if after < before + self.min_gain:
            return None
        return self._move(c, source, target, drop, "migrate")
