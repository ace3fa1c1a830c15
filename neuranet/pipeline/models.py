"""Allowlisted model factories whose models are a plain sequence of layers a pipeline can cut.

A :class:`LayerModel` is an ordered list of ``nn.Module`` layers, each mapping
one tensor to one tensor: the first takes the input batch, the last produces
logits. A stage of a pipeline runs ``layers[start:stop]``; running all of them
in order is the whole model. Layers never share parameters (no weight tying)
so that every parameter lives on exactly one stage.

Only the factories in :data:`MODELS` can be built by name, which is what a
device that accepts work from others uses. :func:`load_user_model` imports a
file of the user's own, for devices the same user owns: it runs their code.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuranet.pipeline import pretrained
from neuranet.pipeline.data import CHAR_VOCAB, DIGIT_CLASSES, DIGIT_PIXELS, UnknownName, batches, encode, load_dataset

LossFn = Callable[[Tensor, Tensor], Tensor]
Encoder = Callable[[Sequence[Any]], Tensor]


class UnknownModel(UnknownName):
    """A model name that is not in the registry."""

    kind = "model"


class ModelConfigError(ValueError):
    """Options that the chosen model factory does not accept."""


class UserModelError(Exception):
    """A user's model file that cannot be loaded or does not build a LayerModel."""


def float_rows(inputs: Sequence[Any]) -> Tensor:
    """Inference inputs given as rows of numbers -> a float32 batch."""
    try:
        return torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"inputs must be a list of equal-length rows of numbers: {e}") from None


def char_rows(inputs: Sequence[Any]) -> Tensor:
    """Inference inputs given as strings of equal length -> a batch of character ids."""
    if not inputs or not all(isinstance(t, str) and t for t in inputs) or len({len(t) for t in inputs}) != 1:
        raise ValueError("inputs must be a list of non-empty strings of equal length")
    return torch.stack([encode(t) for t in inputs])


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position: (B, C) or (B, T, C) logits."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@dataclass(eq=False)
class LayerModel:
    """Ordered layers, their names, the loss on the last layer's output, the data it trains on, and how
    inference inputs (JSON values: rows of numbers, strings) become its input batch."""

    layers: list[nn.Module]
    names: list[str]
    loss_fn: LossFn = cross_entropy
    dataset: str = ""  # a name for neuranet.pipeline.data.load_dataset; "" for an inference-only model
    data_options: Mapping[str, object] = field(default_factory=dict)
    encode: Encoder = float_rows
    examples: Sequence[Any] = ()  # inference inputs to profile an inference-only model with

    def __post_init__(self) -> None:
        if not self.layers or len(self.layers) != len(self.names):
            raise ValueError("a LayerModel needs at least one layer and one name per layer")
        if not all(isinstance(layer, nn.Module) for layer in self.layers):
            raise TypeError("every layer of a LayerModel must be a torch.nn.Module")

    def __len__(self) -> int:
        return len(self.layers)

    def stage(self, start: int, stop: int) -> nn.Sequential:
        """Layers [start, stop) as one module; it shares their parameters."""
        if not 0 <= start < stop <= len(self.layers):
            raise ValueError(f"layer range [{start}, {stop}) is not inside [0, {len(self.layers)})")
        return nn.Sequential(*self.layers[start:stop])

    def sequential(self) -> nn.Sequential:
        """The whole model as one module sharing the layers' parameters."""
        return self.stage(0, len(self.layers))

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from layer.parameters()

    @property
    def trainable(self) -> bool:
        return bool(self.dataset)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """A batch of ``n`` inputs to profile the layers with: from the training data, else the examples."""
        if self.dataset:
            return next(batches(load_dataset(self.dataset, **self.data_options), n, seed))[0]
        return self.encode([self.examples[i % len(self.examples)] for i in range(n)])


class ModelFactory(Protocol):
    def __call__(self, seed: int, **config: object) -> LayerModel: ...


def _seeded(build: Callable[..., LayerModel]) -> Callable[..., LayerModel]:
    """Run a factory with the global RNG seeded, without disturbing the caller's RNG state."""

    def factory(seed: int, **config: object) -> LayerModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(**config)

    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("seed", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + list(inspect.signature(build).parameters.values())
    )
    factory.__doc__ = build.__doc__
    return factory


# --- digits classifiers --------------------------------------------------------------


