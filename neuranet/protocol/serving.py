"""Serving-plane messages: a served stage's assignment, weights parts and status, request inputs and
outputs, and the stop of a deployment.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from neuranet.protocol.runs import StageSpec
from neuranet.protocol.message_base import Message, Text


# --- serving (inference across devices) ------------------------------------------------


class ServeAssign(StageSpec):
    """Server tells a device which layers of a model it serves for a deployment, and its neighbours.

    ``weights_parts`` > 0: the weights (safetensors of the whole model's ``<layer>.<param>``, this
    stage's layers at least) follow as that many ServeWeights parts; 0: the model's own weights.
    """

    TYPE: ClassVar[str] = "serve_assign"
    weights_parts: int = Field(0, ge=0)


class ServeWeights(Message):
    """Part ``part`` of ``parts`` of the weights a served stage loads (safetensors, in the payload)."""

    TYPE: ClassVar[str] = "serve_weights"
    run_id: str
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


class ServeStatus(Message):
    """A served stage is loaded and linked (``ok``), or failed and stopped (``error``)."""

    TYPE: ClassVar[str] = "serve_status"
    run_id: str
    stage: int = Field(ge=0)
    attempt: int = Field(0, ge=0)  # of the assignment it answers: reports of an older one are ignored
    ok: bool
    error: Text = ""


class ServeInput(Message):
    """Server hands the first stage part ``part`` of ``parts`` of request ``request``'s input batch (payload:
    the tensor's bytes); a batch is cut along its first dimension to fit the message limits."""

    TYPE: ClassVar[str] = "serve_input"
    run_id: str
    attempt: int = Field(0, ge=0)
    request: int = Field(ge=0)
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1)
    tensor: dict[str, Any]


class ServeOutput(Message):
    """The last stage returns part of a request's output (``tensor``; payload: its bytes), or any stage
    reports that the request failed there (``error``)."""

    TYPE: ClassVar[str] = "serve_output"
    run_id: str
    stage: int = Field(ge=0)
    attempt: int = Field(0, ge=0)  # of the assignment it answers: reports of an older one are ignored
    request: int = Field(ge=0)
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1)
    tensor: dict[str, Any] | None = None
    error: Text = ""


class ServeStop(Message):
    """Server ends a deployment on this device."""

    TYPE: ClassVar[str] = "serve_stop"
    run_id: str
    reason: Text = ""
