"""Training runs across devices: assign stages to agents, collect progress and checkpoints, recover from
lost devices, and take runs up again after a restart. What a run asks for and how it is split is
`run_plan.py`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from neuranet.protocol import messages as m
from neuranet.protocol.device_profile import DeviceProfile as Reported
from neuranet.server.blobs import BlobStore, BlobWriter
from neuranet.server.run_plan import (
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_LINK_BYTES_PER_S, RunError, RunRequest, Split, plan_run,
)
from neuranet.server.events import RUN_PROGRESS, RUN_STATE, Event, EventBus
from neuranet.server.run_records import Checkpoint
from neuranet.tasks import OwnedTasks

if TYPE_CHECKING:
    from neuranet.server.fleet import Fleet
    from neuranet.server.forecasting import ForecastService
    from neuranet.server.hub import AgentConnection, Handler
    from neuranet.server.store import Store

# A stage's state is its parameters and at most two optimiser slots per parameter (AdamW), in
# safetensors; the slack covers step counters and small buffers, and each layer's share of the
# header (a few hundred tensors' names and shapes).
STATE_SLOTS = 3
STATE_SLACK_BYTES = 1024 * 1024
STATE_HEADER_BYTES_PER_LAYER = 64 * 1024


@dataclass
class RunState:
    id: str
    user_id: str
    request: RunRequest
    stages: list[dict[str, Any]]  # device, start, stop per stage (of the current attempt)
    plan: str
    started: float = field(default_factory=time.time)
    attempt: int = 0  # re-plans so far
    losses: dict[int, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)
    parts: dict[tuple[int, int], int] = field(default_factory=dict)  # (step, stage) -> state parts received
    part_counts: dict[tuple[int, int], int] = field(default_factory=dict)  # (step, stage) -> parts announced
    part_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (step, stage) -> bytes received
    writers: dict[tuple[int, int], BlobWriter] = field(default_factory=dict)  # (step, stage) -> its state, streaming
    uploaded: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict)  # step -> stage -> (digest, size)
    checkpoints: dict[int, int] = field(default_factory=dict)  # step -> attempt that wrote it, whole model (newest)
    checkpoint_digests: tuple[str, ...] = ()  # the newest whole checkpoint's stage blobs, stage order
    checkpoint_every: int = 0
    checkpoint_reason: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)  # the devices given to the run: id, name, profile
    lost: set[str] = field(default_factory=set)  # devices lost since the last (re-)plan, not yet recovered from
    recovery: "asyncio.Task[None] | None" = None  # the one task recovering this run, while it does
    rejoined: asyncio.Event = field(default_factory=asyncio.Event)  # set when a lost device connects again
    lost_one: asyncio.Event = field(default_factory=asyncio.Event)  # set when one of its devices is lost
    relink: str = ""  # a stage failed because a link did: why, until a re-plan answers it
    link_recoveries: int = 0  # re-plans for failed links so far (bounded: MAX_LINK_RECOVERIES)

    @property
    def status(self) -> str:
        if self.errors:
            return "failed"
        finished = len(self.done) == len(self.stages) and self.request.steps in self.checkpoints
        return "finished" if finished else "running"

    def checkpoint_due(self, step: int) -> bool:
        """Whether the stages upload their state after ``step`` steps (as the agents' stage loop does)."""
        every = self.checkpoint_every
        return step == self.request.steps or (every > 0 and 0 < step < self.request.steps and step % every == 0)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.request.model, "status": self.status, "steps": self.request.steps,
                "batch_size": self.request.batch_size,
                "stages": self.stages, "plan": self.plan, "losses": [self.losses[k] for k in sorted(self.losses)],
                "errors": self.errors, "started": self.started, "attempt": self.attempt,
                "recoveries": self.recoveries, "checkpoints": sorted(self.checkpoints),
                "checkpoint_every": self.checkpoint_every, "checkpoint_reason": self.checkpoint_reason,
                "recovering": self.recovery is not None}

    def record(self) -> dict[str, Any]:
        """What a restarted coordinator needs to take the run up again (the checkpoints are rows of their own)."""
        return {"request": self.request.model_dump(mode="json"), "stages": self.stages, "plan": self.plan,
                "started": self.started, "losses": [[k, v] for k, v in sorted(self.losses.items())],
                "errors": {str(k): v for k, v in self.errors.items()}, "recoveries": self.recoveries,
                "checkpoint_every": self.checkpoint_every, "checkpoint_reason": self.checkpoint_reason,
                "devices": self.devices, "done": sorted(self.done)}

    @classmethod
    def restored(cls, run_id: str, user_id: str, attempt: int, spec: dict[str, Any],
                 checkpoint: Checkpoint | None) -> "RunState":
        """The run as the last coordinator recorded it, resuming from ``checkpoint`` (progress after it is redone)."""
        step = checkpoint.step if checkpoint else 0
        run = cls(run_id, user_id, RunRequest.model_validate(spec["request"]), list(spec["stages"]), str(spec["plan"]),
                  started=float(spec["started"]), attempt=attempt, recoveries=list(spec["recoveries"]),
                  checkpoint_every=int(spec["checkpoint_every"]), checkpoint_reason=str(spec["checkpoint_reason"]),
                  devices=list(spec["devices"]))
        run.losses = {int(k): float(v) for k, v in spec["losses"] if int(k) < step}
        run.errors = {int(k): str(v) for k, v in spec.get("errors", {}).items()}
        if checkpoint is not None:
            run.checkpoints = {checkpoint.step: checkpoint.attempt}
            run.checkpoint_digests = checkpoint.digests
            if checkpoint.step == run.request.steps:
                run.done = set(range(len(run.stages)))  # the final state is whole: only its StageDones were lost
        return run


