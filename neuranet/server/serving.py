"""Inference across devices: deploy a model's stages onto agents, then answer batches and generate text.

A deployment is planned for latency (the sum of the stages and links one request crosses), its
stages are loaded by the agents (with the weights of a finished training run when one is named),
and stay up until stopped. Each request's inputs go to the first stage in parts; the last stage
returns the output in parts; any stage can fail a request with an error, which the caller sees.
Losing a device fails the deployment and its pending requests with a clear error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from neuranet.api_requests import DeployRequest, GenerateRequest
from neuranet.errors import BadUpstream, Conflict, Invalid, NeuraNetError, NotFound, TimedOut, TooLarge, Unavailable
from neuranet.protocol import messages as m
from neuranet.protocol.correlator import Correlator
from neuranet.server.events import DEPLOYMENT_STATE, Event, EventBus
from neuranet.server.run_plan import RunError, build_and_profile, plan_layers
from neuranet.server.runs import RESTORE_GRACE
from neuranet.tasks import OwnedTasks

if TYPE_CHECKING:
    from neuranet.pipeline.inference import PartJoiner
    from neuranet.pipeline.models import Encoder
    from neuranet.server.fleet import Fleet
    from neuranet.server.hub import AgentConnection, Handler
    from neuranet.server.runs import RunBook
    from neuranet.server.store import Store

SERVE_PART_BYTES = m.STATE_PART_BYTES
MAX_INFLIGHT = 8  # requests of one deployment in the pipeline at once
REQUEST_TIMEOUT = 300.0
RECORD_TIMEOUT = 10.0  # seconds a shutdown waits for state records still being written


class ServeError(NeuraNetError):
    """A request to a deployment failed; the subclass says which kind of failure it is."""


class ServeInvalid(ServeError, Invalid):
    """The deployment or request asks for what cannot be served (a model, inputs, options)."""


class ServeNotFound(ServeError, NotFound):
    """The deployment names a run that is not there."""


class ServeConflict(ServeError, Conflict):
    """The deployment names a run that has not finished."""


class ServeTooLarge(ServeError, TooLarge):
    """The request's input is too large to send through the stages."""


class ServeUnavailable(ServeError, Unavailable):
    """The deployment failed, stopped, or lost a device."""


class ServeTimedOut(ServeError, TimedOut):
    """The deployment did not load, or a request did not finish, in time."""


class ServeBadOutput(ServeError, BadUpstream):
    """The last stage returned an output that cannot be decoded."""


@dataclass
class Deployment:
    id: str
    user_id: str
    model: str
    seed: int
    model_options: dict[str, Any]
    stages: list[dict[str, Any]]
    plan: str
    encode: "Encoder"
    block_size: int | None  # for text generation: the model's context length, None if it cannot generate
    source_run: str | None = None
    started: float = field(default_factory=time.time)
    attempt: int = 0  # assignments so far, less one: bumped when a restarted coordinator assigns it again
    restoring: bool = False  # taken up after a restart, waiting for its devices to return
    ready: set[int] = field(default_factory=set)
    error: str = ""
    stopped: bool = False
    served: int = 0
    pending: Correlator[Any] = field(default_factory=lambda: Correlator("serve requests", limit=MAX_INFLIGHT))
    joiner: "PartJoiner | None" = None
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_INFLIGHT))
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        if self.stopped:
            return "stopped"
        return "ready" if len(self.ready) == len(self.stages) else "loading"

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "status": self.status, "stages": self.stages, "plan": self.plan,
                "error": self.error, "started": self.started, "served": self.served, "run": self.source_run,
                "can_generate": self.block_size is not None}

    def record(self) -> dict[str, Any]:
        """What a restarted coordinator needs to serve it again (`ServeBook.restore`)."""
        return {"model": self.model, "seed": self.seed, "model_options": self.model_options, "stages": self.stages,
                "plan": self.plan, "source_run": self.source_run, "started": self.started}

    def fail(self, error: str) -> None:
        if not self.error:
            self.error = error
        self.end(f"deployment {self.id} failed: {error}")

    def end(self, why: str) -> None:
        """Wake whoever waits for readiness and fail every pending request with ``why``."""
        self.became_ready.set()
        self.pending.fail_all(lambda: ServeUnavailable(why))


