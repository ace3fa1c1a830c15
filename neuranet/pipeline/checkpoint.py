"""A stage's training state as named tensors: weights and optimiser state, keyed by global layer.

Keys name the whole model's layer (``"<layer>.<param>"``, optimiser state under
``"optim.<layer>.<param>.<slot>"``), not the stage, so a checkpoint written by one split of the model
can be loaded into another split after a device was lost and the run was re-planned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIM = "optim."


def _named_params(layers: nn.Sequential, start: int) -> list[tuple[str, nn.Parameter]]:
    return [(f"{start + i}.{name}", p) for i, layer in enumerate(layers) for name, p in layer.named_parameters()]


def stage_state(layers: nn.Sequential, start: int, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    state = {f"{start + i}.{k}": v.detach().cpu().contiguous()
             for i, layer in enumerate(layers) for k, v in layer.state_dict().items()}
    if optimizer is not None:
        for name, p in _named_params(layers, start):
            for slot, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    state[f"{OPTIM}{name}.{slot}"] = value.detach().cpu().contiguous()
    return state


def load_stage_state(layers: nn.Sequential, start: int, optimizer: torch.optim.Optimizer | None,
                     state: dict[str, torch.Tensor]) -> None:
    """Load this stage's layers (and optimiser slots) from a whole-model checkpoint."""
    for i, layer in enumerate(layers):
        prefix = f"{start + i}."
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        layer.load_state_dict(mine)
    if optimizer is None:
        return
    for name, p in _named_params(layers, start):
        slots = {k[len(OPTIM) + len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{OPTIM}{name}.")}
        if slots:
            optimizer.state[p] = {slot: (v if slot == "step" else v.to(p.device)).clone() for slot, v in slots.items()}


def weights_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(OPTIM)}


def checkpoint_interval(step_time: float, checkpoint_cost: float, expected_online: list[float], steps: int) -> int:
    """Steps between checkpoints that minimise expected lost plus checkpointing time (Young's rule).

    A run fails when its first device leaves; with each device's expected remaining online time
    ``E_i`` taken as the mean of an exponential, the run's mean time to failure is ``1 / sum(1 / E_i)``.
    Young's optimal interval is ``sqrt(2 * cost * MTTF)`` seconds, here in steps of ``step_time``,
    at least 1 and at most the run's length.
    """
    if step_time <= 0 or checkpoint_cost < 0 or steps < 1 or not expected_online:
        raise ValueError("need a positive step time, a non-negative checkpoint cost, steps >= 1 and one device")
    rate = sum(1.0 / max(e, 1.0) for e in expected_online)
    seconds = math.sqrt(2.0 * max(checkpoint_cost, step_time * 1e-3) / rate)
    return max(1, min(steps, round(seconds / step_time)))
