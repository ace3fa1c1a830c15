"""Pipeline partitioning: which devices, in which order, run which contiguous layers.

``plan()`` is pure: profiles in, a :class:`Plan` out. The cost model, per
micro-batch of ``Workload.micro_batch`` samples:

* A stage's compute time is its layers' forward FLOPs, times
  ``1 + backward_factor`` when training, over the device's measured GFLOP/s.
* Sending a stage's output costs ``latency + bytes / bandwidth`` on the link from
  its device to the next one; in training the gradient of the same size comes
  back over the reverse link.
* Training ("throughput") pipelines micro-batches. Compute overlaps
  communication (a PeerLink sends from its own task) and links are full duplex,
  so each device's compute and each direction of each link is a separate
  resource, and a pipeline tick lasts as long as the busiest one: the
  bottleneck, ``max`` over stages of ``max(compute, send, gradients back)``. A
  step of M micro-batches on S stages takes ``(M + S - 1)`` ticks (the GPipe and
  1F1B fill/drain bubble), so for a given number of stages the planner minimises
  the bottleneck exactly, and an extra stage must pay for its bubble tick.
* Inference ("latency") runs one request through the chain: the sum of the
  stages' forward times and the link transfers between them.
* Memory is a hard limit per device. Training holds parameters, gradients and
  optimiser state (``(2 + optimizer_state_factor)`` x parameter bytes) plus the
  activations saved for backward of every micro-batch in flight: under 1F1B the
  stage with k stages from the end (itself included) holds ``min(M, k)``.
  Inference holds the parameters plus an input and an output buffer of the
  stage's largest activation. Input data on the first device and labels on the
  last are small and not modelled; neither are KV caches.

Search: dynamic programming over layer suffixes. With up to
``EXACT_DEVICE_LIMIT`` devices the state is (first layer, set of devices used,
first device), which tries every subset in every order, so the plan is optimal
for the model above (about 30 ms for 48 layers on 8 devices, 0.3 s on 10). With
more devices it is a heuristic, the better of: the exact search over the
``EXACT_DEVICE_LIMIT`` fastest devices, and, over all devices, the best
subsequence of each of a few orders (fastest first, slowest first, most memory
first, greedily along the fastest links), which the same DP finds exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuranet.pipeline.profiles import (
    OBJECTIVES, DeviceProfile, LayerProfile, Objective, Plan, PlanError, StagePlan, Workload, gib, layer_span,
)

EXACT_DEVICE_LIMIT = 10  # the exact search grows as 2**devices x devices**2

INF = float("inf")


class CostModel:
    """Predicted time and memory of any stage, link and split, for one planning request.

    Devices are referred to by their index in `devices`. Stage quantities are
    kept as (start, stop) matrices so that the search reads whole rows at once.
    """

    def __init__(
        self, layers: Sequence[LayerProfile], devices: Sequence[DeviceProfile], objective: Objective, workload: Workload,
    ) -> None:
        self.layers, self.devices, self.objective, self.workload = layers, devices, objective, workload
        self.training = objective == "throughput"
        self.n = n = len(layers)
        w = workload
        self.work = w.micro_batch * (1 + w.backward_factor if self.training else 1)
        self.boundary_bytes = np.array([x.activation_bytes for x in layers], float) * w.micro_batch
        flops = _prefix([x.flops for x in layers])
        weight_factor = 2 + w.optimizer_state_factor if self.training else 1
        self.flops = _span(flops)
        self.weights = _span(_prefix([x.param_bytes for x in layers])) * weight_factor
        if self.training:  # saved activations of one micro-batch
            self.stash = _span(_prefix([x.saved for x in layers])) * w.micro_batch
        else:  # an input and an output buffer of the largest activation
            self.stash = 2 * _range_max(self.boundary_bytes)
        self.impossible = np.tri(n + 1, dtype=bool)  # stop <= start: an empty stage
        self._compute: dict[tuple[int, int], np.ndarray] = {}
        self._links: dict[tuple[int, int], np.ndarray] = {}

    def in_flight(self, stages_to_end: int) -> int:
        return min(self.workload.micro_batches, stages_to_end) if self.training else 1

    def memory(self, start: int, stop: int, stages_to_end: int) -> float:
        return float(self.weights[start, stop] + self.in_flight(stages_to_end) * self.stash[start, stop])

    def compute_time(self, device: int, start: int, stop: int) -> float:
        return float(self.flops[start, stop]) * self.work / (self.devices[device].gflops * 1e9)

    def stage_costs(self, device: int, stages_to_end: int) -> np.ndarray:
        """Compute time of [i, j) on the device, inf where empty or out of memory."""
        key = (device, self.in_flight(stages_to_end))
        if key not in self._compute:
            d = self.devices[device]
            t = self.flops * (self.work / (d.gflops * 1e9))
            too_big = self.weights + key[1] * self.stash > d.free_bytes
            self._compute[key] = np.where(self.impossible | too_big, INF, t)
        return self._compute[key]

    def transfers(self, a: int, b: int, boundary: int) -> tuple[float, float] | None:
        """(activations a->b, gradients b->a) at a cut before layer `boundary`; None: no link."""
        nbytes = float(self.boundary_bytes[boundary - 1])
        out = self.devices[a].links.get(self.devices[b].id)
        back = self.devices[b].links.get(self.devices[a].id)
        if out is None or (self.training and back is None):
            return None
        return out.transfer_time(nbytes), back.transfer_time(nbytes) if self.training else 0.0

    def link_costs(self, a: int, b: int) -> np.ndarray:
        """Per cut position j (stage on a ends, stage on b starts): the link's share of the objective."""
        if (a, b) not in self._links:
            cost = np.full(self.n + 1, INF)
            for j in range(1, self.n):
                t = self.transfers(a, b, j)
                if t is not None:
                    cost[j] = max(t) if self.training else t[0]
            self._links[(a, b)] = cost
        return self._links[(a, b)]

    def combine(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.maximum(x, y) if self.training else x + y

    def step_time(self, value: float, stages: int) -> float:
        """From the bottleneck (training) or the chain's sum (inference) to the predicted step time."""
        return (self.workload.micro_batches + stages - 1) * value if self.training else value

    def predict(self, order: Sequence[int], ranges: Sequence[tuple[int, int]]) -> float:
        """Predicted step time of a split; inf if a stage does not fit or neighbours have no link."""
        terms = []
        for p, (d, (start, stop)) in enumerate(zip(order, ranges)):
            if self.memory(start, stop, len(order) - p) > self.devices[d].free_bytes:
                return INF
            terms.append(self.compute_time(d, start, stop))
            if p + 1 < len(order):
                link = self.transfers(d, order[p + 1], stop)
                if link is None:
                    return INF
                terms.extend(link if self.training else link[:1])
        return self.step_time(max(terms) if self.training else sum(terms), len(order))

    def explain(self, order: Sequence[int], ranges: Sequence[tuple[int, int]]) -> Plan:
        """The split as a Plan with per-stage times; PlanError says why it cannot run."""
        stages = [self._stage(order, p, start, stop) for p, (start, stop) in enumerate(ranges)]
        what, longest = max(self._resources(stages), key=lambda r: r[1])
        if not self.training:
            what = f"largest share: {what}"
        return Plan(self.objective, tuple(stages), self.predict(order, ranges), what, longest, self.workload)

    def _stage(self, order: Sequence[int], p: int, start: int, stop: int) -> StagePlan:
        device = self.devices[order[p]]
        need = self.memory(start, stop, len(order) - p)
        if need > device.free_bytes:
            raise PlanError(f"{_needs(self.layers, start, stop, need)} on {device.id} but it has {gib(device.free_bytes)} free")
        send, back = 0.0, 0.0
        if p + 1 < len(order):
            link = self.transfers(order[p], order[p + 1], stop)
            if link is None:
                raise PlanError(f"{device.id} and {self.devices[order[p + 1]].id} are neighbours but have no link between them")
            send, back = link
        compute = self.compute_time(order[p], start, stop)
        return StagePlan(device.id, start, stop, compute, send, back, int(need), device.free_bytes)

    def _resources(self, stages: list[StagePlan]) -> list[tuple[str, float]]:
        """Each stage's compute and each link direction in use, with its time per micro-batch."""
        out = []
        for s, nxt in zip(stages, [*stages[1:], None]):
            out.append((f"compute on {s.device}, {layer_span(self.layers, s.start, s.stop)}", s.compute_time))
            if nxt is not None:
                out.append((f"activations {s.device} -> {nxt.device} after layer {s.stop - 1}", s.send_time))
                if self.training:
                    out.append((f"gradients {nxt.device} -> {s.device} before layer {s.stop}", s.return_time))
        return out


def _needs(layers: Sequence[LayerProfile], start: int, stop: int, nbytes: float, at_least: bool = False) -> str:
    verb = "needs" if stop - start == 1 else "need"
    return f"{layer_span(layers, start, stop)} {verb} {'at least ' if at_least else ''}{gib(nbytes)}"


def _prefix(values: list[float]) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, float))])


