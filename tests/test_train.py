"""Training one model across three real agent processes gives the weights one process would."""

from __future__ import annotations

import re
import time

import pytest
import torch
from safetensors.torch import load

from fabric_helpers import free_port
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric
from neuranet.pipeline.data import batches, load_dataset
from neuranet.pipeline.models import build_model

pytestmark = pytest.mark.slow
AGENTS = ["s0", "s1", "s2"]
RUN = dict(model="mlp-digits", steps=6, batch_size=32, microbatches=4, schedule="1f1b", optimizer="sgd",
           lr=0.2, seed=7, data_seed=11, model_options={"hidden": 512, "depth": 6})


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("train")) as f:
        f.start_server(port=free_port())
        for name in AGENTS:  # s1's owner does not allow model files there
            owner_code = ["--allow-owner-code"] if name != "s1" else []
            f.start_agent(name, extra=["--listen-host", "127.0.0.1", "--no-measure", *owner_code])
        f.wait_online(AGENTS)
        yield f


def one_process(run: dict, model=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = model or build_model(run["model"], run["seed"], **run["model_options"])
    whole = model.sequential()
    opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[run["optimizer"]](whole.parameters(), lr=run["lr"])
    data = batches(load_dataset(model.dataset, **model.data_options), run["batch_size"], run["data_seed"])
    losses = []
    for _ in range(run["steps"]):
        x, y = next(data)
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(run["microbatches"]), y.chunk(run["microbatches"])):  # gradient accumulation
            loss = model.loss_fn(whole(xm), ym) * (len(ym) / len(y))
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    state = {f"{i}.{k}": v for i, layer in enumerate(model.layers) for k, v in layer.state_dict().items()}
    return losses, state


def wait_finished(client, run_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.run(run_id)
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, f"run still running: {run}"
        time.sleep(0.2)


def test_pipeline_across_three_agents_matches_one_process(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        started = c.start_run(devices=AGENTS, use_all_devices=True, **RUN)
        run = wait_finished(c, started["id"])
        assert run["status"] == "finished", run
        weights = load(c.run_weights(run["id"]))
    assert len(run["stages"]) == 3  # really split across the three devices
    assert [s["start"] for s in run["stages"]][0] == 0 and run["stages"][-1]["stop"] == 6
    losses, state = one_process(RUN)
    assert torch.allclose(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert weights.keys() == state.keys()
    for key, value in state.items():
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-6), key


def test_bad_run_requests_get_clear_errors(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        with pytest.raises(ClientError, match="unknown model 'resnet-9000'"):
            c.start_run(**{**RUN, "model": "resnet-9000"})
        with pytest.raises(ClientError, match="GiB of parameters"):  # sized without being built
            c.start_run(**{**RUN, "model_options": {"hidden": 100_000, "depth": 4}})
        with pytest.raises(ClientError, match="accepted options: hidden, depth"):
            c.start_run(**{**RUN, "model_options": {"wings": 2}})
        with pytest.raises(ClientError, match="mlp-digits trains on 'digits', not 'stdlib'"):
            c.start_run(**{**RUN, "data": "stdlib"})
        with pytest.raises(ClientError, match="unknown dataset 'imagenet'"):
            c.start_run(**{**RUN, "data": "imagenet"})
        with pytest.raises(ClientError, match="only 3 of yours are online"):
            c.start_run(**{**RUN, "devices": 5})
        other = c.create_user("stranger")
    with fabric.client(other["token"]) as c2:
        with pytest.raises(ClientError, match="no device 's0' among your devices"):
            c2.start_run(**{**RUN, "devices": ["s0"]})


def test_cli_train_then_fetch(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["train", "--model", "mlp-digits", "--devices", "2", "--steps", "5", *auth])
    assert result.exit_code == 0, result.output
    assert "finished" in result.output
    run_id = re.search(r"run ([0-9a-f]{32}) finished", result.output).group(1)
    out = tmp_path / "w.safetensors"
    fetched = CliRunner().invoke(app, ["runs", "fetch", run_id, "-o", str(out), *auth])
    assert fetched.exit_code == 0, fetched.output
    model = build_model("mlp-digits", 0)
    expected = {f"{i}.{k}" for i, layer in enumerate(model.layers) for k in layer.state_dict()}
    assert set(load(out.read_bytes())) == expected


USER_MODEL = """
import torch
from torch import nn
from neuranet.pipeline.models import LayerModel, cross_entropy


class Swish(nn.Module):  # a layer type of the user's own, unknown to the registry
    def forward(self, x):
        return x * torch.sigmoid(x)


def build(seed):
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(64, 48), Swish()), nn.Sequential(nn.Linear(48, 32), Swish()), nn.Linear(32, 10)]
    return LayerModel(layers, ["a", "b", "head"], cross_entropy, "digits")
"""


def test_a_model_file_of_the_users_own_trains_on_their_devices(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app
    from neuranet.pipeline.models import load_user_model

    path = tmp_path / "my_model.py"
    path.write_text(USER_MODEL)
    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["train", "--model", str(path), "--devices", "s0,s2", "--all-devices",
                                      "--steps", "5", "--batch-size", "16", "--microbatches", "2", "--lr", "0.1",
                                      "--seed", "4", *auth])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run ([0-9a-f]{32}) finished", result.output).group(1)
    with fabric.client() as c:
        run = c.run(run_id)
        weights = load(c.run_weights(run_id))
    assert run["model"] == "my_model" and len(run["stages"]) == 2
    req = dict(steps=5, batch_size=16, microbatches=2, lr=0.1, optimizer="sgd", data_seed=0)
    losses, state = one_process(req, load_user_model(path, 4))
    assert torch.allclose(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key, value in state.items():
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-6), key
    # A device whose owner did not allow model files (its agent has no --allow-owner-code) refuses,
    # and the run says which device and how to allow it.
    refused = CliRunner().invoke(app, ["train", "--model", str(path), "--devices", "s1", "--all-devices",
                                       "--steps", "2", "--batch-size", "16", "--microbatches", "2", *auth])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1, refused.output
    assert "device s1 (" in said and "does not run its owner's model files" in said and "--allow-owner-code" in said
    bad = tmp_path / "bad_model.py"
    bad.write_text("def build(seed):\n    return 42\n")
    refused = CliRunner().invoke(app, ["train", "--model", str(bad), *auth])
    assert refused.exit_code == 1 and "returned int, not a LayerModel" in refused.output


def test_a_device_lost_mid_run_costs_a_checkpoint_not_the_run(fabric: LocalFabric) -> None:
    import signal

    # SGD: no optimiser state to amplify last-bit differences between processes; the optimiser-state
    # half of resuming (AdamW across a re-split) is tested in test_checkpoint.py.
    req = {**RUN, "devices": AGENTS, "use_all_devices": True, "steps": 400, "checkpoint_every": 25}
    with fabric.client() as c:
        started = c.start_run(**req)
        deadline = time.monotonic() + 60
        while len(c.run(started["id"])["losses"]) < 100:  # well under way, with checkpoints written
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fabric.kill_agent("s1", signal.SIGKILL)
        run = wait_finished(c, started["id"], timeout=120)
        assert run["status"] == "finished", run
        assert run["attempt"] == 1 and len(run["stages"]) == 2, run["recoveries"]
        assert "resumed from step" in run["recoveries"][0]
        weights = load(c.run_weights(run["id"]))
    losses, state = one_process(req)
    assert torch.allclose(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key, value in state.items():  # the same weights as a run that never failed
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-6), key
