"""Pipeline schedules: the order in which each stage runs forward and backward passes.

A schedule is pure data: for each of S stages, the ordered list of
:class:`Op`\\ s it performs in one training step of M micro-batches. The stage
runtime (:mod:`neuranet.pipeline.stage`) follows it; :func:`simulate` executes
it on an idealised pipeline (fixed op costs, bounded FIFO links between
neighbours, free transfers) to check that it cannot deadlock and to measure its
bubble.

* GPipe: every forward, then every backward. Simple; holds the activations of
  all M micro-batches at once.
* 1F1B: stage s warms up with ``S - s - 1`` forwards, then alternates one
  forward and one backward, then drains. Same bubble as GPipe, but stage s holds
  at most ``S - s`` micro-batches' activations.

Backwards run in micro-batch order on every stage, so gradients arrive on each
link in the order they are sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

OpKind = Literal["F", "B"]


@dataclass(frozen=True, slots=True)
class Op:
    """One pass of one micro-batch through one stage: ``F`` forward, ``B`` backward."""

    kind: OpKind
    mb: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}"


StageOps = list[Op]


class UnknownSchedule(ValueError):
    """A schedule name that is not one of :data:`SCHEDULES`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown pipeline schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES))}")
        self.name = name


class ScheduleDeadlock(RuntimeError):
    """Simulated stages all wait on each other; carries each stage's next op."""

    def __init__(self, waiting: dict[int, Op | None]) -> None:
        super().__init__(f"schedule deadlocks; stages wait at {waiting}")
        self.waiting = waiting


def _check(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got S={num_stages}, M={num_microbatches}")


def gpipe(num_stages: int, num_microbatches: int) -> list[StageOps]:
    """GPipe: all M forwards, then all M backwards, on every stage."""
    _check(num_stages, num_microbatches)
    ops = [Op("F", i) for i in range(num_microbatches)] + [Op("B", i) for i in range(num_microbatches)]
    return [list(ops) for _ in range(num_stages)]


def one_f_one_b(num_stages: int, num_microbatches: int) -> list[StageOps]:
    """1F1B (PipeDream-Flush): warm-up forwards, alternate F/B, drain the backwards."""
    _check(num_stages, num_microbatches)
    stages = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        ops = [Op("F", i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            ops += [Op("F", warmup + i), Op("B", i)]
        ops += [Op("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
        stages.append(ops)
    return stages


SCHEDULES: dict[str, Callable[[int, int], list[StageOps]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
# The optimisers a stage trains with (``stage.OPTIMIZERS``), named here without torch so the coordinator
# can refuse a request before any agent sees it.
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "sgd")


def schedule(name: str, num_stages: int, num_microbatches: int) -> list[StageOps]:
    """The per-stage op lists of the schedule called ``name`` (``"gpipe"`` or ``"1f1b"``)."""
    try:
        build = SCHEDULES[name.lower()]
    except (KeyError, AttributeError):
        raise UnknownSchedule(name) from None
    return build(num_stages, num_microbatches)


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Theoretical idle fraction of a GPipe/1F1B step with uniform stages: (K-1)/(M+K-1)."""
    _check(num_stages, num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def peak_in_flight(ops: Sequence[Op]) -> int:
    """Most micro-batches whose forward has run but whose backward has not, at any point."""
    live = peak = 0
    for op in ops:
        live += 1 if op.kind == "F" else -1
        peak = max(peak, live)
    return peak


# --- simulation -------------------------------------------------------------------


@dataclass(slots=True)
class Simulation:
    """The outcome of :func:`simulate`: when the step ended and when each stage was busy."""

    makespan: float
    busy: list[list[tuple[float, float, Op]]]  # per stage: (start, end, op)

    @property
    def bubble(self) -> float:
        """Fraction of stage-time spent idle (waiting for inputs, room on a link, or the end)."""
        work = sum(end - start for stage in self.busy for start, end, _ in stage)
        return 1.0 - work / (len(self.busy) * self.makespan) if self.makespan else 0.0


@dataclass(slots=True)
class _Stage:
    ops: Sequence[Op]
    pc: int = 0
    free_at: float = 0.0
    outbox: tuple[deque[int], int] | None = None  # (link, mb) waiting for room on the link
    busy: list[tuple[float, float, Op]] = field(default_factory=list)


def simulate(stages: Sequence[Sequence[Op]], forward: float = 1.0, backward: float = 2.0,
             link_capacity: int = 1) -> Simulation:
    """Run per-stage op lists on an idealised pipeline; raise :class:`ScheduleDeadlock` if it sticks.

    Each op takes ``forward`` or ``backward`` time units. A forward on stage s>0
    waits for an activation from s-1; a backward on stage s<S-1 waits for a
    gradient from s+1. Each direction of each link is a FIFO holding at most
    ``link_capacity`` messages: a stage that finished an op blocks until its
    output fits (a blocking send). Messages must arrive in the order the
    receiving stage asks for them, else the schedule is rejected.
    """
    if link_capacity < 1:
        raise ValueError(f"link_capacity must be at least 1, got {link_capacity}")
    n = len(stages)
    acts = [deque[int]() for _ in range(n)]  # acts[s]: activations waiting for stage s
    grads = [deque[int]() for _ in range(n)]  # grads[s]: gradients waiting for stage s
    st = [_Stage(ops) for ops in stages]
    now = 0.0
    while True:
        progressed = True
        while progressed:  # everything that can happen at `now`, including chains of hand-offs
            progressed = False
            for s, stage in enumerate(st):
                if stage.free_at > now:
                    continue
                if stage.outbox is not None:
                    link, mb = stage.outbox
                    if len(link) < link_capacity:
                        link.append(mb)
                        stage.outbox = None
                        progressed = True
                    continue
                if stage.pc == len(stage.ops):
                    continue
                op = stage.ops[stage.pc]
                inbox = acts[s] if op.kind == "F" and s > 0 else grads[s] if op.kind == "B" and s < n - 1 else None
                if inbox is not None:
                    if not inbox:
                        continue
                    if inbox[0] != op.mb:
                        raise ValueError(f"stage {s} wants {op} but {inbox[0]} arrives first")
                    inbox.popleft()
                cost = forward if op.kind == "F" else backward
                stage.busy.append((now, now + cost, op))
                stage.free_at = now + cost
                stage.pc += 1
                if op.kind == "F" and s < n - 1:
                    stage.outbox = (acts[s + 1], op.mb)
                elif op.kind == "B" and s > 0:
                    stage.outbox = (grads[s - 1], op.mb)
                progressed = True
        pending = [stage.free_at for stage in st if stage.free_at > now]
        if pending:
            now = min(pending)
            continue
        if all(stage.pc == len(stage.ops) and stage.outbox is None for stage in st):
            return Simulation(now, [stage.busy for stage in st])
        raise ScheduleDeadlock({s: stage.ops[stage.pc] if stage.pc < len(stage.ops) else None
                                for s, stage in enumerate(st)})
