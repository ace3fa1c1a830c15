"""The stage runtime: a pipelined run trains exactly like the same model in one process."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from torch import nn

from neuranet.net.peerlink import LinkMessage
from neuranet.pipeline.schedules import UnknownSchedule
from neuranet.pipeline.stage import (
    PeerLinkChannel,
    QueueChannel,
    StageConfig,
    StageError,
    StageRuntime,
    UnknownOptimizer,
)
from neuranet.protocol.tensors import encode_tensor

WIDTH, BATCH, STEPS = 8, 12, 5


def mlp_layers(seed: int = 0, depth: int = 6) -> list[nn.Module]:
    torch.manual_seed(seed)
    hidden = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(depth - 1)]
    return [*hidden, nn.Linear(WIDTH, 3)]


def batches(steps: int = STEPS, batch: int = BATCH, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, WIDTH, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def train_in_one_process(layers: list[nn.Module], data, microbatches: int, optimizer: str, lr: float):
    """The reference: the whole model, gradient accumulation over micro-batches of the full-batch mean loss."""
    model = nn.Sequential(*layers)
    opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer](model.parameters(), lr=lr)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xm, ym in zip(torch.tensor_split(x, microbatches), torch.tensor_split(y, microbatches)):
            loss = nn.functional.cross_entropy(model(xm), ym) * (len(ym) / len(y))
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, model


def build_pipeline(layers: list[nn.Module], bounds: list[tuple[int, int]], microbatches: int, schedule: str,
                   optimizer: str = "sgd", lr: float = 0.1, maxsize: int = 0) -> list[StageRuntime]:
    links = [QueueChannel.pair(maxsize) for _ in bounds[1:]]
    stages = []
    for i, (start, stop) in enumerate(bounds):
        cfg = StageConfig(i, len(bounds), (start, stop), microbatches, schedule, optimizer, lr)
        stages.append(StageRuntime(cfg, layers[start:stop],
                                   prev=links[i - 1][1] if i > 0 else None,
                                   next=links[i][0] if i < len(links) else None,
                                   loss_fn=nn.functional.cross_entropy))
    return stages


async def run_pipeline(stages: list[StageRuntime], data) -> list[float | None]:
    """Every stage concurrently, each task owned by the group; the last stage's losses."""
    async with asyncio.timeout(10):
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(stage.train(data, len(data))) for stage in stages]
    return tasks[-1].result()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adamw", 0.01)])
async def test_pipeline_matches_single_process_training(schedule: str, optimizer: str, lr: float) -> None:
    layers, data = mlp_layers(), batches()
    ref_losses, ref_model = train_in_one_process(copy.deepcopy(layers), data, 4, optimizer, lr)
    stages = build_pipeline(copy.deepcopy(layers), [(0, 2), (2, 4), (4, 6)], 4, schedule, optimizer, lr)

    losses = await run_pipeline(stages, data)

    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    got = [p for stage in stages for p in stage.layers.parameters()]
    want = list(ref_model.parameters())
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(want[0], mlp_layers()[0][0].weight)  # it trained: equal is not "untouched"


async def test_uneven_microbatches_and_stages_give_the_full_batch_gradient() -> None:
    """Weighting by micro-batch share (not 1/M) keeps 10 samples in 4 uneven micro-batches exact."""
    layers, data = mlp_layers(), batches(steps=3, batch=10)
    model = nn.Sequential(*copy.deepcopy(layers))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_losses = []
    for x, y in data:  # no accumulation: one full-batch backward
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    stages = build_pipeline(copy.deepcopy(layers), [(0, 1), (1, 5), (5, 6)], 4, "1f1b", maxsize=1)

    losses = await run_pipeline(stages, data)

    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for a, b in zip([p for s in stages for p in s.layers.parameters()], model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


async def test_single_stage_pipeline_needs_no_channels() -> None:
    layers, data = mlp_layers(), batches(steps=2)
    ref_losses, _ = train_in_one_process(copy.deepcopy(layers), data, 3, "sgd", 0.1)
    (stage,) = build_pipeline(copy.deepcopy(layers), [(0, 6)], 3, "gpipe")
    assert await stage.train(data, 2) == pytest.approx(ref_losses, rel=1e-6)


async def test_out_of_order_message_is_rejected() -> None:
    upstream, downstream = QueueChannel.pair()
    cfg = StageConfig(1, 2, (0, 1), num_microbatches=2, schedule="gpipe")
    stage = StageRuntime(cfg, [nn.Linear(WIDTH, 3)], prev=downstream, loss_fn=nn.functional.cross_entropy)
    await upstream.send(torch.zeros(1, WIDTH), {"kind": "act", "step": 0, "mb": 1})
    with pytest.raises(StageError, match="expected .*'mb': 0"):
        await stage.train_step(targets=torch.zeros(2, dtype=torch.long))


def test_bad_schedule_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownSchedule, match="unknown pipeline schedule 'zigzag'; choose one of: 1f1b, gpipe"):
        StageConfig(0, 1, (0, 1), schedule="zigzag")


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(UnknownOptimizer, match="'lamb'"):
        StageConfig(0, 1, (0, 1), optimizer="lamb")
    with pytest.raises(StageError, match="outside"):
        StageConfig(3, 3, (0, 1))
    with pytest.raises(StageError, match="needs 2 layers, got 1"):
        StageRuntime(StageConfig(0, 1, (0, 2)), [nn.Linear(2, 2)], loss_fn=nn.functional.mse_loss)
    with pytest.raises(StageError, match="previous channel"):
        StageRuntime(StageConfig(0, 2, (0, 1)), [nn.Linear(2, 2)])


class FakeLink:
    """Stands in for a PeerLink: the same send_tensor/recv surface and wire encoding, no network."""

    def __init__(self) -> None:
        self.sent: list[LinkMessage] = []

    async def send_tensor(self, t: torch.Tensor, meta=None) -> None:
        header, data = encode_tensor(t)
        self.sent.append(LinkMessage({**(meta or {}), "tensor": header}, bytes(data)))

    async def recv(self) -> LinkMessage:
        return self.sent.pop(0)


async def test_peerlink_channel_round_trips_tensor_and_meta() -> None:
    channel = PeerLinkChannel(FakeLink())  # type: ignore[arg-type]
    t = torch.randn(3, 4, requires_grad=True) * 2
    await channel.send(t, {"kind": "act", "step": 2, "mb": 1})
    got, meta = await channel.recv()
    assert torch.equal(got, t.detach())
    assert meta == {"kind": "act", "step": 2, "mb": 1}


def test_the_coordinator_knows_the_optimisers_a_stage_accepts() -> None:
    from neuranet.pipeline.schedules import OPTIMIZER_NAMES
    from neuranet.pipeline.stage import OPTIMIZERS

    assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)  # the torch-free list the server validates runs with