@_seeded
def mlp_digits(*, hidden: int = 128, depth: int = 3) -> LayerModel:
    """MLP on 8x8 digits: ``depth - 1`` Linear+ReLU layers, then a Linear head."""
    if depth < 1 or hidden < 1:
        raise ModelConfigError("mlp-digits needs depth >= 1 and hidden >= 1")
    widths = [DIGIT_PIXELS] + [hidden] * (depth - 1)
    layers: list[nn.Module] = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])]
    layers.append(nn.Linear(widths[-1], DIGIT_CLASSES))
    names = [f"fc.{i}" for i in range(depth - 1)] + ["head"]
    return LayerModel(layers, names, cross_entropy, "digits")


@_seeded
def cnn_digits(*, channels: int = 16, hidden: int = 64) -> LayerModel:
    """Small CNN on 8x8 digits: two conv layers, a hidden fully connected layer, a head."""
    c = channels
    layers: list[nn.Module] = [
        nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 4 * 4, hidden), nn.ReLU()),
        nn.Linear(hidden, DIGIT_CLASSES),
    ]
    return LayerModel(layers, ["conv.0", "conv.1", "fc", "head"], cross_entropy, "digits")


# --- nanoGPT-style character transformer ---------------------------------------------


class Embedding(nn.Module):
    """Token plus learned position embeddings: (B, T) ids -> (B, T, C)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final layernorm and the projection to vocabulary logits."""

    def __init__(self, n_embd: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.out = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


def _gpt_init(module: nn.Module, n_layer: int) -> None:
    """nanoGPT's init: N(0, 0.02), residual projections scaled down by depth."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)


@_seeded
def gpt_char(
    *, vocab_size: int = len(CHAR_VOCAB), block_size: int = 64, n_layer: int = 4, n_head: int = 4, n_embd: int = 128
) -> LayerModel:
    """Character transformer: embedding, ``n_layer`` blocks, layernorm+head; no dropout."""
    if n_embd % n_head:
        raise ModelConfigError(f"gpt-char: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    layers: list[nn.Module] = [Embedding(vocab_size, block_size, n_embd)]
    layers += [Block(n_embd, n_head) for _ in range(n_layer)]
    layers.append(Head(n_embd, vocab_size))
    for layer in layers:
        _gpt_init(layer, n_layer)
    names = ["embed"] + [f"block.{i}" for i in range(n_layer)] + ["head"]
    return LayerModel(layers, names, cross_entropy, "stdlib-chars", {"block_size": block_size}, char_rows)


@_seeded
def all_minilm_l6_v2() -> LayerModel:
    """Pretrained sentence embeddings (sentence-transformers/all-MiniLM-L6-v2); inputs are texts. Inference only."""
    layers, names = pretrained.all_minilm_l6_v2()
    return LayerModel(layers, names, encode=pretrained.tokenize, examples=pretrained.EXAMPLE_TEXTS)


MODELS: dict[str, Callable[..., LayerModel]] = {
    "mlp-digits": mlp_digits,
    "cnn-digits": cnn_digits,
    "gpt-char": gpt_char,
    "all-minilm-l6-v2": all_minilm_l6_v2,
}


def build_model(name: str, seed: int, **config: object) -> LayerModel:
    """Build an allowlisted model; the same name, seed and config give identical weights."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise UnknownModel(name, sorted(MODELS)) from None
    signature = inspect.signature(factory)
    try:
        signature.bind(seed, **config)
    except TypeError as e:
        options = [p for p in signature.parameters if p != "seed"]
        raise ModelConfigError(f"{name}: {e}; accepted options: {', '.join(options)}") from None
    return factory(seed, **config)


def load_user_model(path: str | Path, seed: int = 0) -> LayerModel:
    """Import ``path`` and return its ``build(seed)``.

    This executes the file's code with this process's rights: use it only for
    models on devices that the same user owns, never for work from others.
    """
    path = Path(path)
    if not path.is_file():
        raise UserModelError(f"user model file {str(path)!r} does not exist")
    module_name = f"neuranet_user_model_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserModelError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserModelError(f"importing {str(path)!r} failed: {e!r}") from e
    build = getattr(module, "build", None)
    if not callable(build):
        raise UserModelError(f"{str(path)!r} must define build(seed) -> LayerModel")
    model = build(seed)
    if not isinstance(model, LayerModel):
        raise UserModelError(f"build(seed) in {str(path)!r} returned {type(model).__name__}, not a LayerModel")
    return model