def _span(prefix: np.ndarray) -> np.ndarray:
    """m[i, j] = total over layers [i, j) (meaningful for j > i)."""
    return prefix[None, :] - prefix[:, None]


def _range_max(values: np.ndarray) -> np.ndarray:
    n = len(values)
    m = np.zeros((n + 1, n + 1))
    for i in range(n):
        m[i, i + 1:] = np.maximum.accumulate(values[i:])
    return m


@dataclass(slots=True)
class _Suffix:
    """Best ways to run layers [i, n) starting with a stage on `device`, for every i."""

    device: int
    stages: int  # in the suffix, this one included
    value: np.ndarray  # objective before step_time(); inf where impossible
    stop: np.ndarray  # end of the first stage
    pick: np.ndarray  # index into `after` of the next stage's suffix, -1 at the end
    after: list[_Suffix]

    def chain(self, start: int = 0) -> list[tuple[int, int, int]]:
        """(device, start, stop) of each stage of the best way to run layers [start, n)."""
        out, s, i = [], self, start
        while s is not None:
            j = int(s.stop[i])
            out.append((s.device, i, j))
            k = int(s.pick[i])
            s, i = (s.after[k] if k >= 0 else None), j
        return out


def _extend(t: CostModel, device: int, after: list[_Suffix]) -> _Suffix:
    """Put `device` in front of the best of `after` (suffixes with the same stage count)."""
    stages = 1 + (after[0].stages if after else 0)
    compute = t.stage_costs(device, stages)
    if not after:
        stop = np.full(t.n + 1, t.n)
        return _Suffix(device, 1, compute[:, t.n].copy(), stop, np.full(t.n + 1, -1), after)
    best, pick = np.full(t.n + 1, INF), np.full(t.n + 1, -1)
    for k, nxt in enumerate(after):
        cand = t.combine(t.link_costs(device, nxt.device), nxt.value)
        better = cand < best
        best[better], pick[better] = cand[better], k
    total = t.combine(compute, best[None, :])
    stop = total.argmin(axis=1)
    value = total[np.arange(t.n + 1), stop]
    return _Suffix(device, stages, value, stop, pick[stop], after)


