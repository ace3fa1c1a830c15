"""Tensors on the wire: a small header (dtype, shape) plus raw little-endian bytes.

Only an allowlist of dtypes is accepted and the byte count must match the shape
exactly, so a peer can never make this side allocate or interpret memory it did
not describe.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from neuranet.protocol.envelope import Buffer
from neuranet.protocol.errors import TensorFormatError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 16
# torch computes sizes and strides in int64; a shape past this would overflow
# inside torch (even when a zero dim makes it empty) instead of failing here.
_MAX_ELEMENT_SPAN = 2**63 - 1


def tensor_header(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype not in _NAMES:
        raise TensorFormatError(f"dtype {t.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    return {"dtype": _NAMES[t.dtype], "shape": list(t.shape)}


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """Return the header and a zero-copy view of the tensor's bytes (CPU, contiguous)."""
    header = tensor_header(t)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in CI
        raise TensorFormatError("big-endian hosts are not supported")
    if t.numel() == 0:
        return header, memoryview(b"")
    # Flatten first: torch refuses to reinterpret a 0-dim tensor as a different-size dtype.
    flat = t.reshape(-1)
    data = flat.view(torch.uint8) if t.dtype != torch.bool else flat.to(torch.uint8)
    return header, memoryview(data.numpy()).cast("B")


def decode_tensor(header: Any, payload: Buffer) -> torch.Tensor:
    """Rebuild a tensor from its header and bytes; the result owns its memory."""
    if not isinstance(header, dict):
        raise TensorFormatError("tensor header must be a map")
    name = header.get("dtype")
    # The isinstance guard keeps an unhashable value (a list or map) out of the lookup.
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise TensorFormatError(f"unknown tensor dtype {name!r}")
    shape = header.get("shape")
    # ``type(d) is int`` rather than isinstance: torch rejects bools as dims.
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorFormatError(f"tensor shape must be a list of at most {MAX_DIMS} non-negative ints, got {shape!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_ELEMENT_SPAN:
        raise TensorFormatError(f"tensor shape {shape!r} is too large to represent")
    expected = math.prod(shape) * itemsize
    # nbytes, not len(): len() counts items of a non-byte memoryview, not bytes.
    nbytes = memoryview(payload).nbytes
    if expected != nbytes:
        raise TensorFormatError(f"tensor {name}{shape} needs {expected} bytes, frame carries {nbytes}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)
