"""Runs one pipeline stage the server assigned: build the layers, link to neighbours, train, report.

Every ``checkpoint_every`` steps (and at the end) the stage uploads its state, weights and optimiser,
so that the server can re-plan a run onto the devices that remain when one is lost, and resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from typing import Any

import torch
from safetensors.torch import load, save

from neuranet.agent.runtime import Agent
from neuranet.net.peerlink import PeerLink
from neuranet.pipeline.checkpoint import load_stage_state, stage_state
from neuranet.pipeline.data import batches, load_dataset
from neuranet.pipeline.models import LayerModel, UserModelError, build_model, load_user_model
from neuranet.pipeline.stage import PeerLinkChannel, StageConfig, StageRuntime
from neuranet.protocol import messages as m
from neuranet.protocol.errors import LinkError
from neuranet.protocol.parts import PartsRefused, Reassembler, join_bytes

log = logging.getLogger("neuranet.stage")
LINK_TIMEOUT = 60.0
STATE_TIMEOUT = 120.0
MAX_STATE_PARTS = 4096  # parts of a resume state accepted (STATE_PART_BYTES each)


def compute_device() -> str:
    """CUDA when this device has it (mixed CPU/GPU pipelines work: tensors cross as CPU bytes)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_for(agent: Agent, a: m.StageAssign) -> LayerModel:
    """The assigned model: a built-in one by name, or the owner's model file (when this agent allows those)."""
    if not a.model_source:
        return build_model(a.model, a.seed, **a.model_options)
    if not agent.config.user_models:
        raise UserModelError(f"device {agent.name} ({agent.device_id}) does not run its owner's model files: the owner "
                             "allows them there by starting its agent with --allow-owner-code")
    source = a.model_source.encode()
    path = agent.config.data_dir / "user-models" / f"{hashlib.sha256(source).hexdigest()[:32]}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source)
    return load_user_model(path, a.seed)


def run_channel(a: m.StageSpec) -> str:
    return f"run:{a.run_id}:{a.attempt}"


async def _neighbours(agent: Agent, a: m.StageSpec) -> tuple[PeerLink | None, PeerLink | None]:
    """Open the link to the next stage and accept the one from the previous, together."""
    opening = agent.links.open(a.next, channel=run_channel(a)) if a.next else None
    accepting = agent.links.accept(run_channel(a)) if a.prev else None
    results = await asyncio.wait_for(
        asyncio.gather(*(c for c in (accepting, opening) if c is not None)), LINK_TIMEOUT)
    prev = results.pop(0) if a.prev else None
    nxt = results.pop(0) if a.next else None
    return prev, nxt


async def _upload(agent: Agent, a: m.StageAssign, runtime: StageRuntime, step: int) -> None:
    parts = m.state_parts(save(stage_state(runtime.layers, a.start, runtime.optimizer)))
    for i, chunk in enumerate(parts):
        await agent.send(m.StageWeights(run_id=a.run_id, stage=a.stage, step=step, attempt=a.attempt,
                                        part=i, parts=len(parts)), payload=chunk)


async def run_stage(agent: Agent, a: m.StageAssign, resume: "asyncio.Future[bytes] | None" = None) -> None:
    """Train this device's stage; always reports a StageDone (after its final state, or with the error)."""
    prev = nxt = None
    try:
        model = model_for(agent, a)
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
        if a.resume_step:
            assert resume is not None
            load_stage_state(runtime.layers, a.start, runtime.optimizer,
                             load(await asyncio.wait_for(resume, STATE_TIMEOUT)))
        data = itertools.islice(batches(dataset, a.batch_size, a.data_seed), a.resume_step, None)
        for step in range(a.resume_step, a.steps):
            x, y = next(data)
            loss = await runtime.train_step(x if a.stage == 0 else None, y if last else None)
            await agent.send(m.StageProgress(run_id=a.run_id, stage=a.stage, attempt=a.attempt, step=step, loss=loss))
            if a.checkpoint_every and (step + 1) % a.checkpoint_every == 0 and step + 1 < a.steps:
                await _upload(agent, a, runtime, step + 1)
        await _upload(agent, a, runtime, a.steps)
        done = m.StageDone(run_id=a.run_id, stage=a.stage, attempt=a.attempt, ok=True)
    except Exception as exc:  # the run's owner sees why this stage failed
        log.exception("stage %d of run %s failed", a.stage, a.run_id)
        done = m.StageDone(run_id=a.run_id, stage=a.stage, attempt=a.attempt, ok=False,
                          error=f"{type(exc).__name__}: {exc}", link_failed=isinstance(exc, LinkError))
    finally:
        for link in (prev, nxt):
            if link is not None:
                await link.close(flush_timeout=5.0)
    await agent.report(done)  # kept until the server has it, if the connection is down now


def install(agent: Agent) -> None:
    """Serve stage assignments, resume state and aborts from the server."""
    running: dict[str, asyncio.Task[Any]] = {}  # run id -> this device's stage task
    # (run, attempt) -> the resume state's parts so far
    states: Reassembler[tuple[str, int], bytes, bytes] = Reassembler(
        join_bytes, max_parts=MAX_STATE_PARTS, max_bytes=MAX_STATE_PARTS * m.STATE_PART_BYTES, max_pending=16,
        what="resume state of")
    resumes: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    def resume_future(key: tuple[str, int]) -> asyncio.Future[bytes]:
        return resumes.setdefault(key, asyncio.get_running_loop().create_future())

    async def assigned(agent: Agent, a: m.StageAssign, payload: bytes = b"") -> None:
        task = asyncio.current_task()
        if task is not None:
            running[a.run_id] = task
        key = (a.run_id, a.attempt)
        try:
            await run_stage(agent, a, resume_future(key) if a.resume_step else None)
        finally:
            if running.get(a.run_id) is task:
                del running[a.run_id]
            resumes.pop(key, None)
            states.drop(key)

    async def state_part(agent: Agent, part: m.StageState, payload: bytes = b"") -> None:
        key = (part.run_id, part.attempt)
        resume = resume_future(key)
        if resume.done():
            return  # complete already, or refused: the stage has what it waits for
        try:
            state = states.add(key, part.part, part.parts, payload)
        except PartsRefused as exc:  # the stage fails now, saying why, rather than at STATE_TIMEOUT
            log.warning("run %s: %s", part.run_id, exc)
            resume.set_exception(exc)
            resume.exception()  # logged above: no "never retrieved" if no stage waits for it
            return
        if state is not None:
            resume.set_result(state)

    async def aborted(agent: Agent, abort: m.StageAbort, payload: bytes = b"") -> None:
        task = running.pop(abort.run_id, None)
        if task is not None:
            log.warning("run %s aborted: %s", abort.run_id, abort.reason)
            task.cancel()

    agent.on(m.StageAssign, assigned)
    agent.on(m.StageState, state_part)
    agent.on(m.StageAbort, aborted)
