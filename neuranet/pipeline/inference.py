"""Inference through a pipeline: batches cut to fit message limits, and text generation token by token.

A served stage runs its layers forward without autograd. A request's batch may
be larger than one message may carry (the coordinator's WebSocket limit, a
PeerLink's window), so every hop sends it in parts cut along the first (sample)
dimension and the receiver joins them; each part is computed as it arrives.
:func:`generate` is the same loop for a model in one process and for a pipeline:
it only needs a function from token ids to logits.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import torch
from torch import Tensor

from neuranet.pipeline.data import CHAR_VOCAB, decode, encode
from neuranet.protocol.parts import Reassembler


class BatchTooLarge(ValueError):
    """One sample alone exceeds the limit of a message."""


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def split_batch(t: Tensor, limit: int) -> list[Tensor]:
    """``t`` cut along its first dimension into as few parts as keep each within ``limit`` bytes."""
    total = nbytes(t)
    if total <= limit:
        return [t]
    if t.dim() == 0 or len(t) == 0:
        raise BatchTooLarge(f"a tensor of {total} bytes exceeds the message limit of {limit} bytes")
    per_sample = math.ceil(total / len(t))
    if per_sample > limit:
        raise BatchTooLarge(f"one sample is {per_sample} bytes here, over the message limit of {limit} bytes")
    rows = limit // per_sample
    return list(torch.split(t, rows))


MAX_PARTS = 4096  # parts of one request's batch a joiner accepts
MAX_BATCH_BYTES = 1 << 30  # bytes of one request's batch a joiner accepts
MAX_JOINING = 256  # requests whose parts are arriving at once


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class PartJoiner(Reassembler[int, Tensor, Tensor]):
    """Collects the parts of each request, in order, and returns the joined batch once all are in
    (``add(request, part, parts, tensor)``); a part that does not fit its request raises PartsRefused."""

    def __init__(self, max_parts: int = MAX_PARTS, max_bytes: int = MAX_BATCH_BYTES,
                 max_pending: int = MAX_JOINING) -> None:
        super().__init__(_cat, max_parts=max_parts, max_bytes=max_bytes, max_pending=max_pending, size=nbytes,
                         what="request")


Logits = Callable[[Tensor], Awaitable[Tensor]]


async def generate(logits_of: Logits, prompt: str, max_new_tokens: int, block_size: int,
                   temperature: float = 0.0, seed: int = 0) -> str:
    """Extend ``prompt`` by ``max_new_tokens`` characters, one forward pass per character.

    ``logits_of`` maps ``(1, T)`` character ids (T <= block_size, the context's tail)
    to ``(1, T, vocab)`` logits. Temperature 0 is greedy; otherwise characters are
    sampled from a generator seeded with ``seed``, so a pipeline and one process
    with the same weights write the same text.
    """
    if not prompt:
        raise ValueError("the prompt must not be empty")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must not be negative")
    ids = encode(prompt)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = (await logits_of(ids[-block_size:].unsqueeze(0)))[0, -1].double()
        if logits.shape != (len(CHAR_VOCAB),):
            raise ValueError(f"expected {len(CHAR_VOCAB)} logits per position, got {tuple(logits.shape)}")
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=0), 1, generator=rng))
        ids = torch.cat([ids, torch.tensor([nxt])])
    return decode(ids)