def _search_subsets(t: CostModel, pool: list[int] | None = None) -> list[_Suffix]:
    """Every (device set, first device) drawn from `pool` (default: all): exact over subsets and orders."""
    pool = list(range(len(t.devices))) if pool is None else pool
    table: dict[tuple[int, int], _Suffix] = {}
    for mask in range(1, 1 << len(pool)):  # a set's subsets come before it
        bits = [b for b in range(len(pool)) if mask >> b & 1]
        members = [pool[b] for b in bits]
        for b, d in zip(bits, members):
            rest = mask ^ (1 << b)
            after = [table[(rest, e)] for e in members if e != d and (rest, e) in table]
            if rest and not after:
                continue
            s = _extend(t, d, after)
            if np.isfinite(s.value).any():  # drop suffixes that can never work
                table[(mask, d)] = s
    return list(table.values())


def _search_order(t: CostModel, order: list[int]) -> list[_Suffix]:
    """Every subsequence of one device order: exact for that order."""
    table: dict[tuple[int, int], _Suffix] = {}
    for k in reversed(range(len(order))):
        for stages in range(1, len(order) - k + 1):
            after = [table[(m, stages - 1)] for m in range(k + 1, len(order)) if (m, stages - 1) in table]
            if stages > 1 and not after:
                break
            s = _extend(t, order[k], after)
            if np.isfinite(s.value).any():
                table[(k, stages)] = s
    return list(table.values())


def _fastest(t: CostModel) -> list[int]:
    return sorted(range(len(t.devices)), key=lambda d: -t.devices[d].gflops)


def _candidate_orders(t: CostModel) -> list[list[int]]:
    """Device orders worth trying when there are too many for every order."""
    ds, fastest = t.devices, _fastest(t)
    roomiest = sorted(range(len(ds)), key=lambda d: -ds[d].free_bytes)
    along_links = [fastest[0]]
    while len(along_links) < len(ds):  # next: the best link onward, ties to the faster device
        last = ds[along_links[-1]]
        rest = [d for d in fastest if d not in along_links]
        along_links.append(max(rest, key=lambda d: (getattr(last.links.get(ds[d].id), "bandwidth", 0.0), ds[d].gflops)))
    # slowest first too: under 1F1B the first stages hold the most micro-batches' activations
    return [fastest, fastest[::-1], roomiest, along_links]


def plan(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    objective: Objective = "throughput",
    workload: Workload | None = None,
    *,
    exact_limit: int = EXACT_DEVICE_LIMIT,
) -> Plan:
    """The fastest contiguous split of `layers` over a subset of `devices`, in pipeline order.

    "throughput" plans training (minimises step time via the bottleneck);
    "latency" plans inference (minimises one request's time). Raises
    PlanError when no split fits in the devices' memory.
    """
    workload = workload or Workload()
    _check(layers, devices, objective)
    t = CostModel(layers, devices, objective, workload)
    if len(devices) <= exact_limit:
        suffixes = _search_subsets(t)
    else:
        suffixes = _search_subsets(t, _fastest(t)[:exact_limit])
        suffixes += [s for order in _candidate_orders(t) for s in _search_order(t, order)]
    done = [s for s in suffixes if np.isfinite(s.value[0])]
    if not done:
        raise PlanError(_shortfall(t, suffixes))
    best = min(done, key=lambda s: (t.step_time(float(s.value[0]), s.stages), s.stages))
    chain = best.chain()
    return t.explain([d for d, _, _ in chain], [(i, j) for _, i, j in chain])


