"""Training runs across devices: plan the split, assign stages to agents, collect progress and weights.

Planning needs the model (torch), so it runs in a worker thread and only when a run is started;
the coordinator imports torch no earlier than that.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from neuranet.protocol import messages as m

if TYPE_CHECKING:
    from neuranet.server.hub import AgentConnection, Hub

DEFAULT_GFLOPS = 10.0
DEFAULT_FREE_BYTES = 1 << 30
DEFAULT_LINK_BYTES_PER_S = 100e6


class RunRequest(BaseModel):
    model: str = Field(min_length=1, max_length=64)
    devices: list[str] | int | None = None  # ids/names, a count, or None for all online devices
    steps: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=65536)
    microbatches: int = Field(4, ge=1, le=1024)
    schedule: str = "1f1b"
    optimizer: str = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    seed: int = 0
    data_seed: int = 0
    model_options: dict[str, Any] = Field(default_factory=dict)
    use_all_devices: bool = False  # split over exactly the chosen devices, in order, instead of a planned subset


class RunError(Exception):
    """A run cannot start as requested; the message says what to change."""


@dataclass
class RunState:
    id: str
    user_id: str
    request: RunRequest
    stages: list[dict[str, Any]]  # device, start, stop per stage
    plan: str
    started: float = field(default_factory=time.time)
    losses: dict[int, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)
    parts_received: dict[int, int] = field(default_factory=dict)  # weight parts per stage so far
    parts_expected: dict[int, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.errors:
            return "failed"
        return "finished" if len(self.done) == len(self.stages) else "running"

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.request.model, "status": self.status, "steps": self.request.steps,
                "stages": self.stages, "plan": self.plan, "losses": [self.losses[k] for k in sorted(self.losses)],
                "errors": self.errors, "started": self.started}


def _plan(req: RunRequest, devices: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Profile the model's layers and split them over the devices (runs in a thread)."""
    from neuranet.pipeline.data import batches, load_dataset
    from neuranet.pipeline.models import build_model
    from neuranet.pipeline.partition import plan, plan_fixed
    from neuranet.pipeline.profile_layers import profile_layers
    from neuranet.pipeline.profiles import DeviceProfile, Link, PlanError, Workload

    model = build_model(req.model, req.seed, **req.model_options)
    micro = max(1, req.batch_size // req.microbatches)
    sample, _ = next(batches(load_dataset(model.dataset, **model.data_options), micro, req.data_seed))
    layers = profile_layers(model, sample)
    profiles = []
    for d in devices:
        p = d["profile"]
        bw = (p.get("server_bandwidth_bps") or DEFAULT_LINK_BYTES_PER_S * 8) / 8
        links = {o["id"]: Link(bandwidth=bw, latency=(p.get("server_rtt_ms") or 1.0) / 1000) for o in devices if o is not d}
        profiles.append(DeviceProfile(id=d["id"], gflops=p.get("cpu_gflops") or DEFAULT_GFLOPS,
                                      free_bytes=p.get("ram_available_bytes") or DEFAULT_FREE_BYTES, links=links))
    try:
        workload = Workload(micro_batch=micro, micro_batches=req.microbatches)
        chooser = plan_fixed if req.use_all_devices else plan
        result = chooser(layers, profiles, "throughput", workload)
    except PlanError as exc:
        raise RunError(str(exc)) from None
    stages = [{"device": s.device, "start": s.start, "stop": s.stop} for s in result.stages]
    return stages, result.describe()


class RunBook:
    """The coordinator's live runs: start them, route their agents' reports, keep their weights."""

    def __init__(self, hub: "Hub", blob_dir: Path) -> None:
        self.hub = hub
        self.blob_dir = blob_dir
        self.runs: dict[str, RunState] = {}

    def weights_dir(self, run_id: str) -> Path:
        return self.blob_dir / "runs" / run_id

    async def start(self, user_id: str, req: RunRequest, devices: list[dict[str, Any]]) -> RunState:
        from neuranet.pipeline.models import MODELS

        if req.model not in MODELS:
            raise RunError(f"unknown model {req.model!r}; built-in models are: {', '.join(sorted(MODELS))}")
        try:
            stages, plan_text = await asyncio.to_thread(_plan, req, devices)
        except (ValueError, TypeError) as exc:
            raise RunError(f"cannot plan {req.model}: {exc}") from None
        run_id = await self.hub.store.create_run(user_id, "train", [s["device"] for s in stages])
        run = RunState(run_id, user_id, req, stages, plan_text)
        self.runs[run_id] = run
        for i, s in enumerate(stages):
            self.hub.conns[s["device"]].send(m.StageAssign(
                run_id=run_id, stage=i, num_stages=len(stages), model=req.model, seed=req.seed,
                model_options=req.model_options, start=s["start"], stop=s["stop"],
                prev=stages[i - 1]["device"] if i else None,
                next=stages[i + 1]["device"] if i + 1 < len(stages) else None,
                schedule=req.schedule, microbatches=req.microbatches, optimizer=req.optimizer, lr=req.lr,
                steps=req.steps, batch_size=req.batch_size, data_seed=req.data_seed))
        return run

    def on_message(self, conn: "AgentConnection", msg: m.StageProgress | m.StageWeights | m.StageDone,
                   payload: bytes) -> None:
        run = self.runs.get(msg.run_id)
        if run is None or not 0 <= msg.stage < len(run.stages) or run.stages[msg.stage]["device"] != conn.device_id:
            return
        partial = self.weights_dir(run.id) / f"stage-{msg.stage}.part"
        if isinstance(msg, m.StageProgress):
            if msg.loss is not None:
                run.losses[msg.step] = msg.loss
        elif isinstance(msg, m.StageWeights):
            if msg.part != run.parts_received.get(msg.stage, 0):
                run.errors[msg.stage] = f"weights part {msg.part} arrived out of order"
                return
            partial.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "ab" if msg.part else "wb") as f:
                f.write(payload)
            run.parts_received[msg.stage] = msg.part + 1
            run.parts_expected[msg.stage] = msg.parts
        elif not msg.ok:
            run.errors[msg.stage] = msg.error or "stage failed"
        elif run.parts_received.get(msg.stage) != run.parts_expected.get(msg.stage):
            run.errors[msg.stage] = "stage finished before all of its weights arrived"
        else:
            partial.replace(partial.with_suffix(".safetensors"))
            run.done.add(msg.stage)

    def on_device_lost(self, device_id: str) -> None:
        """A device of a running run went offline: fail the run and stop its other stages.

        (Resuming from a checkpoint on the remaining devices is not built yet.)
        """
        for run in self.runs.values():
            lost = [i for i, s in enumerate(run.stages) if s["device"] == device_id and i not in run.done]
            if run.status != "running" or not lost:
                continue
            for i in lost:
                run.errors[i] = f"device {device_id} went offline during the run"
            for s in run.stages:
                conn = self.hub.conns.get(s["device"])
                if conn is not None and s["device"] != device_id:
                    conn.send(m.StageAbort(run_id=run.id, reason=f"device {device_id} went offline"))

    def merged_weights(self, run_id: str) -> bytes:
        """All stages' tensors in one safetensors file, keyed ``<layer index>.<parameter>``."""
        from safetensors.torch import load, save

        tensors: dict[str, Any] = {}
        for path in sorted(self.weights_dir(run_id).glob("stage-*.safetensors")):
            tensors.update(load(path.read_bytes()))
        return save(tensors)


def new_run_id() -> str:
    return secrets.token_hex(8)
