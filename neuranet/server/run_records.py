"""The coordinator's records of runs and deployments: who took part, their state and spec, their checkpoints.

`Store.runs`. A run's spec is what the coordinator needs to take it up again after a restart
(`RunBook.restore`); its checkpoints are stage states in the blob store, one row per stage, and a
step counts only once every stage's row is there (they are written in one transaction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import delete, func, select, update

from neuranet.server.models import Run, RunCheckpoint, RunDevice
from neuranet.server.records import Repository, UnknownRecord, new_id


@dataclass(frozen=True)
class Checkpoint:
    """A whole checkpoint: every stage's state after ``step`` steps, written by ``attempt``."""

    step: int
    attempt: int
    digests: tuple[str, ...]  # stage order
    size: int  # bytes, all stages


class RunRecords(Repository):
    async def create_run(self, user_id: str, kind: str, device_ids: Iterable[str], state: str | None = None,
                         spec: dict[str, Any] | None = None) -> str:
        run_id = new_id()
        now = time.time()
        async with self._tx() as s:
            s.add(Run(id=run_id, user_id=user_id, kind=kind, created_at=now, state=state, spec=spec, attempt=0,
                      updated_at=now))
            await s.flush()
            for d in dict.fromkeys(device_ids):
                s.add(RunDevice(run_id=run_id, device_id=d))
        return run_id

    async def save(self, run_id: str, state: str, attempt: int, spec: dict[str, Any], error: str | None = None) -> None:
        """Record where a run stands now (its state, attempt and the spec it restarts from)."""
        async with self._tx() as s:
            done = await s.execute(update(Run).where(Run.id == run_id).values(
                state=state, attempt=attempt, spec=spec, error=error, updated_at=time.time()))
            if done.rowcount == 0:  # type: ignore[attr-defined]
                raise UnknownRecord(f"no run {run_id}")

    async def live(self, kind: str, states: Iterable[str]) -> list[Run]:
        """Runs of ``kind`` in one of ``states`` (work a restarted coordinator takes up again), oldest first."""
        async with self.session() as s:
            return list((await s.scalars(select(Run).where(Run.kind == kind, Run.state.in_(list(states)))
                                         .order_by(Run.created_at))).all())

    async def get(self, run_id: str) -> Run | None:
        async with self.session() as s:
            return await s.get(Run, run_id)

    async def put_checkpoint(self, run_id: str, step: int, attempt: int, stages: list[tuple[str, int]],
                             spec: dict[str, Any] | None = None) -> list[str]:
        """Record a whole checkpoint (``(digest, size)`` per stage) and drop the run's older ones, in one
        transaction, with the run's ``spec`` as of it (its losses up to the checkpoint: a restart resumes
        from this checkpoint with them). Returns the digests no checkpoint refers to any more, whose
        blobs may go."""
        async with self._tx() as s:
            if spec is not None:
                await s.execute(update(Run).where(Run.id == run_id).values(spec=spec, updated_at=time.time()))
            old = set((await s.scalars(select(RunCheckpoint.digest).where(
                RunCheckpoint.run_id == run_id, RunCheckpoint.step != step))).all())
            await s.execute(delete(RunCheckpoint).where(RunCheckpoint.run_id == run_id))
            for stage, (digest, size) in enumerate(stages):
                s.add(RunCheckpoint(run_id=run_id, step=step, stage=stage, attempt=attempt, digest=digest, size=size))
            await s.flush()
            kept = set((await s.scalars(select(RunCheckpoint.digest).where(RunCheckpoint.digest.in_(old)))).all())
        return sorted(old - kept)

    async def blob_in_use(self, digest: str) -> bool:
        async with self.session() as s:
            return await s.scalar(select(RunCheckpoint.run_id).where(RunCheckpoint.digest == digest).limit(1)) is not None

    async def checkpoint(self, run_id: str) -> Checkpoint | None:
        """The run's newest whole checkpoint, or None."""
        async with self.session() as s:
            step = await s.scalar(select(func.max(RunCheckpoint.step)).where(RunCheckpoint.run_id == run_id))
            if step is None:
                return None
            rows = list((await s.scalars(select(RunCheckpoint).where(RunCheckpoint.run_id == run_id,
                                                                     RunCheckpoint.step == step)
                                         .order_by(RunCheckpoint.stage))).all())
        return Checkpoint(step, rows[0].attempt, tuple(r.digest for r in rows), sum(r.size for r in rows))

    async def list_runs(self, user_id: str, limit: int) -> list[tuple[Run, list[str]]]:
        """The user's newest runs and deployments (at most ``limit``), each with the devices it was given."""
        async with self.session() as s:
            runs = list((await s.scalars(select(Run).where(Run.user_id == user_id)
                                         .order_by(Run.created_at.desc()).limit(limit))).all())
            rows = (await s.execute(select(RunDevice.run_id, RunDevice.device_id)
                                    .where(RunDevice.run_id.in_([r.id for r in runs])))).all()
        devices: dict[str, list[str]] = {}
        for run_id, device_id in rows:
            devices.setdefault(run_id, []).append(device_id)
        return [(r, devices.get(r.id, [])) for r in runs]
