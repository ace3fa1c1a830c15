"""Datasets that need no download, and the deterministic batch order every run of a model sees.

* ``digits``: the 1797 8x8 handwritten digits of scikit-learn, shipped inside
  the package as ``data/digits.npz`` (uint8 pixels 0..16 and labels 0..9).
  scikit-learn is not a dependency: the file was exported once with
  ``sklearn.datasets.load_digits``. scikit-learn is BSD-3-Clause licensed
  (Copyright (c) 2007-2024 The scikit-learn developers); the data is the UCI
  "Optical Recognition of Handwritten Digits" test set it redistributes.
* ``stdlib-chars``: characters of this interpreter's standard library ``.py``
  sources, read in a fixed order. The text depends on the Python version, so
  every device feeding or scoring one run must run the same version (the
  vocabulary is fixed and does not).

``batches`` draws from a ``torch.Generator`` seeded by the caller, so a
pipeline's first and last stages and a single-process run get the same batches.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

DIGITS_FILE = Path(__file__).parent / "data" / "digits.npz"
DIGIT_PIXELS = 64
DIGIT_CLASSES = 10

# Fixed so that a model's shape never depends on which files a machine has:
# tab, newline, printable ASCII, and one symbol for every other character.
UNKNOWN_CHAR = "\ufffd"
CHAR_VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127)) + UNKNOWN_CHAR
DEFAULT_CORPUS_CHARS = 2_000_000
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class UnknownName(LookupError):
    """A name that is not on an allowlist (models, datasets); says which names are."""

    kind = "name"

    def __init__(self, name: str, allowed: list[str]) -> None:
        super().__init__(f"unknown {self.kind} {name!r}; allowed {self.kind}s: {', '.join(allowed)}")
        self.name = name
        self.allowed = allowed


class UnknownDataset(UnknownName):
    kind = "dataset"


class Dataset(Protocol):
    """Numbered examples that can be gathered into a batch."""

    def __len__(self) -> int: ...

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True, eq=False)
class Examples:
    """Paired input and target rows, e.g. images and labels."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[indices], self.targets[indices]


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """Token ids of a text; example ``i`` is the window at offset ``i`` and the same window shifted by one."""

    tokens: Tensor  # int64, one id per character
    block_size: int

    def __post_init__(self) -> None:
        if len(self.tokens) <= self.block_size:
            raise ValueError(f"a corpus of {len(self.tokens)} characters has no window of {self.block_size} + 1")

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        window = indices[:, None] + torch.arange(self.block_size + 1)
        chunk = self.tokens[window]
        return chunk[:, :-1], chunk[:, 1:]


# --- digits --------------------------------------------------------------------------


@cache
def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_FILE) as f:
        return f["images"], f["labels"]


def load_digits() -> Examples:
    """All 1797 digits: float32 pixels scaled to [0, 1], shape (N, 64); int64 labels."""
    images, labels = _digit_arrays()
    inputs = torch.from_numpy(images.astype(np.float32) / 16.0)
    return Examples(inputs, torch.from_numpy(labels.astype(np.int64)))


# --- standard library characters -----------------------------------------------------


def stdlib_sources(root: str | Path | None = None) -> Iterator[Path]:
    """Standard library ``.py`` files, directories walked in sorted order, installed packages skipped."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def stdlib_text(max_chars: int = DEFAULT_CORPUS_CHARS, root: str | Path | None = None) -> str:
    """The first ``max_chars`` characters of the standard library sources, files joined in order."""
    parts: list[str] = []
    total = 0
    for path in stdlib_sources(root):
        # A few test files are deliberately not UTF-8; replacing keeps the order fixed.
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "".join(parts)


_CHAR_IDS = np.full(128, len(CHAR_VOCAB) - 1, dtype=np.int64)
_CHAR_IDS[[ord(c) for c in CHAR_VOCAB[:-1]]] = np.arange(len(CHAR_VOCAB) - 1)


def encode(text: str) -> Tensor:
    """Character ids in CHAR_VOCAB; characters outside it become UNKNOWN_CHAR."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.where(codes < 128, _CHAR_IDS[np.minimum(codes, 127)], len(CHAR_VOCAB) - 1)
    return torch.from_numpy(ids)


def decode(ids: Tensor) -> str:
    return "".join(CHAR_VOCAB[i] for i in ids.tolist())


def stdlib_corpus(block_size: int = 64, max_chars: int = DEFAULT_CORPUS_CHARS) -> CharCorpus:
    """Windows of ``block_size`` characters over the standard library sources."""
    return CharCorpus(encode(stdlib_text(max_chars)), block_size)


DATASETS = {"digits": load_digits, "stdlib-chars": stdlib_corpus}
DATASET_ALIASES = {"stdlib": "stdlib-chars"}


def dataset_name(name: str) -> str:
    """The registry name for what a user typed (``stdlib`` is ``stdlib-chars``); unknown names raise."""
    name = DATASET_ALIASES.get(name, name)
    if name not in DATASETS:
        raise UnknownDataset(name, sorted(DATASETS) + sorted(DATASET_ALIASES))
    return name


def load_dataset(name: str, **options: object) -> Dataset:
    """A dataset by the name a LayerModel gives (``model.dataset``, ``**model.data_options``)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise UnknownDataset(name, sorted(DATASETS)) from None
    return loader(**options)  # type: ignore[operator]


def batches(dataset: Dataset, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) batches in an order fixed by ``seed``: a fresh shuffle each epoch.

    Only full batches, so every step has the same shape. ``epochs=None`` runs
    forever; take what you need with ``itertools.islice``.
    """
    if not 1 <= batch_size <= len(dataset):
        raise ValueError(f"batch_size must be between 1 and the dataset's {len(dataset)} examples")
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(dataset), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield dataset.take(order[start : start + batch_size])
        epoch += 1