def evaluate(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    ranges: Sequence[tuple[int, int]],
    objective: Objective = "throughput",
    workload: Workload | None = None,
) -> Plan:
    """The predicted times of a given split (the planner's own or a baseline's).

    Raises PlanError when a stage does not fit in its device or two neighbours
    have no link.
    """
    workload = workload or Workload()
    _check(layers, devices, objective)
    bounds = [0, *(stop for _, stop in ranges)]
    if len(ranges) != len(devices) or [a for a, _ in ranges] != bounds[:-1] or bounds[-1] != len(layers) \
            or any(a >= b for a, b in ranges):
        raise ValueError(f"ranges {list(ranges)} must be non-empty, contiguous and cover layers 0-{len(layers) - 1}")
    return CostModel(layers, devices, objective, workload).explain(range(len(devices)), ranges)


def _check(layers: Sequence[LayerProfile], devices: Sequence[DeviceProfile], objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if not layers:
        raise ValueError("no layers to place")
    if not devices:
        raise PlanError("no devices to place the layers on")
    if len({d.id for d in devices}) != len(devices):
        raise ValueError("device ids must be unique")


def _shortfall(t: CostModel, suffixes: list[_Suffix]) -> str:
    """What is short, in the user's terms: one layer, the total, or what the best partial split leaves."""
    largest = max(t.devices, key=lambda d: d.free_bytes)
    for k in range(t.n):
        need = t.memory(k, k + 1, 1)
        if need > largest.free_bytes:
            return f"{_needs(t.layers, k, k + 1, need)} but the largest device ({largest.id}) has {gib(largest.free_bytes)} free"
    need, free = t.memory(0, t.n, 1), sum(d.free_bytes for d in t.devices)
    if need > free:
        return f"{_needs(t.layers, 0, t.n, need, at_least=True)} but the devices have {gib(free)} free in all"
    return _partial_fit(t, suffixes)


def _partial_fit(t: CostModel, suffixes: list[_Suffix]) -> str:
    """Enough memory in all, but not in contiguous pieces: the longest tail that fits, and what it leaves."""
    start, chain = t.n, []
    for s in suffixes:
        ok = np.flatnonzero(np.isfinite(s.value))
        if len(ok) and ok[0] < start:
            start, chain = int(ok[0]), s.chain(int(ok[0]))
    used = {d for d, _, _ in chain}
    left = [d for i, d in enumerate(t.devices) if i not in used]
    # a lower bound: however the head is split, each of its stages has all of `used` after it
    head = _needs(t.layers, 0, start, t.memory(0, start, len(used) + 1), at_least=True)
    hosts = ", ".join(t.devices[d].id for d, _, _ in chain)
    placed = f"at best {layer_span(t.layers, start, t.n)} fit on {hosts};" if chain else "not even the last layer fits;"
    room = f"the devices left have {gib(sum(d.free_bytes for d in left))} free in all" if left else "no device is left for it"
    unlinked = any(len(d.links) < len(t.devices) - 1 for d in t.devices)
    hint = " (some devices have no link to each other, which rules out some orders)" if unlinked else ""
    return f"no contiguous split fits in memory: {placed} {head}, but {room}{hint}"


MAX_FIXED_SPLITS = 20_000


def plan_fixed(
    layers: Sequence[LayerProfile],
    devices: Sequence[DeviceProfile],
    objective: Objective = "throughput",
    workload: Workload | None = None,
) -> Plan:
    """The best split that uses every device, in the given order (the user chose them).

    Searches every placement of the cuts, so it is exact but bounded: past
    MAX_FIXED_SPLITS candidate splits it raises PlanError and `plan` should choose.
    """
    n, k = len(layers), len(devices)
    if not 1 <= k <= n:
        raise PlanError(f"{k} devices cannot each take at least one of {n} layers")
    if math.comb(n - 1, k - 1) > MAX_FIXED_SPLITS:
        raise PlanError(f"{math.comb(n - 1, k - 1)} ways to split {n} layers over {k} devices are too many to "
                        "search; let the planner choose the devices")
    best: Plan | None = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        try:
            candidate = evaluate(layers, devices, list(zip(bounds, bounds[1:])), objective, workload)
        except PlanError:
            continue
        if best is None or candidate.step_time < best.step_time:
            best = candidate
    if best is None:
        raise PlanError(f"no split of the {n} layers over these {k} devices fits in their memory")
    return best
