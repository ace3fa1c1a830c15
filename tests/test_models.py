"""Model registry, shipped datasets, batch order and per-layer profiles for pipelines."""

from __future__ import annotations

import itertools
import textwrap

import numpy as np
import pytest
import torch

from neuranet.pipeline.data import (
    CHAR_VOCAB,
    DIGITS_FILE,
    CharCorpus,
    batches,
    decode,
    encode,
    load_dataset,
    load_digits,
    stdlib_corpus,
    stdlib_text,
)
from neuranet.pipeline.models import (
    MODELS,
    LayerModel,
    ModelConfigError,
    UnknownModel,
    UserModelError,
    build_model,
    load_user_model,
)
from neuranet.pipeline.profile_layers import profile_layers

# Small enough that every test runs in well under a second.
TINY = {
    "mlp-digits": {"hidden": 32, "depth": 3},
    "cnn-digits": {"channels": 8, "hidden": 32},
    "gpt-char": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32},
}
CORPUS_CHARS = 50_000


def tiny(name: str, seed: int = 0) -> LayerModel:
    return build_model(name, seed, **TINY[name])


def data_for(model: LayerModel):
    options = dict(model.data_options)
    if model.dataset == "stdlib-chars":
        options["max_chars"] = CORPUS_CHARS
    return load_dataset(model.dataset, **options)


def sample(model: LayerModel, batch_size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return next(batches(data_for(model), batch_size, seed))


TRAINABLE = ["cnn-digits", "gpt-char", "mlp-digits"]


def test_registry_holds_the_builtins() -> None:
    assert sorted(MODELS) == ["all-minilm-l6-v2", *TRAINABLE]
    assert [n for n in sorted(MODELS) if build_model(n, 0).trainable] == TRAINABLE


def test_pretrained_minilm_cut_anywhere_gives_the_whole_models_embeddings() -> None:
    model = build_model("all-minilm-l6-v2", 0)
    x = model.encode(["a short one", "and a rather longer sentence to pad the first", ""])
    assert x.shape[:2] == (3, 2) and x.dtype == torch.int64
    with torch.inference_mode():
        whole = model.sequential()(x)
        h = x
        for i in range(len(model)):
            h = model.stage(i, i + 1)(h.clone())
    assert whole.shape == (3, 384)
    torch.testing.assert_close(h, whole)
    torch.testing.assert_close(whole.norm(dim=1), torch.ones(3))  # normalised sentence embeddings
    profiles = profile_layers(model, model.sample(4))
    assert [p.name for p in profiles] == model.names
    assert sum(p.param_bytes for p in profiles) == 4 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.encode([1, 2])


@pytest.mark.parametrize("name", TRAINABLE)
def test_same_seed_gives_identical_parameters(name: str) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = tiny(name, 7), tiny(name, 7), tiny(name, 8)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not disturb the caller's RNG"
    pa, pb, pc = list(a.parameters()), list(b.parameters()), list(c.parameters())
    assert len(pa) == len(pb) > 0
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, z) for x, z in zip(pa, pc))