def max_state_parts(param_bytes: int, layers: int = 1) -> int:
    """The most StageWeights parts a stage of ``layers`` layers holding ``param_bytes`` of parameters can need."""
    most = STATE_SLOTS * param_bytes + STATE_SLACK_BYTES + STATE_HEADER_BYTES_PER_LAYER * layers
    return math.ceil(most / m.STATE_PART_BYTES)


def refuse_state_part(run: RunState, msg: m.StageWeights, size: int) -> str | None:
    """Why part of a stage's state is refused, or None to accept it. The run's status, attempt and
    stage device are checked by the caller; this bounds which steps and how many bytes a stage uploads."""
    key = (msg.step, msg.stage)
    stage = run.stages[msg.stage]
    most = max_state_parts(stage.get("param_bytes", 0), stage["stop"] - stage["start"])
    if not run.checkpoint_due(msg.step):
        every = f"every {run.checkpoint_every} steps and " if run.checkpoint_every else ""
        return (f"stage {msg.stage} sent its state after step {msg.step}, but the run checkpoints "
                f"{every}after step {run.request.steps}")
    if msg.stage in run.uploaded.get(msg.step, set()) or any(msg.step <= s for s in run.checkpoints):
        return f"stage {msg.stage} sent its state after step {msg.step} twice"
    other = next((s for s, stage in run.writers if stage == msg.stage and s != msg.step), None)
    if other is not None:  # one state in flight per stage: a stage cannot hold many files open at once
        return f"stage {msg.stage} began its state after step {msg.step} before ending the one after step {other}"
    if msg.parts != run.part_counts.get(key, msg.parts):
        return f"stage {msg.stage} changed the part count of step {msg.step} from {run.part_counts[key]} to {msg.parts}"
    if msg.parts > most or msg.part >= msg.parts:
        return f"stage {msg.stage} announced part {msg.part} of {msg.parts}; its state fits in {most} part(s)"
    if msg.part != run.parts.get(key, 0):
        return f"state part {msg.part} of step {msg.step} arrived out of order"
    if size > m.STATE_PART_BYTES or run.part_bytes.get(key, 0) + size > most * m.STATE_PART_BYTES:
        return f"stage {msg.stage} sent more state for step {msg.step} than its parameters can make"
    return None