class ServeBook:
    """The coordinator's deployments: start them, route their agents' reports, answer requests."""

    def __init__(self, fleet: "Fleet", store: "Store", runs: "RunBook", restore_grace: float = RESTORE_GRACE,
                 events: EventBus | None = None) -> None:
        self.fleet = fleet
        self.events = events or EventBus(history=0)  # its owner hears of each deployment's state
        self._told: dict[str, str] = {}  # deployment -> the state last published
        self.store = store
        self.runs = runs
        self.restore_grace = restore_grace  # how long a restarted coordinator waits for a deployment's devices
        self.deployments: dict[str, Deployment] = {}
        self._tasks = OwnedTasks("serving")  # restorations
        self._records = OwnedTasks("serving-records")  # state records being written (finished on close)
        self._back = asyncio.Event()  # set when any device connects (restorations look again)
        fleet.on_lost(self.on_device_lost)
        fleet.on_back(lambda _device_id: self._back.set())

    def handlers(self) -> dict[type[m.Message], "Handler"]:
        return {m.ServeStatus: self.on_message, m.ServeOutput: self.on_message}

    async def start(self, user_id: str, req: DeployRequest, devices: list[dict[str, Any]]) -> Deployment:
        from neuranet.pipeline.models import MODELS

        model, seed, options, weights = req.model, req.seed, req.model_options, b""
        if req.run is not None:
            run = await self.runs.find(req.run)
            if run is None or run.user_id != user_id:
                raise ServeNotFound(f"no run {req.run}")
            if run.status != "finished":
                raise ServeConflict(f"run {req.run} is {run.status}; it can be served once it has finished")
            if run.request.user_model is not None:
                raise ServeInvalid(f"run {req.run} trained a model file of yours; only built-in models are served")
            if model not in (None, run.request.model):
                raise ServeInvalid(f"run {req.run} trained {run.request.model}, not {model}")
            model, seed, options = run.request.model, run.request.seed, run.request.model_options
            weights = await self.runs.merged_weights(req.run)
        if model is None:
            raise ServeInvalid("name a model or a finished training run to serve")
        if model not in MODELS:
            raise ServeInvalid(f"unknown model {model!r}; built-in models are: {', '.join(sorted(MODELS))}")
        try:
            layers, built = await asyncio.to_thread(build_and_profile, model, seed, options, req.batch_size)
            stages, plan_text, _, _ = await asyncio.to_thread(
                plan_layers, layers, devices, "latency", req.batch_size, 1, req.use_all_devices)
        except RunError as exc:
            raise ServeInvalid(str(exc)) from None
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ServeInvalid(f"cannot plan {model}: {exc}") from None
        dep = Deployment("", user_id, model, seed, options, stages, plan_text, built.encode, _block_size(built),
                         source_run=req.run)
        dep.id = await self.store.runs.create_run(user_id, "serve", [s["device"] for s in stages], state="loading",
                                                  spec=dep.record())
        self.deployments[dep.id] = dep
        self._tell(dep)
        self._assign(dep, weights)
        return dep

    async def restore(self) -> int:
        """Take up the deployments the last coordinator served: each is assigned again once its devices are
        back (within ``restore_grace``), or fails saying which did not return. Returns how many."""
        taken = 0
        for row in await self.store.runs.live("serve", ("loading", "ready")):
            spec = row.spec or {}
            try:
                built = await asyncio.to_thread(_built, spec["model"], int(spec["seed"]), dict(spec["model_options"]))
                dep = Deployment(row.id, row.user_id, spec["model"], int(spec["seed"]), dict(spec["model_options"]),
                                 list(spec["stages"]), str(spec["plan"]), built.encode, _block_size(built),
                                 source_run=spec.get("source_run"), started=float(spec["started"]),
                                 attempt=row.attempt, restoring=True)
            except Exception as exc:  # a record or model this version cannot serve
                await self.store.runs.save(row.id, "failed", row.attempt, spec,
                                           f"cannot be served again after a restart: {type(exc).__name__}: {exc}")
                continue
            self.deployments[dep.id] = dep
            self._tasks.spawn(self._bring_back(dep), name=f"restore-{dep.id}",
                              on_error=lambda exc, dep=dep: self._failed(dep, f"{type(exc).__name__}: {exc}"))
            taken += 1
        return taken

    async def _bring_back(self, dep: Deployment) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restore_grace
        while (away := [s["device"] for s in dep.stages if not self.fleet.online(s["device"])]) and not dep.stopped:
            left = deadline - loop.time()
            if left <= 0:
                self._failed(dep, f"device {', '.join(away)} did not come back within {self.restore_grace:.0f} s "
                                  f"of the coordinator's restart")
                return
            self._back.clear()
            try:
                await asyncio.wait_for(self._back.wait(), left)
            except TimeoutError:
                pass
        if dep.stopped:
            return
        weights = b""
        if dep.source_run is not None:
            if await self.runs.find(dep.source_run) is None:
                self._failed(dep, f"run {dep.source_run}, whose weights it serves, is gone")
                return
            weights = await self.runs.merged_weights(dep.source_run)
        dep.attempt += 1  # fresh links: the old ones went with the last coordinator
        dep.restoring = False
        await self._save(dep)
        self._assign(dep, weights)

    def _failed(self, dep: Deployment, error: str) -> None:
        dep.restoring = False
        dep.fail(error)
        self._record(dep)

    def _record(self, dep: Deployment) -> None:
        """Save the deployment's state now (from sync code: in a task of the book's)."""
        self._tell(dep)
        self._records.spawn(self._save(dep), name=f"record-{dep.id}")

    async def _save(self, dep: Deployment) -> None:
        self._tell(dep)
        await self.store.runs.save(dep.id, dep.status, dep.attempt, dep.record(), dep.error or None)

    def _tell(self, dep: Deployment) -> None:
        """Publish the deployment's state (loading, ready, failed, stopped) when it changed."""
        if self._told.get(dep.id) != dep.status:
            self._told[dep.id] = dep.status
            self.events.publish(Event(DEPLOYMENT_STATE, dep.user_id, dep.id, {"state": dep.status, "model": dep.model,
                                                                            "error": dep.error or None}))

    def _assign(self, dep: Deployment, weights: bytes) -> None:
        parts = m.state_parts(weights) if weights else []
        for i, s in enumerate(dep.stages):
            self.fleet.send(s["device"], m.ServeAssign(
                run_id=dep.id, stage=i, num_stages=len(dep.stages), model=dep.model, seed=dep.seed,
                model_options=dep.model_options, start=s["start"], stop=s["stop"],
                prev=dep.stages[i - 1]["device"] if i else None,
                next=dep.stages[i + 1]["device"] if i + 1 < len(dep.stages) else None, attempt=dep.attempt,
                weights_parts=len(parts)))
            for j, chunk in enumerate(parts):
                self.fleet.send(s["device"], m.ServeWeights(run_id=dep.id, part=j, parts=len(parts)), chunk)

    async def wait_ready(self, dep: Deployment, timeout: float) -> None:
        try:
            await asyncio.wait_for(dep.became_ready.wait(), timeout)
        except TimeoutError:
            raise ServeTimedOut(f"deployment {dep.id} is still loading after {timeout:.0f} s") from None
        if dep.status in ("failed", "stopped"):
            raise ServeUnavailable(f"deployment {dep.id} is {dep.status}" + (f": {dep.error}" if dep.error else ""))

    async def infer(self, dep: Deployment, inputs: list[Any]) -> list[Any]:
        """Run a batch of inputs (JSON values the model's encoder takes) through the pipeline."""
        try:
            x = await asyncio.to_thread(dep.encode, inputs)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ServeInvalid(f"{dep.model} cannot take these inputs: {exc}") from None
        return (await self.forward(dep, x)).tolist()

    async def forward(self, dep: Deployment, x: Any) -> Any:
        """One request's input tensor through the stages; returns the last stage's output tensor."""
        from neuranet.pipeline.inference import BatchTooLarge, PartJoiner, split_batch
        from neuranet.protocol.tensors import encode_tensor

        await self.wait_ready(dep, REQUEST_TIMEOUT)
        try:
            pieces = split_batch(x, SERVE_PART_BYTES)
        except BatchTooLarge as exc:
            raise ServeTooLarge(str(exc)) from None
        if dep.joiner is None:
            dep.joiner = PartJoiner()
        async with dep.slots:
            request, future = dep.pending.new()
            first = self.fleet.connection(dep.stages[0]["device"])
            if first is None:
                dep.fail(f"device {dep.stages[0]['device']} is offline")
            else:
                for i, piece in enumerate(pieces):
                    header, data = encode_tensor(piece)
                    first.send(m.ServeInput(run_id=dep.id, attempt=dep.attempt, request=request, part=i, parts=len(pieces), tensor=header),
                               payload=bytes(data))
            try:
                out = await asyncio.wait_for(future, REQUEST_TIMEOUT)
            except TimeoutError:
                raise ServeTimedOut(f"request {request} of deployment {dep.id} timed out") from None
            finally:
                dep.pending.discard(request)
                dep.joiner.drop(request)
        dep.served += 1
        return out

    async def generate(self, dep: Deployment, req: GenerateRequest) -> str:
        from neuranet.pipeline.inference import generate

        if dep.block_size is None:
            raise ServeInvalid(f"{dep.model} does not generate text; gpt-char does")
        return await generate(lambda ids: self.forward(dep, ids), req.prompt, req.max_new_tokens, dep.block_size,
                              req.temperature, req.seed)

    def stop(self, dep: Deployment, reason: str = "stopped by its owner") -> None:
        if dep.stopped:
            return
        dep.stopped = True
        dep.end(f"deployment {dep.id} was stopped: {reason}")
        self._record(dep)
        for s in dep.stages:
            self.fleet.send(s["device"], m.ServeStop(run_id=dep.id, reason=reason))

    def on_message(self, conn: "AgentConnection", msg: Any, payload: bytes) -> None:
        dep = self.deployments.get(msg.run_id)
        if (dep is None or dep.stopped or dep.restoring or msg.attempt != dep.attempt
                or not 0 <= msg.stage < len(dep.stages) or dep.stages[msg.stage]["device"] != conn.device_id):
            return  # unknown or stopped deployment (its stages' links close as they stop), or not this device's stage
        if isinstance(msg, m.ServeStatus):
            if not msg.ok:
                self._failed(dep, f"stage {msg.stage} on {conn.device_id}: {msg.error}")
                return
            dep.ready.add(msg.stage)
            if len(dep.ready) == len(dep.stages):
                dep.became_ready.set()
                self._record(dep)
            return
        if not dep.pending.waiting(msg.request):
            return  # a request that timed out or already failed
        if msg.error:
            dep.pending.fail(msg.request, ServeInvalid(f"stage {msg.stage} on {conn.device_id}: {msg.error}"))
            return
        if msg.stage != len(dep.stages) - 1:
            return  # only the last stage returns outputs
        self._output_part(dep, msg, payload)

    def _output_part(self, dep: Deployment, msg: m.ServeOutput, payload: bytes) -> None:
        from neuranet.protocol.tensors import decode_tensor

        assert dep.joiner is not None
        try:
            out = dep.joiner.add(msg.request, msg.part, msg.parts, decode_tensor(msg.tensor, payload))
        except Exception as exc:
            dep.pending.fail(msg.request, ServeBadOutput(f"the last stage returned a bad output: {exc}"))
            return
        if out is not None:
            dep.pending.resolve(msg.request, out)

    def on_device_lost(self, device_id: str) -> None:
        for dep in self.deployments.values():
            if (dep.status in ("loading", "ready") and not dep.restoring
                    and any(s["device"] == device_id for s in dep.stages)):
                self._failed(dep, f"device {device_id} went offline")

    async def close(self) -> None:
        """The coordinator stops: pending requests fail, the records stay as they are (a restart serves again)."""
        await self._tasks.close()
        try:
            await asyncio.wait_for(self._records.join(), RECORD_TIMEOUT)
        finally:
            await self._records.close()
        for dep in self.deployments.values():
            dep.end("the coordinator is shutting down")


def _built(model: str, seed: int, options: dict[str, Any]) -> Any:
    from neuranet.pipeline.models import build_model

    return build_model(model, seed, **options)


def _block_size(built: Any) -> int | None:
    """For text generation: the model's context length; None if it cannot generate."""
    return built.data_options.get("block_size") if built.dataset == "stdlib-chars" else None