@pytest.mark.parametrize("name", TRAINABLE)
def test_stages_chained_equal_one_sequential(name: str) -> None:
    """Cut at every boundary, pass detached activations and gradients by hand, as a pipeline does."""
    x, y = sample(tiny(name))
    whole, split = tiny(name, 3), tiny(name, 3)
    n = len(split)
    assert n >= 3

    whole_loss = whole.loss_fn(whole.sequential()(x), y)
    whole_loss.backward()

    inputs, outputs = [], []
    h = x
    for i in range(n):
        h = h.detach().requires_grad_(h.is_floating_point())
        inputs.append(h)
        h = split.stage(i, i + 1)(h)
        outputs.append(h)
    split_loss = split.loss_fn(outputs[-1], y)
    split_loss.backward()
    for i in reversed(range(n - 1)):
        outputs[i].backward(inputs[i + 1].grad)

    torch.testing.assert_close(split_loss, whole_loss)
    for p, q in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_few_optimiser_steps_reduce_the_loss(name: str) -> None:
    model = tiny(name)
    net = model.sequential()
    data = data_for(model)
    x_eval, y_eval = next(batches(data, 64, seed=99))
    with torch.no_grad():
        before = model.loss_fn(net(x_eval), y_eval).item()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for x, y in itertools.islice(batches(data, 32, seed=1), 20):
        opt.zero_grad()
        model.loss_fn(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = model.loss_fn(net(x_eval), y_eval).item()
    assert after < 0.8 * before, (before, after)


def test_unknown_model_lists_the_allowed_names() -> None:
    with pytest.raises(UnknownModel) as info:
        build_model("resnet-152", 0)
    assert info.value.allowed == sorted(MODELS)
    for name in MODELS:
        assert name in str(info.value)


def test_unaccepted_option_names_the_accepted_ones() -> None:
    with pytest.raises(ModelConfigError, match="n_layer"):
        build_model("gpt-char", 0, layers=3)


def test_digits_ship_inside_the_package() -> None:
    assert DIGITS_FILE.stat().st_size < 100_000
    with np.load(DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (1797, 64) and images.dtype == np.uint8
    assert labels.shape == (1797,) and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    digits = load_digits()
    assert digits.inputs.shape == (1797, 64) and digits.inputs.dtype == torch.float32
    assert 0.0 <= digits.inputs.min() and digits.inputs.max() == 1.0
    assert digits.targets.dtype == torch.int64 and digits.targets[:10].tolist() == list(range(10))


def test_stdlib_corpus_is_deterministic_and_capped() -> None:
    text = stdlib_text(CORPUS_CHARS)
    assert len(text) == CORPUS_CHARS
    assert text == stdlib_text(CORPUS_CHARS)
    assert stdlib_text(CORPUS_CHARS // 2) == text[: CORPUS_CHARS // 2]
    a, b = stdlib_corpus(16, CORPUS_CHARS), stdlib_corpus(16, CORPUS_CHARS)
    assert torch.equal(a.tokens, b.tokens)
    assert int(a.tokens.max()) < len(CHAR_VOCAB)


def test_char_vocabulary_round_trips_ascii_and_marks_the_rest() -> None:
    assert decode(encode("def f(x):\n\treturn x ~ 1")) == "def f(x):\n\treturn x ~ 1"
    assert decode(encode("é\r")) == CHAR_VOCAB[-1] * 2


def test_corpus_targets_are_inputs_shifted_by_one() -> None:
    corpus = CharCorpus(torch.arange(100), block_size=5)
    assert len(corpus) == 95
    x, y = corpus.take(torch.tensor([0, 94]))
    assert x.tolist() == [[0, 1, 2, 3, 4], [94, 95, 96, 97, 98]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [95, 96, 97, 98, 99]]


def test_batches_follow_the_seed() -> None:
    digits = load_digits()

    def first(seed: int, n: int = 5) -> list[torch.Tensor]:
        return [y for _, y in itertools.islice(batches(digits, 100, seed), n)]

    assert all(torch.equal(p, q) for p, q in zip(first(1), first(1)))
    assert not all(torch.equal(p, q) for p, q in zip(first(1), first(2)))
    one_epoch = list(batches(digits, 100, seed=1, epochs=1))
    assert len(one_epoch) == 17  # full batches only
    labels = torch.cat([y for _, y in one_epoch])
    assert len(set(labels.tolist())) == 10
    # The next epoch is a fresh shuffle, not a repeat.
    two = [y for _, y in batches(digits, 100, seed=1, epochs=2)]
    assert not torch.equal(two[0], two[17])


@pytest.mark.parametrize("name", TRAINABLE)
def test_profile_has_one_entry_per_layer_and_sums_to_the_parameters(name: str) -> None:
    model = tiny(name)
    x, _ = sample(model, batch_size=4)
    profiles = profile_layers(model, x)
    assert [p.name for p in profiles] == model.names
    assert all(p.activation_bytes > 0 and p.param_bytes > 0 and p.saved > 0 for p in profiles)
    assert sum(p.param_bytes for p in profiles) == 4 * sum(p.numel() for p in model.parameters())
    assert all(p.flops > 0 for p in profiles[1:])
    # Per sample: a bigger batch gives the same numbers (saved tensors that do
    # not grow with the batch, like position ids, are spread over it).
    x8, _ = sample(model, batch_size=8)
    for p, q in zip(profile_layers(model, x8), profiles, strict=True):
        assert (p.flops, p.activation_bytes, p.param_bytes) == (q.flops, q.activation_bytes, q.param_bytes)
        assert abs(p.saved - q.saved) <= 0.15 * q.saved
    # The last layer's output is the logits.
    logits = model.sequential()(x)
    assert profiles[-1].activation_bytes * x.shape[0] == logits.numel() * 4


def test_transformer_block_flops_include_attention() -> None:
    cfg = TINY["gpt-char"]
    model = tiny("gpt-char")
    x, _ = sample(model, batch_size=2)
    block = profile_layers(model, x)[1]
    T, C = cfg["block_size"], cfg["n_embd"]
    linear = 2 * T * (C * 3 * C + C * C + 2 * C * 4 * C)
    attention = 2 * 2 * T * T * C  # scores and weighted sum
    assert block.flops == linear + attention


def test_user_model_file_builds(tmp_path) -> None:
    path = tmp_path / "mine.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from neuranet.pipeline.models import LayerModel

            def build(seed):
                torch.manual_seed(seed)
                return LayerModel([torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)], ["a", "b"])
            """
        )
    )
    a, b = load_user_model(path, seed=5), load_user_model(path, seed=5)
    assert len(a) == 2 and a.names == ["a", "b"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_user_model_file_without_build_is_refused(tmp_path) -> None:
    path = tmp_path / "nobuild.py"
    path.write_text("x = 1\n")
    with pytest.raises(UserModelError, match="build"):
        load_user_model(path)
    with pytest.raises(UserModelError, match="does not exist"):
        load_user_model(tmp_path / "missing.py")
