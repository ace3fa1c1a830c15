"""Run-plane messages: a pipeline-parallel training stage's assignment, progress, weights and state
parts, completion and abort.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from neuranet.protocol.message_base import Message, Text
from neuranet.protocol.parts import split


# --- pipeline runs -------------------------------------------------------------


class StageSpec(Message):
    """Which layers of which model one device holds in a pipeline, and its neighbours: the part that
    `StageAssign` (training) and `ServeAssign` (serving) share. Not a message of its own (no TYPE)."""

    run_id: str
    stage: int = Field(ge=0)
    num_stages: int = Field(ge=1)
    model: str
    seed: int = 0
    model_options: dict[str, Any] = Field(default_factory=dict)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    prev: str | None = None
    next: str | None = None
    attempt: int = Field(0, ge=0)  # bumped each time the work is assigned anew (a re-plan, a restart)


class StageAssign(StageSpec):
    """Server tells a device which layers of which model it trains, and who its neighbours are."""

    TYPE: ClassVar[str] = "stage_assign"
    schedule: str = "1f1b"
    microbatches: int = Field(1, ge=1)
    optimizer: str = "sgd"
    lr: float = Field(0.01, gt=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    data_seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # steps between uploads of the stage's state; 0: only at the end
    resume_step: int = Field(0, ge=0)  # > 0: wait for StageState parts, then continue from this step
    model_source: str = ""  # a model file of the device's owner (its build(seed)) instead of a built-in model


class StageProgress(Message):
    TYPE: ClassVar[str] = "stage_progress"
    run_id: str
    stage: int = Field(ge=0)
    attempt: int = Field(ge=0)  # of the assignment it reports on: a report of an aborted attempt is ignored
    step: int
    loss: float | None = None


class StageWeights(Message):
    """Part ``part`` of ``parts`` of a stage's state after ``step`` steps (safetensors, in the payload):
    a checkpoint, or the final weights when ``step`` is the run's last."""

    TYPE: ClassVar[str] = "stage_weights"
    run_id: str
    stage: int = Field(ge=0)
    step: int = Field(0, ge=0)
    attempt: int = Field(ge=0)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


STATE_PART_BYTES = 1024 * 1024  # stage state travels in parts well under the server's message limit


def state_parts(blob: bytes) -> list[bytes]:
    """``blob`` cut into the payloads of StageWeights / StageState messages (at least one)."""
    return split(blob, STATE_PART_BYTES)


class StageState(Message):
    """Server sends part of the checkpoint a re-planned stage resumes from (safetensors, in the payload)."""

    TYPE: ClassVar[str] = "stage_state"
    run_id: str
    attempt: int = Field(ge=0)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


class StageDone(Message):
    """A stage finished (after sending its weights as StageWeights parts) or failed."""

    TYPE: ClassVar[str] = "stage_done"
    run_id: str
    stage: int = Field(ge=0)
    attempt: int = Field(ge=0)
    ok: bool
    error: Text = ""
    link_failed: bool = False  # it failed because a link to a neighbour did (the coordinator re-plans)


class StageAbort(Message):
    """Server ends a run on this device: another of its devices went away."""

    TYPE: ClassVar[str] = "stage_abort"
    run_id: str
    reason: Text
