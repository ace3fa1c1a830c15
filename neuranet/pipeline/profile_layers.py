"""Measure a LayerModel's per-layer costs on a sample batch, as the planner's LayerProfiles.

Each layer runs once, forward only, on the previous layer's output detached
(as a pipeline stage receives it), with autograd on so that what backward
would keep is recorded:

* ``flops``: matmul, convolution and attention FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (elementwise ops are not
  counted; they are small next to these and the planner only needs ratios).
* ``activation_bytes``: the layer's output.
* ``saved_bytes``: distinct tensor storages autograd saves for backward,
  parameters excluded; this includes the layer's input when an op keeps it.
* ``param_bytes``: the layer's parameters (buffers are not counted).

Everything but ``param_bytes`` is divided by the batch size: the profile is per sample.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from neuranet.pipeline.models import LayerModel, UserModelError, load_user_model
from neuranet.pipeline.profiles import LayerProfile


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# On CPU, scaled_dot_product_attention runs a fused kernel that the counter has no formula for.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def profile_layers(model: LayerModel, sample_batch: Tensor) -> list[LayerProfile]:
    """One LayerProfile per layer of ``model``, measured on ``sample_batch`` (first dimension: samples)."""
    batch = sample_batch.shape[0]
    if batch < 1:
        raise ValueError("the sample batch needs at least one sample")
    profiles = []
    x = sample_batch
    for name, layer in zip(model.names, model.layers):
        x = x.detach().requires_grad_(x.is_floating_point())
        param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        with torch.enable_grad(), counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x)
        profiles.append(
            LayerProfile(
                name=name,
                flops=counter.get_total_flops() / batch,
                activation_bytes=_nbytes(out) // batch,
                param_bytes=sum(_nbytes(p) for p in layer.parameters()),
                saved_bytes=sum(saved.values()) // batch,
            )
        )
        x = out
    return profiles


def user_model_spec(path: str | Path, seed: int, micro_batch: int, data_seed: int = 0) -> dict[str, object]:
    """A model file of the user's own, loaded and profiled here (on the user's machine): its source and
    layer profiles, which is what the coordinator plans a run of it from without running the code."""
    model = load_user_model(path, seed)
    if not model.trainable:
        raise UserModelError(f"{str(path)!r}: the LayerModel must name a dataset to train on (e.g. 'digits')")
    layers = profile_layers(model, model.sample(micro_batch, data_seed))
    return {"source": Path(path).read_text(),
            "layers": [{"name": p.name, "flops": p.flops, "activation_bytes": p.activation_bytes,
                        "param_bytes": p.param_bytes, "saved_bytes": p.saved} for p in layers]}
