"""A stage checkpoint written under one split of the model resumes under another, exactly."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from neuranet.pipeline.checkpoint import OPTIM, load_stage_state, stage_state, weights_only
from neuranet.pipeline.data import batches, load_dataset
from neuranet.pipeline.models import build_model
from neuranet.pipeline.stage import QueueChannel, StageConfig, StageRuntime

OPTIONS = {"hidden": 64, "depth": 6}


def one_process(steps: int) -> tuple[list[float], list[torch.Tensor]]:
    model = build_model("mlp-digits", 3, **OPTIONS)
    whole = model.sequential()
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    data = batches(load_dataset(model.dataset), 32, 5)
    losses = []
    for _ in range(steps):
        x, y = next(data)
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(4), y.chunk(4)):
            loss = model.loss_fn(whole(xm), ym) * (len(ym) / len(y))
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, [p.detach().clone() for p in whole.parameters()]


async def pipeline(cuts: list[tuple[int, int]], first: int, last: int, state: dict | None = None):
    model = build_model("mlp-digits", 3, **OPTIONS)
    links = [QueueChannel.pair() for _ in cuts[1:]]
    stages = []
    for i, (a, b) in enumerate(cuts):
        config = StageConfig(index=i, num_stages=len(cuts), layer_range=(a, b), num_microbatches=4,
                             optimizer="adamw", lr=1e-3)
        stage = StageRuntime(config, model.layers[a:b], prev=links[i - 1][1] if i else None,
                             next=links[i][0] if i < len(cuts) - 1 else None,
                             loss_fn=model.loss_fn if i == len(cuts) - 1 else None)
        if state is not None:
            load_stage_state(stage.layers, a, stage.optimizer, state)
        stages.append(stage)
    data = load_dataset(model.dataset)
    results = await asyncio.gather(*(s.train(itertools.islice(batches(data, 32, 5), first, None), last - first)
                                     for s in stages))
    saved: dict[str, torch.Tensor] = {}
    for stage, (a, _) in zip(stages, cuts):
        saved.update(stage_state(stage.layers, a, stage.optimizer))
    return results[-1], saved, [p.detach() for s in stages for p in s.layers.parameters()]


def test_adamw_run_resumed_on_a_different_split_matches_one_process() -> None:
    reference_losses, reference_params = one_process(10)
    before, state, _ = asyncio.run(pipeline([(0, 2), (2, 4), (4, 6)], 0, 5))
    assert any(k.startswith(OPTIM) and k.endswith(".exp_avg") for k in state)  # optimiser state travels
    after, _, params = asyncio.run(pipeline([(0, 3), (3, 6)], 5, 10, state))
    assert torch.allclose(torch.tensor(before + after), torch.tensor(reference_losses), rtol=1e-5, atol=1e-6)
    for got, want in zip(params, reference_params):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_weights_only_drops_optimiser_state() -> None:
    _, state, _ = asyncio.run(pipeline([(0, 6)], 0, 1))
    kept = weights_only(state)
    assert kept and not any(k.startswith(OPTIM) for k in kept)
    assert set(kept) == {f"{i}.{k}" for i, layer in enumerate(build_model("mlp-digits", 3, **OPTIONS).layers)
                         for k in layer.state_dict()}


def test_checkpoint_interval_follows_youngs_rule_and_availability() -> None:
    from neuranet.pipeline.checkpoint import checkpoint_interval

    # one device expected online 2 h, checkpoints cost 1 s, steps take 0.1 s: sqrt(2 * 1 * 7200) = 120 s = 1200 steps
    assert checkpoint_interval(0.1, 1.0, [7200.0], 100_000) == 1200
    # three such devices fail three times as often: sqrt(2 * 2400) = 69.3 s
    assert checkpoint_interval(0.1, 1.0, [7200.0] * 3, 100_000) == 693
    # less available devices -> more frequent checkpoints; never more than the run, never below one step
    assert checkpoint_interval(0.1, 1.0, [600.0], 100_000) < checkpoint_interval(0.1, 1.0, [7200.0], 100_000)
    assert checkpoint_interval(0.1, 1.0, [7200.0], 300) == 300
    assert checkpoint_interval(10.0, 0.01, [0.0], 300) == 1
    with pytest.raises(ValueError):
        checkpoint_interval(0.0, 1.0, [7200.0], 10)
