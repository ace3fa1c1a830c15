"""A stage checkpoint written under one split of the model resumes under another, exactly."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from neuranet.pipeline.checkpoint import OPTIM, load_stage_state, stage_state, weights_only
from neuranet.pipeline.data import batches, load_dataset
from neuranet.pipeline.models import build_model
from neuranet.pipeline.stage import QueueChannel, StageConfig, StageRuntime

OPTIONS = {"hidden": 64, "depth": 6}


def one_process(steps: int) -> tuple[list[float], list[torch.Tensor]]:
    model = build_model("mlp-digits", 3, **OPTIONS)
    whole = model.sequential()
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    data = batches(load_dataset(model.dataset), 32, 5)
    losses = []
    for _ in range(steps):
        x, y = next(data)
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(4), y.chunk(4)):
            loss = model.loss_fn(whole(xm), ym) * (len(ym) / len(y))
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, [p.detach().clone() for p in whole.parameters()]


async def pipeline(cuts: list[tuple[int, int]], first: int, last: int, state: dict | None = None):
    model = build_model("mlp-digits", 3, **OPTIONS)
    links = [QueueChannel.pair() for _ in cuts[1:]]
    stages = []
    for i, (a, b) in enumerate(cuts):
        config = StageConfig(index=i, num_stages=len(cuts), layer_range=(a, b), num_microbatches=4,
                             optimizer="adamw", lr=1e-3)
        stage = StageRuntime(config, model.layers[a:b], prev=links[i - 1][1] if i else None,
                             next=links[i][0] if i < len(cuts) - 1 else None,
                             loss_fn=model.loss_fn if i == len(cuts) - 1 else None)
        if state is not None:
            load_stage_state(stage.layers, a, stage.optimizer, state)
        stages.append(stage)
    data = load_dataset(model.dataset)
    results = await asyncio.gather(*(s.train(itertools.islice(batches(data, 32, 5), first, None), last - first)
                                     for s in stages))
    saved: dict[str, torch.Tensor] = {}
    for stage, (a, _) in zip(stages, cuts):
        saved.update(stage_state(stage.layers, a, stage.optimizer))
    return results[-1], saved, [p.detach() for s in stages for p in s.layers.parameters()]


def test_adamw_run_resumed_on_a_different_split_matches_one_process() -> None:
    reference_losses, reference_params = one_process(10)
    before, state, _ = asyncio.run(pipeline([(0, 2), (2, 4), (4, 6)], 0, 5))
    assert any(k.startswith(OPTIM) and k.endswith(".exp_avg") for k in state)  # optimiser state travels
    after, _, params = asyncio.run(pipeline([(0, 3), (3, 6)], 5, 10, state))
    assert torch.allclose(torch.tensor(before + after), torch.tensor(reference_losses), rtol=1e-5, atol=1e-6)
    for got, want in zip(params, reference_params):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_weights_only_drops_optimiser_state() -> None:
    _, state, _ = asyncio.run(pipeline([(0, 6)], 0, 1))
    kept = weights_only(state)
    assert kept and not any(k.startswith(OPTIM) for k in kept)
    assert set(kept) == {f"{i}.{k}" for i, layer in enumerate(build_model("mlp-digits", 3, **OPTIONS).layers)
                         for k in layer.state_dict()}


def test_checkpoint_interval_follows_youngs_rule_and_availability() -> None:
    from neuranet.pipeline.checkpoint import checkpoint_interval

    # one device expected online 2 h, checkpoints cost 1 s, steps take 0.1 s: sqrt(2 * 1 * 7200) = 120 s = 1200 steps
    assert checkpoint_interval(0.1, 1.0, [7200.0], 100_000) == 1200
    # three such devices fail three times as often: sqrt(2 * 2400) = 69.3 s
    assert checkpoint_interval(0.1, 1.0, [7200.0] * 3, 100_000) == 693
    # less available devices -> more frequent checkpoints; never more than the run, never below one step
    assert checkpoint_interval(0.1, 1.0, [600.0], 100_000) < checkpoint_interval(0.1, 1.0, [7200.0], 100_000)
    assert checkpoint_interval(0.1, 1.0, [7200.0], 300) == 300
    assert checkpoint_interval(10.0, 0.01, [0.0], 300) == 1
    with pytest.raises(ValueError):
        checkpoint_interval(0.0, 1.0, [7200.0], 10)


# --- what the coordinator accepts of a stage's state -------------------------------------------


def _stage_state_bytes(model_name: str, options: dict, start: int, stop: int) -> tuple[int, int]:
    """(bytes of a stage's uploaded state after an AdamW step, its parameter bytes)."""
    from safetensors.torch import save

    model = build_model(model_name, 0, **options)
    layers = model.sequential()[start:stop]
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-3)
    for p in layers.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    params = sum(p.numel() * p.element_size() for p in layers.parameters())
    return len(save(stage_state(layers, start, opt))), params


