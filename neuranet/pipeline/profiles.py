"""Typed inputs and results of the pipeline planner: layer and device profiles, plans."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Objective = Literal["throughput", "latency"]
OBJECTIVES: tuple[Objective, ...] = ("throughput", "latency")

GiB = 1024**3


class PlanError(Exception):
    """No plan satisfies the request; the message says what is short."""


@dataclass(frozen=True, slots=True)
class LayerProfile:
    """What one layer costs per sample."""

    name: str
    flops: float  # forward FLOPs per sample
    activation_bytes: int  # output per sample: what crosses to the next stage
    param_bytes: int
    saved_bytes: int | None = None  # kept per sample from forward to backward; None: activation_bytes

    def __post_init__(self) -> None:
        if min(self.flops, self.activation_bytes, self.param_bytes, self.saved) < 0:
            raise ValueError(f"layer {self.name!r}: sizes and FLOPs must not be negative")

    @property
    def saved(self) -> int:
        return self.activation_bytes if self.saved_bytes is None else self.saved_bytes


@dataclass(frozen=True, slots=True)
class Link:
    """One direction of the path between two devices, as measured."""

    bandwidth: float  # bytes per second
    latency: float = 0.0  # seconds

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            raise ValueError("a link needs a positive bandwidth and a non-negative latency")

    def transfer_time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


# Peer device id -> the link from this device to that peer. A missing peer means
# no usable path, so the two devices are never placed next to each other.
Links = Mapping[str, Link]


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """A device as the planner sees it: measured speed, free memory, outgoing links."""

    id: str
    gflops: float  # measured fp32 matmul GFLOP/s
    free_bytes: int
    links: Links = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gflops <= 0 or self.free_bytes < 0:
            raise ValueError(f"device {self.id!r}: speed must be positive and free memory non-negative")


@dataclass(frozen=True, slots=True)
class Workload:
    """How the model is run, which sets times and memory per stage."""

    micro_batch: int = 1  # samples per micro-batch (inference: per request)
    micro_batches: int = 8  # per training step
    optimizer_state_factor: float = 2.0  # optimiser state per parameter byte (Adam: m and v)
    backward_factor: float = 2.0  # backward FLOPs per forward FLOP

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.micro_batches < 1:
            raise ValueError("micro_batch and micro_batches must be at least 1")


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage: the half-open layer range [start, stop) on one device."""

    device: str
    start: int
    stop: int
    compute_time: float  # per micro-batch (training: forward + backward)
    send_time: float  # activations to the next stage, per micro-batch; 0 for the last
    return_time: float  # gradients back from the next stage (training only)
    memory_bytes: int
    free_bytes: int

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True, slots=True)
class Plan:
    """Stages in pipeline order with the times the cost model predicts."""

    objective: Objective
    stages: tuple[StagePlan, ...]
    step_time: float  # training: one optimiser step; inference: one request
    bottleneck: str
    bottleneck_time: float
    workload: Workload

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.stop) for s in self.stages)

    COLUMNS = ("stage", "device", "layers", "compute", "send", "grads back", "memory", "free")

    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per stage, matching COLUMNS (for a rich table or plain text)."""
        return [
            (
                str(i), s.device, f"[{s.start}, {s.stop})", seconds(s.compute_time),
                seconds(s.send_time) if i < len(self.stages) - 1 else "-",
                seconds(s.return_time) if s.return_time else "-",
                gib(s.memory_bytes), gib(s.free_bytes),
            )
            for i, s in enumerate(self.stages)
        ]

    def describe(self) -> str:
        w = self.workload
        if self.objective == "throughput":
            what = f"training step of {w.micro_batches} x {w.micro_batch} samples"
        else:
            what = f"request of {w.micro_batch} sample{'s' if w.micro_batch > 1 else ''}"
        head = (
            f"{self.objective} plan: {len(self.stages)} stage(s), {what} in {seconds(self.step_time)}; "
            f"bottleneck: {self.bottleneck} ({seconds(self.bottleneck_time)})"
        )
        table = [self.COLUMNS, *self.rows()]
        widths = [max(len(r[c]) for r in table) for c in range(len(self.COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        return "\n".join([head, *lines])


def seconds(t: float) -> str:
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def layer_span(layers: list[LayerProfile] | tuple[LayerProfile, ...], start: int, stop: int) -> str:
    """Human words for layers [start, stop): 'layer 3 (block.2)' or 'layers 10-13'."""
    if stop - start == 1:
        return f"layer {start} ({layers[start].name})"
    return f"layers {start}-{stop - 1} ({layers[start].name} .. {layers[stop - 1].name})"
