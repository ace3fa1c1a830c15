"""Serves one pipeline stage of a deployment: load the layers, link to neighbours, answer requests until stopped.

Requests flow first stage -> ... -> last stage -> server. Each stage joins a request's parts, runs
its layers forward (no autograd, on CUDA when this device has it), and sends the result on in parts
that fit the next hop's message limit. A request that fails at a stage is reported to the server
from there; the stage goes on with the next request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from safetensors.torch import load
from torch import nn

from neuranet.agent.runtime import Agent
from neuranet.agent.stage_worker import STATE_TIMEOUT, _neighbours, compute_device
from neuranet.net.peerlink import PeerLink
from neuranet.pipeline.checkpoint import load_stage_state
from neuranet.pipeline.inference import PartJoiner, split_batch
from neuranet.pipeline.models import build_model
from neuranet.protocol import messages as m
from neuranet.protocol.parts import PartsRefused, Reassembler, join_bytes
from neuranet.protocol.tensors import decode_tensor, encode_tensor

log = logging.getLogger("neuranet.serve")
SERVE_PART_BYTES = m.STATE_PART_BYTES  # parts to and from the server stay well under its message limit
MAX_WEIGHTS_PARTS = 4096  # parts of a served stage's weights accepted (STATE_PART_BYTES each)

Part = tuple[int, int, int, "torch.Tensor | str"]  # request, part, parts, tensor or why it is unreadable


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def _next_part(inbox: "asyncio.Queue[Part]", prev: PeerLink | None) -> Part:
    if prev is None:
        return await inbox.get()
    msg = await prev.recv()
    meta = msg.meta
    request, part, parts = meta.get("req"), meta.get("part"), meta.get("parts")
    if not all(type(v) is int and v >= 0 for v in (request, part, parts)):
        raise ValueError(f"the previous stage sent a part without a valid request number: {meta!r}")
    try:
        return request, part, parts, msg.tensor()
    except Exception as exc:  # a malformed tensor fails this request, not the stage
        return request, part, parts, _error(exc)


async def _send_on(agent: Agent, a: m.ServeAssign, nxt: PeerLink | None, request: int, out: torch.Tensor) -> None:
    if nxt is not None:
        pieces = split_batch(out, nxt.max_message_bytes - 4096)
        for i, piece in enumerate(pieces):
            await nxt.send_tensor(piece, {"req": request, "part": i, "parts": len(pieces)})
        return
    pieces = split_batch(out, SERVE_PART_BYTES)
    for i, piece in enumerate(pieces):
        header, data = encode_tensor(piece)
        await agent.send(m.ServeOutput(run_id=a.run_id, stage=a.stage, attempt=a.attempt, request=request, part=i, parts=len(pieces),
                                       tensor=header), payload=bytes(data))


async def serve_stage(agent: Agent, a: m.ServeAssign, inbox: "asyncio.Queue[Part]",
                      weights: "asyncio.Future[bytes] | None") -> None:
    """Serve this device's stage until stopped; reports ServeStatus when ready and when it fails."""
    prev = nxt = None
    try:
        model = await asyncio.to_thread(lambda: build_model(a.model, a.seed, **a.model_options))
        device = torch.device(compute_device())
        layers = nn.Sequential(*model.layers[a.start:a.stop]).to(device).eval()
        if a.weights_parts:
            assert weights is not None
            load_stage_state(layers, a.start, None, load(await asyncio.wait_for(weights, STATE_TIMEOUT)))
        prev, nxt = await _neighbours(agent, a)
        await agent.send(m.ServeStatus(run_id=a.run_id, stage=a.stage, attempt=a.attempt, ok=True))

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return layers(x.to(device))

        joiner = PartJoiner()
        while True:
            request, part, parts, x = await _next_part(inbox, prev)
            try:
                if isinstance(x, str):
                    raise ValueError(x)
                batch = joiner.add(request, part, parts, x)
                if batch is None:
                    continue
                await _send_on(agent, a, nxt, request, await asyncio.to_thread(forward, batch))
            except Exception as exc:  # this request fails; the stage serves the next one
                joiner.drop(request)
                await agent.send(m.ServeOutput(run_id=a.run_id, stage=a.stage, attempt=a.attempt, request=request, error=_error(exc)))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("serving stage %d of %s failed", a.stage, a.run_id)
        await agent.report(m.ServeStatus(run_id=a.run_id, stage=a.stage, attempt=a.attempt, ok=False, error=_error(exc)))
    finally:
        for link in (prev, nxt):
            if link is not None:
                await link.close(flush_timeout=1.0)


def install(agent: Agent) -> None:
    """Serve deployments the server assigns to this device."""
    running: dict[str, tuple[asyncio.Task[Any], asyncio.Queue[Part]]] = {}
    weights: dict[str, asyncio.Future[bytes]] = {}  # run -> the weights its stage waits for
    weight_parts: Reassembler[str, bytes, bytes] = Reassembler(
        join_bytes, max_parts=MAX_WEIGHTS_PARTS, max_bytes=MAX_WEIGHTS_PARTS * m.STATE_PART_BYTES, max_pending=16,
        what="weights of deployment")

    async def assigned(agent: Agent, a: m.ServeAssign, payload: bytes = b"") -> None:
        task, inbox = asyncio.current_task(), asyncio.Queue[Part]()
        assert task is not None
        old = running.pop(a.run_id, None)
        if old is not None:
            old[0].cancel()
        running[a.run_id] = (task, inbox)
        future = asyncio.get_running_loop().create_future()
        if a.weights_parts:
            try:
                weight_parts.expect(a.run_id, a.weights_parts)  # a part naming another count is refused
            except PartsRefused as exc:
                future.set_exception(exc)
            else:
                weights[a.run_id] = future
        try:
            await serve_stage(agent, a, inbox, future)
        finally:
            if running.get(a.run_id, (None,))[0] is task:
                del running[a.run_id]
            if weights.get(a.run_id) is future:  # not a newer assignment's (a restart's)
                del weights[a.run_id]
                weight_parts.drop(a.run_id)

    async def weights_part(agent: Agent, w: m.ServeWeights, payload: bytes = b"") -> None:
        future = weights.get(w.run_id)
        if future is None or future.done():
            return
        try:
            blob = weight_parts.add(w.run_id, w.part, w.parts, payload)
        except PartsRefused as exc:  # the stage fails now, saying why, rather than at STATE_TIMEOUT
            future.set_exception(exc)
            return
        if blob is not None:
            future.set_result(blob)

    async def served_input(agent: Agent, i: m.ServeInput, payload: bytes = b"") -> None:
        entry = running.get(i.run_id)
        if entry is None:
            await agent.send(m.ServeOutput(run_id=i.run_id, stage=0, attempt=i.attempt, request=i.request,
                                           error="this device does not serve that deployment"))
            return
        try:
            entry[1].put_nowait((i.request, i.part, i.parts, decode_tensor(i.tensor, payload)))
        except Exception as exc:
            entry[1].put_nowait((i.request, i.part, i.parts, _error(exc)))

    async def stopped(agent: Agent, s: m.ServeStop, payload: bytes = b"") -> None:
        entry = running.pop(s.run_id, None)
        if entry is not None:
            entry[0].cancel()

    agent.on(m.ServeAssign, assigned)
    agent.on(m.ServeWeights, weights_part)
    agent.on(m.ServeInput, served_input)
    agent.on(m.ServeStop, stopped)