@pytest.mark.parametrize("model_name,options,start,stop", [
    ("mlp-digits", OPTIONS, 0, 3), ("mlp-digits", OPTIONS, 3, 7), ("gpt-char", {}, 0, 2)])
def test_a_real_stage_state_fits_the_part_bound_of_its_parameters(model_name, options, start, stop) -> None:
    from neuranet.protocol.messages import STATE_PART_BYTES
    from neuranet.server.runs import max_state_parts

    state, params = _stage_state_bytes(model_name, options, start, stop)
    assert state <= max_state_parts(params, stop - start) * STATE_PART_BYTES


def test_the_part_bound_covers_the_header_of_a_stage_of_many_small_layers() -> None:
    from safetensors.torch import save

    from neuranet.protocol.messages import STATE_PART_BYTES
    from neuranet.server.runs import max_state_parts

    layers = torch.nn.Sequential(*[torch.nn.LayerNorm(4) for _ in range(4000)])
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-3)
    for p in layers.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = len(save(stage_state(layers, 0, opt)))
    params = sum(p.numel() * p.element_size() for p in layers.parameters())
    assert state > max_state_parts(params, 0) * STATE_PART_BYTES  # the header, not the numbers, is most of it
    assert state <= max_state_parts(params, len(layers)) * STATE_PART_BYTES


class _Book:
    """A run book holding one run of two stages, on dev-a and dev-b, fed StageWeights as agents send them
    (a real store and blob store; no agents)."""

    @classmethod
    async def make(cls, root, checkpoint_every: int = 5, steps: int = 10) -> "_Book":
        from neuranet.server.blobs import BlobStore
        from neuranet.server.fleet import Fleet
        from neuranet.server.hub import AgentConnection
        from neuranet.api_requests import RunRequest
        from neuranet.server.runs import RunBook, RunState
        from neuranet.server.store import Store

        async def nothing(*_args) -> None:
            return None

        b = cls()
        root.mkdir(parents=True, exist_ok=True)
        b.store = Store(f"sqlite+aiosqlite:///{root / 'db.sqlite'}")
        await b.store.migrate()
        user, _ = await b.store.users.create_user("u")
        b.blob_root = root / "blobs"
        b.book = RunBook(Fleet({}), b.store, None, await BlobStore(b.blob_root).open())
        stages = [{"device": "dev-a", "start": 0, "stop": 2, "param_bytes": 4000},
                  {"device": "dev-b", "start": 2, "stop": 4, "param_bytes": 4000}]
        run_id = await b.store.runs.create_run(user.user_id, "train", [], state="running", spec={})
        b.run = RunState(run_id, user.user_id, RunRequest(model="mlp-digits", steps=steps), stages, "plan",
                         checkpoint_every=checkpoint_every)
        b.book.runs[run_id] = b.run
        b.conns = {d: AgentConnection(d, "user", nothing, nothing, 1 << 20) for d in ("dev-a", "dev-b")}
        return b

    async def send(self, stage: int, step: int, part: int = 0, parts: int = 1, payload: bytes = b"x" * 100) -> None:
        from neuranet.protocol import messages as m

        msg = m.StageWeights(run_id=self.run.id, stage=stage, step=step, attempt=self.run.attempt, part=part, parts=parts)
        await self.book.on_message(self.conns[["dev-a", "dev-b"][stage]], msg, payload)

    def stored_bytes(self) -> int:
        root = self.blob_root
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0

    async def close(self) -> None:
        await self.book.close()
        await self.store.close()


async def test_checkpoints_are_kept_for_due_steps_and_only_the_newest(tmp_path) -> None:
    b = await _Book.make(tmp_path)
    for stage in (0, 1):
        await b.send(stage, 5)
    assert b.run.checkpoints == {5: 0} and not b.run.errors
    five = b.stored_bytes()
    for stage in (0, 1):
        await b.send(stage, 10, 0, 2, b"y" * 2**20)
        await b.send(stage, 10, 1, 2, b"z" * 10 + bytes([stage]))
    assert b.run.checkpoints == {10: 0} and not b.run.errors  # step 5 was dropped: 10 resumes anything
    assert b.stored_bytes() == 2 * (2**20 + 11) and five == 100  # both stages sent the same 100 bytes: one blob
    assert (await b.store.runs.checkpoint(b.run.id)).step == 10
    await b.close()


