"""The stage runtime: one pipeline stage's layers, optimiser and training step.

A :class:`StageRuntime` owns a contiguous half-open range of a model's layers
and runs one training step of M micro-batches in the order a schedule from
:mod:`neuranet.pipeline.schedules` gives, exchanging activations (forward) and
gradients (backward) with its neighbours through injected :class:`Channel`\\ s:
:class:`PeerLinkChannel` over the network, :class:`QueueChannel` in one process.

Equivalence with training in one process is the contract. The last stage
weights each micro-batch's (mean-reduced) loss by its share of the batch, so the
gradients accumulated over the micro-batches equal those of the full-batch mean
loss, and every stage steps its own optimiser once per step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from neuranet.pipeline.schedules import SCHEDULES, UnknownSchedule, schedule

if TYPE_CHECKING:
    from neuranet.net.peerlink import PeerLink

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


INLINE_OP_S = 0.05  # ops shorter than this run on the event loop (see StageRuntime._compute)


class StageError(RuntimeError):
    """A stage was misconfigured or received a message its schedule did not expect."""


class UnknownOptimizer(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown optimiser {name!r}; choose one of: {', '.join(sorted(OPTIMIZERS))}")
        self.name = name


# --- transport ----------------------------------------------------------------------


class Channel(Protocol):
    """One end of an ordered, reliable tensor channel to a neighbouring stage."""

    async def send(self, tensor: torch.Tensor, meta: dict[str, Any]) -> None: ...

    async def recv(self) -> tuple[torch.Tensor, dict[str, Any]]: ...


class QueueChannel:
    """In-process channel end; tensors are copied as a wire would, so ends share no storage."""

    def __init__(self, inbox: asyncio.Queue[tuple[torch.Tensor, dict[str, Any]]],
                 outbox: asyncio.Queue[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        self._inbox, self._outbox = inbox, outbox

    @classmethod
    def pair(cls, maxsize: int = 0) -> tuple[QueueChannel, QueueChannel]:
        """Two connected ends; ``maxsize`` > 0 bounds each direction (a blocking send)."""
        a: asyncio.Queue[tuple[torch.Tensor, dict[str, Any]]] = asyncio.Queue(maxsize)
        b: asyncio.Queue[tuple[torch.Tensor, dict[str, Any]]] = asyncio.Queue(maxsize)
        return cls(a, b), cls(b, a)

    async def send(self, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        await self._outbox.put((tensor.detach().clone(), dict(meta)))

    async def recv(self) -> tuple[torch.Tensor, dict[str, Any]]:
        return await self._inbox.get()


class PeerLinkChannel:
    """A :class:`Channel` over a :class:`~neuranet.net.peerlink.PeerLink`."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    async def send(self, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        await self.link.send_tensor(tensor.detach(), meta)
        # Let the link's pump put the frame on the wire now: the caller may compute next without
        # yielding to the loop (StageRuntime._compute), and the neighbour is waiting for it.
        await asyncio.sleep(0)

    async def recv(self) -> tuple[torch.Tensor, dict[str, Any]]:
        msg = await self.link.recv()
        return msg.tensor(), {k: v for k, v in msg.meta.items() if k != "tensor"}


