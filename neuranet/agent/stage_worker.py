"""Runs one pipeline stage the server assigned: build the layers, link to neighbours, train, report."""

from __future__ import annotations

import asyncio
import logging

import torch
from safetensors.torch import save

from neuranet.agent.runtime import Agent
from neuranet.net.peerlink import PeerLink
from neuranet.pipeline.data import batches, load_dataset
from neuranet.pipeline.models import build_model
from neuranet.pipeline.stage import PeerLinkChannel, StageConfig, StageRuntime
from neuranet.protocol import messages as m

log = logging.getLogger("neuranet.stage")
LINK_TIMEOUT = 60.0
WEIGHT_PART_BYTES = 1024 * 1024  # weights go up in parts well under the server's message limit


def compute_device() -> str:
    """CUDA when this device has it (mixed CPU/GPU pipelines work: tensors cross as CPU bytes)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_channel(run_id: str) -> str:
    return f"run:{run_id}"


async def _neighbours(agent: Agent, a: m.StageAssign) -> tuple[PeerLink | None, PeerLink | None]:
    """Open the link to the next stage and accept the one from the previous, together."""
    opening = agent.links.open(a.next, channel=run_channel(a.run_id)) if a.next else None
    accepting = agent.links.accept(run_channel(a.run_id)) if a.prev else None
    results = await asyncio.wait_for(
        asyncio.gather(*(c for c in (accepting, opening) if c is not None)), LINK_TIMEOUT)
    prev = results.pop(0) if a.prev else None
    nxt = results.pop(0) if a.next else None
    return prev, nxt


async def run_stage(agent: Agent, a: m.StageAssign) -> None:
    """Train this device's stage; always reports a StageDone (with weights, or the error)."""
    prev = nxt = None
    try:
        model = build_model(a.model, a.seed, **a.model_options)
        dataset = load_dataset(model.dataset, **model.data_options)
        prev, nxt = await _neighbours(agent, a)
        config = StageConfig(index=a.stage, num_stages=a.num_stages, layer_range=(a.start, a.stop),
                             num_microbatches=a.microbatches, schedule=a.schedule, optimizer=a.optimizer, lr=a.lr,
                             device=compute_device())
        last = a.stage == a.num_stages - 1
        runtime = StageRuntime(config, model.layers[a.start:a.stop],
                               prev=PeerLinkChannel(prev) if prev else None,
                               next=PeerLinkChannel(nxt) if nxt else None,
                               loss_fn=model.loss_fn if last else None)
        data = batches(dataset, a.batch_size, a.data_seed)
        for step in range(a.steps):
            x, y = next(data)
            loss = await runtime.train_step(x if a.stage == 0 else None, y if last else None)
            await agent.send(m.StageProgress(run_id=a.run_id, stage=a.stage, step=step, loss=loss))
        weights = save({f"{a.start + i}.{name}": t.detach().cpu().contiguous()
                        for i, layer in enumerate(runtime.layers) for name, t in layer.state_dict().items()})
        parts = max(1, -(-len(weights) // WEIGHT_PART_BYTES))
        for part in range(parts):
            chunk = weights[part * WEIGHT_PART_BYTES : (part + 1) * WEIGHT_PART_BYTES]
            await agent.send(m.StageWeights(run_id=a.run_id, stage=a.stage, part=part, parts=parts), payload=chunk)
        done = m.StageDone(run_id=a.run_id, stage=a.stage, ok=True)
    except Exception as exc:  # the run's owner sees why this stage failed
        log.exception("stage %d of run %s failed", a.stage, a.run_id)
        done = m.StageDone(run_id=a.run_id, stage=a.stage, ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        for link in (prev, nxt):
            if link is not None:
                await link.close(flush_timeout=5.0)
    await agent.send(done)


def install(agent: Agent) -> None:
    running: dict[str, asyncio.Task] = {}  # run id -> this device's stage task

    async def assigned(agent: Agent, a: m.StageAssign) -> None:
        task = asyncio.current_task()
        if task is not None:
            running[a.run_id] = task
        try:
            await run_stage(agent, a)
        finally:
            running.pop(a.run_id, None)

    async def aborted(agent: Agent, abort: m.StageAbort) -> None:
        task = running.get(abort.run_id)
        if task is not None:
            log.warning("run %s aborted: %s", abort.run_id, abort.reason)
            task.cancel()

    agent.on(m.StageAssign, assigned)
    agent.on(m.StageAbort, aborted)