@pytest.mark.parametrize("bad,why", [
    (dict(step=3), "checkpoints every 5 steps and after step 10"),  # not a checkpoint step
    (dict(step=15), "checkpoints every 5 steps"),  # past the run's end
    (dict(step=0), "checkpoints every 5 steps"),
    (dict(parts=1000), "fits in 2 part(s)"),  # more parts than the stage's parameters can fill
    (dict(part=3, parts=2), "part 3 of 2"),
    (dict(part=1, parts=2), "out of order"),
    (dict(payload=b"x" * (2**20 + 1)), "more state"),
])
async def test_state_parts_beyond_what_the_run_needs_are_refused_unwritten(tmp_path, bad, why) -> None:
    b = await _Book.make(tmp_path)
    await b.send(0, **{"step": 5, **bad})
    assert why in b.run.errors.get(0, ""), b.run.errors
    assert b.stored_bytes() == 0 and b.run.status == "failed"
    assert (await b.store.runs.get(b.run.id)).state == "failed"
    await b.close()


async def test_a_stage_cannot_resend_a_step_or_change_its_part_count(tmp_path) -> None:
    b = await _Book.make(tmp_path)
    await b.send(0, 5)
    await b.send(0, 5)
    assert "twice" in b.run.errors[0]
    await b.close()
    b = await _Book.make(tmp_path / "2")
    await b.send(0, 5, 0, 2, b"x" * 2**20)
    await b.send(0, 5, 1, 1)
    assert "changed the part count" in b.run.errors[0]
    await b.close()


async def test_nothing_is_written_for_a_run_that_has_ended(tmp_path) -> None:
    from neuranet.protocol import messages as m

    b = await _Book.make(tmp_path, checkpoint_every=0, steps=10)
    for stage in (0, 1):
        await b.send(stage, 10)
        await b.book.on_message(b.conns[["dev-a", "dev-b"][stage]], m.StageDone(run_id=b.run.id, stage=stage, attempt=b.run.attempt, ok=True), b"")
    assert b.run.status == "finished"
    before = b.stored_bytes()
    for step in range(1, 80):  # a flood after the end (80 MiB got through before these bounds)
        await b.send(0, step, 0, 1, b"x" * 2**20)
    assert b.stored_bytes() == before and b.run.status == "finished"
    await b.close()


async def test_a_stage_has_one_state_in_flight_and_its_counters_go_when_it_ends(tmp_path) -> None:
    b = await _Book.make(tmp_path, checkpoint_every=5, steps=20)
    await b.send(0, 5, 0, 2, b"x" * 2**20)  # step 5 begun, not ended
    await b.send(0, 10, 0, 1)  # a second state opened meanwhile: refused, the run fails, nothing stays open
    assert "before ending the one after step 5" in b.run.errors[0] and b.run.status == "failed"
    assert b.run.writers == {} and b.stored_bytes() == 0
    await b.close()
    b = await _Book.make(tmp_path / "2", checkpoint_every=5, steps=20)
    for stage in (0, 1):
        await b.send(stage, 5)
    assert b.run.checkpoints == {5: 0} and (b.run.parts, b.run.part_counts, b.run.part_bytes, b.run.writers) == ({}, {}, {}, {})
    await b.send(1, 5)  # a step already in a whole checkpoint, resent after its counters went
    assert "twice" in b.run.errors[1] and b.run.checkpoints == {5: 0}
    await b.close()


async def test_a_state_the_coordinator_cannot_store_fails_the_run_saying_so(tmp_path, monkeypatch) -> None:
    b = await _Book.make(tmp_path)
    from neuranet.server.blobs import BlobWriter

    async def full(self, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BlobWriter, "write", full)
    await b.send(0, 5)
    assert "could not store stage 0's state" in b.run.errors[0] and "No space left" in b.run.errors[0]
    assert b.run.writers == {} and b.run.status == "failed"
    await b.close()


async def test_reports_after_the_run_ended_change_nothing(tmp_path) -> None:
    from neuranet.protocol import messages as m

    b = await _Book.make(tmp_path, checkpoint_every=0, steps=10)
    for stage in (0, 1):
        await b.send(stage, 10)
        await b.book.on_message(b.conns[["dev-a", "dev-b"][stage]],
                                m.StageDone(run_id=b.run.id, stage=stage, attempt=0, ok=True), b"")
    assert b.run.status == "finished"
    late = m.StageDone(run_id=b.run.id, stage=0, attempt=0, ok=False, error="LinkClosed", link_failed=True)
    await b.book.on_message(b.conns["dev-a"], late, b"")
    await b.book.on_message(b.conns["dev-a"], m.StageDone(run_id=b.run.id, stage=0, attempt=0, ok=False, error="x"), b"")
    assert b.run.status == "finished" and b.run.recovery is None and not b.run.relink and not b.run.errors
    await b.close()
