"""A coordinator killed and started again loses no acknowledged work: a training run on three real agents
resumes from its last whole checkpoint and ends with the weights of a run never interrupted, and a
deployment serves again once its agents are back."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load

from fabric_helpers import free_port, wait_for
from neuranet.fabric import LocalFabric
from test_train import AGENTS, RUN, one_process, wait_finished

# Two coordinator restarts with real agents reconnecting (their backoff included): minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("restart")) as f:
        f.port = free_port()  # type: ignore[attr-defined]  # the same address after the restart
        f.start_server(port=f.port)  # type: ignore[attr-defined]
        for name in AGENTS:
            f.start_agent(name, extra=["--listen-host", "127.0.0.1", "--no-measure"])
        f.wait_online(AGENTS)
        yield f


def restart(fabric: LocalFabric) -> None:
    """Kill the coordinator outright (no shutdown of any kind) and start it again on its data."""
    fabric.stop_server(signal.SIGKILL)
    fabric.start_server(port=fabric.port)  # type: ignore[attr-defined]
    fabric.wait_online(AGENTS, timeout=120)


def test_a_run_survives_a_coordinator_killed_in_its_middle(fabric: LocalFabric) -> None:
    req = {**RUN, "model_options": {"hidden": 64, "depth": 6}, "devices": AGENTS, "use_all_devices": True,
           "steps": 100, "checkpoint_every": 20}
    with fabric.client() as c:
        started = c.start_run(**req)
        wait_for(lambda: c.run(started["id"])["checkpoints"], timeout=120, what="a whole checkpoint")
    restart(fabric)
    with fabric.client() as c:
        run = wait_finished(c, started["id"], timeout=240)
        assert run["status"] == "finished", run
        assert run["attempt"] >= 1 and "the coordinator restarted" in run["recoveries"][0], run["recoveries"]
        assert len(run["stages"]) == 3
        weights = load(c.run_weights(run["id"]))
        listed = {r["id"]: r for r in c.runs()}
    assert listed[run["id"]]["state"] == "finished"
    losses, state = one_process(req)
    assert torch.allclose(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key, value in state.items():  # the same weights as a run that never stopped
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-6), key


def test_a_deployment_serves_again_after_the_coordinator_restarts(fabric: LocalFabric) -> None:
    rows = [[float((i * 7 + j) % 16) for j in range(64)] for i in range(3)]
    with fabric.client() as c:
        trained = wait_finished(c, c.start_run(**{**RUN, "steps": 4, "devices": AGENTS[:2], "use_all_devices": True})["id"])
        assert trained["status"] == "finished", trained
        dep = c.deploy(run=trained["id"], devices=AGENTS, use_all_devices=True, batch_size=3)
        wait_for(lambda: c.deployment(dep["id"], wait=5)["status"] == "ready", timeout=120, what="the deployment")
        before = c.infer(dep["id"], rows)
    restart(fabric)
    with fabric.client() as c:
        back = wait_for(lambda: (d := c.deployment(dep["id"], wait=5))["status"] != "loading" and d,
                        timeout=120, what="the deployment back after the restart")
        assert back["status"] == "ready", back
        after = c.infer(dep["id"], rows)
        # The run it serves was finished before the restart: its weights come from the records.
        assert c.run(trained["id"])["status"] == "finished"
    assert torch.allclose(torch.tensor(after), torch.tensor(before), rtol=1e-5, atol=1e-6)