# --- runtime ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageConfig:
    """Where a stage sits and how it trains."""

    index: int
    num_stages: int
    layer_range: tuple[int, int]  # half-open [start, stop) in the whole model's layer list
    num_microbatches: int = 1
    schedule: str = "1f1b"
    optimizer: str = "sgd"
    lr: float = 1e-2
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_stages:
            raise StageError(f"stage index {self.index} is outside 0..{self.num_stages - 1}")
        start, stop = self.layer_range
        if not 0 <= start <= stop:
            raise StageError(f"layer range [{start}, {stop}) is not a valid half-open range")
        if self.num_microbatches < 1:
            raise StageError(f"need at least one micro-batch, got {self.num_microbatches}")
        if self.schedule.lower() not in SCHEDULES:
            raise UnknownSchedule(self.schedule)
        if self.optimizer.lower() not in OPTIMIZERS:
            raise UnknownOptimizer(self.optimizer)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class StageRuntime:
    """One stage's layers and optimiser; :meth:`train_step` runs one pipelined step."""

    def __init__(self, config: StageConfig, layers: Sequence[nn.Module], *, prev: Channel | None = None,
                 next: Channel | None = None, loss_fn: LossFn | None = None) -> None:
        start, stop = config.layer_range
        if len(layers) != stop - start:
            raise StageError(f"layer range [{start}, {stop}) needs {stop - start} layers, got {len(layers)}")
        if (prev is None) != config.is_first or (next is None) != config.is_last:
            raise StageError(f"stage {config.index} of {config.num_stages} needs a previous channel exactly when "
                             "it is not first and a next channel exactly when it is not last")
        if config.is_last and loss_fn is None:
            raise StageError("the last stage needs a loss function")
        self.config = config
        self.device = torch.device(config.device)
        self.layers = nn.Sequential(*layers).to(self.device)
        self.prev, self.next, self.loss_fn = prev, next, loss_fn
        params = [p for p in self.layers.parameters() if p.requires_grad]
        self.optimizer = OPTIMIZERS[config.optimizer.lower()](params, lr=config.lr) if params else None
        self.ops = schedule(config.schedule, config.num_stages, config.num_microbatches)[config.index]
        self.steps_done = 0
        self._op_seconds: dict[str, float] = {}  # op kind ("F", "B") -> seconds its last run took
        self._inline_s = 0.0  # seconds of compute run on the event loop since it last ran

    async def train_step(self, inputs: torch.Tensor | None = None,
                         targets: torch.Tensor | None = None) -> float | None:
        """Run one step over a batch split into M micro-batches; the last stage returns the batch's loss.

        The first stage takes the batch's ``inputs``, the last its ``targets``
        (a one-stage pipeline takes both); middle stages take neither.
        """
        cfg = self.config
        if (inputs is None) == cfg.is_first or (targets is None) == cfg.is_last:
            raise StageError(f"stage {cfg.index} of {cfg.num_stages}: pass inputs exactly to the first stage "
                             "and targets exactly to the last")
        xs = self._split(inputs) if inputs is not None else None
        ys = self._split(targets) if targets is not None else None
        batch = sum(len(y) for y in ys) if ys is not None else 0
        self.layers.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # mb -> (stage input, output or scaled loss)
        total = torch.zeros((), device=self.device)
        for op in self.ops:
            if op.kind == "F":
                x = xs[op.mb].to(self.device) if xs is not None else await self._recv("act", op.mb)
                out = await self._compute("F", self.layers, x)
                if ys is not None:
                    y = ys[op.mb].to(self.device)
                    out = self.loss_fn(out, y) * (len(y) / batch)  # type: ignore[misc]
                    total += out.detach()
                else:
                    await self._send(self.next, "act", op.mb, out)
                saved[op.mb] = (x, out)
            else:
                x, out = saved.pop(op.mb)
                grad = None if ys is not None else await self._recv("grad", op.mb)
                if out.requires_grad:
                    await self._compute("B", torch.autograd.backward, out, grad)
                if self.prev is not None:
                    await self._send(self.prev, "grad", op.mb, x.grad if x.grad is not None else torch.zeros_like(x))
        if self.optimizer is not None:
            self.optimizer.step()
        self.steps_done += 1
        return float(total) if cfg.is_last else None

    async def train(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[float | None]:
        """Run ``steps`` steps, taking from ``batches`` what this stage needs of each (inputs, targets)."""
        losses = []
        it = iter(batches)
        for _ in range(steps):
            x, y = next(it)
            losses.append(await self.train_step(x if self.config.is_first else None,
                                                y if self.config.is_last else None))
        return losses

    async def _compute(self, kind: str, fn: Any, *args: Any) -> Any:
        """Run one op of layer math: on the event loop when ops of its kind are short, else in a thread.

        A worker thread costs every op two hand-offs between threads, and where every core is busy
        computing (a stage per core) each hand-off waits for the scheduler: that was a large part
        of the pipeline's idle time. So an op whose kind last took under ``INLINE_OP_S`` runs right
        here: the frames already queued are on the wire (see :class:`PeerLinkChannel`) and the
        kernel's socket buffers hold what arrives meanwhile. The loop still runs at least every
        ``INLINE_OP_S`` of such compute (ops in a row need not await anything in between). The
        first op of each kind, and kinds that take longer, run in a thread so that the loop keeps
        serving heartbeats and links while they run.
        """
        last = self._op_seconds.get(kind)
        if last is None or last >= INLINE_OP_S:
            def timed() -> Any:
                start = time.perf_counter()
                result = fn(*args)
                self._op_seconds[kind] = time.perf_counter() - start
                return result

            self._inline_s = 0.0
            return await asyncio.to_thread(timed)
        if self._inline_s >= INLINE_OP_S:
            self._inline_s = 0.0
            await asyncio.sleep(0)
        start = time.perf_counter()
        out = fn(*args)
        took = time.perf_counter() - start
        self._op_seconds[kind] = took
        self._inline_s += took
        return out

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.config.num_microbatches
        if len(t) < m:
            raise StageError(f"a batch of {len(t)} samples cannot be split into {m} micro-batches")
        return torch.tensor_split(t, m)

    async def _send(self, channel: Channel | None, kind: str, mb: int, t: torch.Tensor) -> None:
        assert channel is not None
        await channel.send(t.detach(), {"kind": kind, "step": self.steps_done, "mb": mb})

    async def _recv(self, kind: str, mb: int) -> torch.Tensor:
        channel = self.prev if kind == "act" else self.next
        assert channel is not None
        t, meta = await channel.recv()
        want = {"kind": kind, "step": self.steps_done, "mb": mb}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise StageError(f"stage {self.config.index} expected {want} but received {got}")
        t = t.to(self.device)
        return t.requires_grad_() if kind == "act" and t.is_floating_point() else t