Planner = Callable[[RunRequest, list[dict[str, Any]]], Split]
RESTORE_GRACE = 120.0  # seconds a restarted coordinator waits for a run's devices to return
MAX_LINK_RECOVERIES = 3  # re-plans of one run after its stages' links failed, before the run fails


class RunBook:
    """The coordinator's runs: start them, route their agents' reports, keep their checkpoints and weights.

    Every run is also a record (`Store.runs`): its state, attempt and spec are saved when they change
    and each whole checkpoint is saved as blobs, so a restarted coordinator takes the run up again
    (:meth:`restore`) from its last whole checkpoint. Recovery of a run has one owner, a task that takes
    the run's device losses in order; if it fails, the run is failed with the reason.
    """

    def __init__(self, fleet: "Fleet", store: "Store", forecasts: "ForecastService | None", blobs: BlobStore,
                 rejoin_grace: float = 5.0, restore_grace: float = RESTORE_GRACE, planner: Planner | None = None,
                 events: EventBus | None = None) -> None:
        self.fleet = fleet
        self.events = events or EventBus(history=0)  # its owner hears of each run's progress and state
        self._told: dict[str, tuple[str, int]] = {}  # run -> (state, attempt) last published
        self.store = store
        self.forecasts = forecasts
        self.blobs = blobs
        self.rejoin_grace = rejoin_grace  # how long a recovery waits for lost devices to come back
        self.restore_grace = restore_grace  # likewise after a coordinator restart (agents back off to reconnect)
        self._planner = planner or plan_run
        self.runs: dict[str, RunState] = {}
        self._tasks = OwnedTasks("runs")  # recoveries in progress
        fleet.on_lost(self.on_device_lost)
        fleet.on_back(self.on_device_back)

    def handlers(self) -> dict[type[m.Message], "Handler"]:
        return {m.StageProgress: self.on_message, m.StageWeights: self.on_message, m.StageDone: self.on_message}

    # --- starting ------------------------------------------------------------------------

    async def start(self, user_id: str, req: RunRequest, devices: list[dict[str, Any]]) -> RunState:
        from neuranet.pipeline.models import MODELS

        if req.model not in MODELS and req.user_model is None:
            raise RunError(f"unknown model {req.model!r}; built-in models are: {', '.join(sorted(MODELS))}")
        split = await self._plan(req, devices)
        every, reason = await self._checkpoint_interval(req, split, devices)
        offline = [s["device"] for s in split.stages if not self.fleet.online(s["device"])]
        if offline:  # nothing is recorded for a run that could not start
            raise RunError(f"device {offline[0]} went offline while the run was planned; start it again")
        run = RunState("", user_id, req, split.stages, split.text, checkpoint_every=every, checkpoint_reason=reason,
                       devices=[{k: d.get(k) for k in ("id", "name", "profile")} for d in devices])
        run.id = await self.store.runs.create_run(user_id, "train", [s["device"] for s in split.stages],
                                                  state="running", spec=run.record())
        self.runs[run.id] = run
        self._tell(run)
        lost = next((s["device"] for s in run.stages if not self.fleet.online(s["device"])), None)
        if lost is not None:  # it went away while the run was recorded: recover as from any loss
            self.on_device_lost(lost)
        else:
            await self._assign(run)
        return run

    async def restore(self) -> int:
        """Take up the runs the last coordinator left running: each waits (up to ``restore_grace``) for its
        devices to return, then resumes from its last whole checkpoint. Returns how many were taken up."""
        taken = 0
        for row in await self.store.runs.live("train", ("running",)):
            try:
                run = RunState.restored(row.id, row.user_id, row.attempt, row.spec or {},
                                        await self.store.runs.checkpoint(row.id))
            except (KeyError, TypeError, ValueError) as exc:  # a record this version cannot read
                await self.store.runs.save(row.id, "failed", row.attempt, row.spec or {},
                                           f"cannot be taken up after a restart: {type(exc).__name__}: {exc}")
                continue
            self.runs[run.id] = run
            taken += 1
            if run.status != "running":
                await self._save(run)
                continue
            run.lost = {s["device"] for s in run.stages}
            self._recover_soon(run, self.restore_grace, "the coordinator restarted")
        return taken

    async def find(self, run_id: str) -> RunState | None:
        """A run by id: a live one, or one that ended before this coordinator started (read from its record)."""
        run = self.runs.get(run_id)
        if run is not None:
            return run
        row = await self.store.runs.get(run_id)
        if row is None or row.kind != "train" or row.state not in ("finished", "failed") or not row.spec:
            return None
        try:
            run = RunState.restored(row.id, row.user_id, row.attempt, row.spec, await self.store.runs.checkpoint(row.id))
        except (KeyError, TypeError, ValueError):
            return None
        return self.runs.setdefault(run_id, run)

    async def _checkpoint_interval(self, req: RunRequest, split: Split, devices: list[dict[str, Any]]) -> tuple[int, str]:
        """The request's interval, or (``checkpoint_every`` None) one from the devices' forecast availability."""
        from neuranet.pipeline.checkpoint import checkpoint_interval

        if req.checkpoint_every is not None:
            return req.checkpoint_every, "as requested"
        ids = [s["device"] for s in split.stages]
        if self.forecasts:
            await self.forecasts.refresh(ids)  # as of now: a device that just joined has no outlook yet
        outlooks = [self.fleet.view(d).expected_online_seconds for d in ids]
        expected = None if None in outlooks else [float(e) for e in outlooks if e is not None]
        if expected is None:
            return DEFAULT_CHECKPOINT_EVERY, "default (no availability forecast yet)"
        slots = 2 if req.optimizer.lower() == "adamw" else 0  # optimiser state per parameter, uploaded too
        bandwidth = min((Reported.of(d["profile"]).server_bandwidth_bps or DEFAULT_LINK_BYTES_PER_S * 8) / 8
                        for d in devices)
        cost = split.param_bytes * (1 + slots) / bandwidth
        every = checkpoint_interval(split.step_time, cost, expected, req.steps)
        return every, (f"every {every} steps from forecast availability (expected online "
                       f"{min(expected) / 3600:.1f} h for the least available device, ~{cost:.2f} s per checkpoint)")

    async def _plan(self, req: RunRequest, devices: list[dict[str, Any]]) -> Split:
        try:
            return await asyncio.to_thread(self._planner, req, devices)
        except (ValueError, TypeError, LookupError, RuntimeError, OverflowError) as exc:  # torch: bad sizes
            raise RunError(f"cannot plan {req.model}: {exc}") from None

    async def _assign(self, run: RunState, resume_step: int = 0) -> None:
        """Send each stage its assignment (and the state to resume from); a device gone meanwhile is a loss."""
        req, stages, attempt = run.request, run.stages, run.attempt
        state = await self._checkpoint_blob(run) if resume_step else b""
        if run.attempt != attempt:
            return  # superseded while the state was read
        parts = m.state_parts(state) if state else []
        for i, s in enumerate(stages):
            sent = self.fleet.send(s["device"], m.StageAssign(
                run_id=run.id, stage=i, num_stages=len(stages), model=req.model, seed=req.seed,
                model_options=req.model_options, start=s["start"], stop=s["stop"],
                prev=stages[i - 1]["device"] if i else None,
                next=stages[i + 1]["device"] if i + 1 < len(stages) else None,
                schedule=req.schedule, microbatches=req.microbatches, optimizer=req.optimizer, lr=req.lr,
                steps=req.steps, batch_size=req.batch_size, data_seed=req.data_seed, attempt=run.attempt,
                checkpoint_every=run.checkpoint_every, resume_step=resume_step,
                model_source=req.user_model.source if req.user_model else ""))
            for j, chunk in enumerate(parts if sent else []):
                sent = sent and self.fleet.send(
                    s["device"], m.StageState(run_id=run.id, attempt=run.attempt, part=j, parts=len(parts)), chunk)
            if not sent:
                self.on_device_lost(s["device"], run)

    # --- reports from the stages -------------------------------------------------------------

    async def on_message(self, conn: "AgentConnection", msg: Any, payload: bytes) -> None:
        run = self.runs.get(msg.run_id)
        if (run is None or run.status != "running" or msg.attempt != run.attempt or msg.stage >= len(run.stages)
                or run.stages[msg.stage]["device"] != conn.device_id):
            return  # unknown, ended, stale (an aborted attempt) or not this device's stage
        before = run.status
        if isinstance(msg, m.StageProgress):
            if msg.loss is not None:
                run.losses[msg.step] = msg.loss
                self.events.publish(Event(RUN_PROGRESS, run.user_id, run.id,
                                          {"step": msg.step, "loss": msg.loss, "steps_done": len(run.losses)}))
        elif isinstance(msg, m.StageWeights):
            await self._state_part(run, msg, payload)
        elif not msg.ok and msg.link_failed and (run.relink or run.link_recoveries < MAX_LINK_RECOVERIES):
            # A neighbour's link failed: usually its device is about to be found lost. Re-plan (bounded).
            if not run.relink:
                run.link_recoveries += 1
                run.relink = f"stage {msg.stage} lost a link ({msg.error or 'link failed'})"
                self._recover_soon(run, self.rejoin_grace, "")
        elif not msg.ok:
            run.errors[msg.stage] = msg.error or "stage failed"
        else:
            run.done.add(msg.stage)
        if run.status != before:
            await self._ended(run)

    async def _state_part(self, run: RunState, msg: m.StageWeights, payload: bytes) -> None:
        """Stream a part of a stage's state into its blob; once every stage's is whole, record the checkpoint."""
        if run.status != "running":
            return  # nothing is written for a run that has ended
        refused = refuse_state_part(run, msg, len(payload))
        if refused is not None:
            run.errors[msg.stage] = refused
            return
        key, attempt = (msg.step, msg.stage), run.attempt
        writer = run.writers.get(key) or run.writers.setdefault(key, self.blobs.writer())
        run.parts[key] = msg.part + 1  # claimed before the write: a part resent meanwhile is refused
        run.part_counts[key] = msg.parts
        run.part_bytes[key] = run.part_bytes.get(key, 0) + len(payload)
        try:
            await writer.write(payload)
            if msg.part + 1 < msg.parts:
                return
            digest = await writer.commit()
        except OSError as exc:  # the coordinator's disk, not the stage: the run cannot keep its state
            run.writers.pop(key, None)
            await writer.abort()
            run.errors[msg.stage] = f"the coordinator could not store stage {msg.stage}'s state: {exc}"
            return
        finally:
            if msg.part + 1 >= msg.parts:  # ended, one way or the other: nothing of this state stays open
                run.writers.pop(key, None)
                size = run.part_bytes.pop(key, 0)
                run.parts.pop(key, None)
                run.part_counts.pop(key, None)
        if run.attempt != attempt:  # aborted meanwhile: the blob is nobody's (unless the same bytes are)
            if digest not in run.checkpoint_digests and not await self.store.runs.blob_in_use(digest):
                await self.blobs.delete(digest)
            return
        stages = run.uploaded.setdefault(msg.step, {})
        stages[msg.stage] = (digest, size)
        if len(stages) == len(run.stages):
            whole = [stages[i] for i in range(len(run.stages))]
            # Durable first (the checkpoint's rows and the losses up to it, in one transaction); only then
            # is it shown, and resumed from.
            dropped = await self.store.runs.put_checkpoint(run.id, msg.step, attempt, whole, run.record())
            run.checkpoints = {msg.step: attempt}
            run.checkpoint_digests = tuple(d for d, _ in whole)
            for older in [s for s in run.uploaded if s < msg.step]:
                del run.uploaded[older]
            for digest in dropped:
                await self.blobs.delete(digest)

    async def _ended(self, run: RunState) -> None:
        """The run finished or failed: record it, and stop the stages still running a failed one."""
        if run.status == "failed":
            for s in run.stages:
                self.fleet.send(s["device"], m.StageAbort(run_id=run.id, reason="the run failed"))
            await self._abort_writers(run)
        await self._save(run)

    async def _save(self, run: RunState) -> None:
        self._tell(run)
        await self.store.runs.save(run.id, run.status, run.attempt, run.record(),
                                   "; ".join(run.errors[k] for k in sorted(run.errors)) or None)

    def _tell(self, run: RunState) -> None:
        """Publish the run's state (running, recovering, finished, failed) when it or the attempt changed."""
        state = "recovering" if run.recovery is not None and run.status == "running" else run.status
        if self._told.get(run.id) != (state, run.attempt):
            self._told[run.id] = (state, run.attempt)
            error = "; ".join(run.errors[k] for k in sorted(run.errors)) or None
            self.events.publish(Event(RUN_STATE, run.user_id, run.id, {"state": state, "attempt": run.attempt,
                                                                      "error": error}))

    async def _abort_writers(self, run: RunState) -> None:
        writers, run.writers = list(run.writers.values()), {}
        for writer in writers:
            await writer.abort()

    # --- recovery ------------------------------------------------------------------------

    def on_device_lost(self, device_id: str, only: RunState | None = None) -> None:
        """A device of a running run went offline: re-plan and resume from the last checkpoint."""
        for run in [only] if only is not None else list(self.runs.values()):
            if run.status == "running" and any(s["device"] == device_id for s in run.stages):
                run.lost.add(device_id)
                run.lost_one.set()
                self._recover_soon(run, self.rejoin_grace, "")

    def on_device_back(self, device_id: str) -> None:
        """A device connected: a recovery waiting for it re-plans now, with it."""
        for run in self.runs.values():
            if device_id in run.lost:
                run.rejoined.set()

    def _recover_soon(self, run: RunState, grace: float, why: str) -> None:
        """Start the run's recovery unless one is under way (it takes the new loss in turn)."""
        if run.recovery is None:
            run.recovery = self._tasks.spawn(self._recover(run, grace, why), name=f"recover-{run.id}",
                                             on_error=lambda exc: self._recovery_failed(run, exc))

    def _recovery_failed(self, run: RunState, exc: BaseException) -> None:
        run.recovery = None
        if run.status == "running":
            run.errors[-1] = f"recovery failed: {type(exc).__name__}: {exc}"
        self._tasks.spawn(self._ended(run), name=f"record-failure-{run.id}")

    async def _recover(self, run: RunState, grace: float, why: str) -> None:
        """Re-plan until no loss is left unanswered: a device lost during a re-plan starts the next one."""
        try:
            while (run.lost or run.relink) and run.status == "running":
                await self._replan(run, grace, why)
                grace, why = self.rejoin_grace, ""
        finally:
            run.recovery = None
            self._tell(run)  # running again (or failed)
        if run.status == "failed":
            await self._ended(run)

    async def _await_loss(self, run: RunState, grace: float) -> None:
        """Wait up to the grace for a device of the run to be found lost (a failed link usually means one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while not run.lost and (left := deadline - loop.time()) > 0:
            run.lost_one.clear()
            try:
                await asyncio.wait_for(run.lost_one.wait(), left)
            except TimeoutError:
                return

    async def _await_rejoin(self, run: RunState, grace: float) -> None:
        """Wait up to the grace for every lost device to reconnect: a blip should not cost a device."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(not self.fleet.online(d) for d in run.lost) and (left := deadline - loop.time()) > 0:
            run.rejoined.clear()
            try:
                await asyncio.wait_for(run.rejoined.wait(), left)
            except TimeoutError:
                return

    @staticmethod
    def _names(run: RunState, device_ids: Any) -> str:
        names = {d["id"]: d.get("name") or d["id"] for d in run.devices}
        return ", ".join(sorted(names.get(d, d) for d in device_ids))

    async def _replan(self, run: RunState, grace: float, why: str) -> None:
        """Abort the attempt, wait a grace for lost devices, then plan over the run's devices online now
        (those that came back included) and resume every stage from the last whole checkpoint."""
        run.attempt += 1  # from now on, reports of the old attempt are ignored
        await self._abort_writers(run)
        await self._save(run)  # before any assignment: a restart never reuses an attempt number
        if run.relink and not run.lost and not why:
            await self._await_loss(run, grace)
        relink, run.relink = run.relink, ""
        lost = set(run.lost)
        reason = why or (f"{self._names(run, lost)} went offline" if lost else relink)
        for s in run.stages:
            self.fleet.send(s["device"], m.StageAbort(run_id=run.id, reason=reason))
        resume = max(run.checkpoints, default=0)
        await self._await_rejoin(run, grace)
        lost |= run.lost
        what = why or (f"{self._names(run, lost)} went offline" if lost else relink)
        while True:
            online = [d for d in run.devices if self.fleet.online(d["id"])]
            if not online:
                run.errors[-1] = f"{what} and no device of the run is online"
                return
            devices = [{**d, "profile": self.fleet.profile(d["id"]) or d.get("profile") or {}} for d in online]
            try:
                split = await self._plan(run.request, devices)
            except RunError as exc:
                run.errors[-1] = f"{what} and the rest cannot hold it: {exc}"
                return
            if all(self.fleet.online(s["device"]) for s in split.stages):
                break  # else a device went while planning: plan again without it
        back = self._names(run, [d for d in lost if self.fleet.online(d)])
        for d in lost:  # a returned device may still run its stage of the old attempt
            self.fleet.send(d, m.StageAbort(run_id=run.id, reason="re-planned while it was away"))
        lost_text = why or (f"lost {self._names(run, lost)}" if lost else relink)
        run.recoveries.append(
            f"attempt {run.attempt}: {lost_text}" + (f" ({back} came back)" if back else "")
            + f"; resumed from step {resume} on {len(split.stages)} devices")
        run.stages, run.plan = split.stages, split.text
        planned = {s["device"] for s in run.stages}
        # Losses answered by this plan are done; one of a planned device that is offline again is not.
        run.lost = {d for d in run.lost - lost if d in planned and not self.fleet.online(d)}
        run.done.clear()
        run.parts.clear()
        run.part_counts.clear()
        run.part_bytes.clear()
        run.uploaded.clear()
        run.losses = {k: v for k, v in run.losses.items() if k < resume}
        await self._save(run)
        await self._assign(run, resume)

    # --- checkpoints and weights ----------------------------------------------------------------

    async def _checkpoint_blob(self, run: RunState) -> bytes:
        """The whole model's state at the newest checkpoint, merged from the stages' blobs (off the loop)."""
        parts = [await self.blobs.get(d) for d in run.checkpoint_digests]
        return await asyncio.to_thread(_merge_states, parts, False)

    async def merged_weights(self, run_id: str) -> bytes:
        """The finished model's weights in one safetensors file, keyed ``<layer index>.<parameter>``."""
        run = self.runs[run_id]
        parts = [await self.blobs.get(d) for d in run.checkpoint_digests]
        return await asyncio.to_thread(_merge_states, parts, True)

    async def close(self) -> None:
        await self._tasks.close()
        for run in self.runs.values():
            await self._abort_writers(run)


def _merge_states(parts: list[bytes], weights: bool) -> bytes:
    """Stage states (safetensors) as one; ``weights``: only the parameters."""
    from safetensors.torch import load, save

    from neuranet.pipeline.checkpoint import weights_only

    tensors: dict[str, Any] = {}
    for part in parts:
        tensors.update(load(part))
    return save(weights_only(tensors) if weights else tensors)
