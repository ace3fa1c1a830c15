"""Job-plane messages: the compute market between the coordinator and a host agent.

A host offers part of its machine (`JobHostOffer`, inside its profile); the coordinator assigns an
attempt of a job (`JobAssign`); the host fetches the project archive and the checkpoint to resume
from in parts (`JobFetch` → `JobData`), reports its state (`JobStatus`), streams its output
(`JobLog`), uploads checkpoints and the outputs in parts (`JobUpload`), and says how it ended
(`JobDone`). `JobStop` takes an attempt back. Every message names the job and the attempt; a host
acts on, and the coordinator accepts, only the attempt in progress.

Registered like every message (`message_base`); `messages` re-exports them.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from neuranet.protocol.message_base import ID_FIELD, INT64_MAX, Message, Text
from neuranet.protocol.parts import split

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
JOB_PART_BYTES = 1024 * 1024  # archives, checkpoints and outputs travel in parts of this size
MAX_LOG_CHUNK = 64 * 1024  # bytes of output per JobLog
MAX_ARGS = 256
MAX_REQUIREMENTS = 512


class JobHostOffer(BaseModel):
    """What a host offers other users' jobs (``--host-jobs --max-cpus … --max-ram …``), in its profile."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    cpus: float = Field(gt=0, le=4096)
    ram_bytes: int = Field(gt=0, le=INT64_MAX)
    disk_bytes: int = Field(gt=0, le=INT64_MAX)
    gpus: int = Field(0, ge=0, le=64)
    os: str = Field("", max_length=32)  # platform.system().lower(): "linux"
    arch: str = Field("", max_length=32)  # platform.machine(): "x86_64"
    python: str = Field("", max_length=16)  # "3.11"
    torch: str = Field("", max_length=32)  # torch.__version__ of the runtime jobs get
    sandbox: str = Field("", max_length=64)  # what isolates jobs ("bubblewrap 0.8.0")


class JobAssign(Message):
    """Run attempt ``attempt`` of a job: fetch its archive (and checkpoint), unpack, install, run."""

    TYPE: ClassVar[str] = "job_assign"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    archive: Digest
    archive_bytes: int = Field(ge=0, le=INT64_MAX)
    entry: str = Field(min_length=1, max_length=1024)
    args: list[str] = Field(default_factory=list, max_length=MAX_ARGS)
    requirements: list[str] = Field(default_factory=list, max_length=MAX_REQUIREMENTS)
    cpus: float = Field(gt=0, le=4096)
    ram_bytes: int = Field(gt=0, le=INT64_MAX)
    disk_bytes: int = Field(gt=0, le=INT64_MAX)
    gpus: int = Field(0, ge=0, le=64)
    time_limit_s: float = Field(gt=0)
    checkpoint: Digest | None = None  # resume: fetch this checkpoint into the checkpoint directory first
    checkpoint_bytes: int = Field(0, ge=0, le=INT64_MAX)
    checkpoint_dir: str = Field("", max_length=1024)  # inside the project; "" = a directory of its own


class JobFetch(Message):
    """Host asks for ``what`` of its attempt from byte ``offset``; answered by one `JobData`."""

    TYPE: ClassVar[str] = "job_fetch"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    what: Literal["archive", "checkpoint"]
    offset: int = Field(0, ge=0, le=INT64_MAX)


class JobData(Message):
    """Up to `JOB_PART_BYTES` of what was fetched, from ``offset`` (payload); ``last`` at the end.
    ``error`` (and no payload) when it cannot be had: the attempt ends as a host error."""

    TYPE: ClassVar[str] = "job_data"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    what: Literal["archive", "checkpoint"]
    offset: int = Field(0, ge=0, le=INT64_MAX)
    last: bool = False
    error: Text = ""


class JobStatus(Message):
    TYPE: ClassVar[str] = "job_status"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    state: Literal["preparing", "running", "uploading"]
    detail: Text = ""


class JobLog(Message):
    """Output of the attempt (payload, at most `MAX_LOG_CHUNK` bytes) from ``stream``; ``offset`` is
    where it starts in that attempt's output, so a resent chunk is recognised."""

    TYPE: ClassVar[str] = "job_log"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    stream: Literal["stdout", "stderr", "note"]
    offset: int = Field(0, ge=0, le=INT64_MAX)


class JobUpload(Message):
    """Part ``part`` of ``parts`` (payload) of a checkpoint (a tar.gz of the checkpoint directory) or of
    the outputs (a tar.gz of the output directory), named by its SHA-256."""

    TYPE: ClassVar[str] = "job_upload"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    kind: Literal["checkpoint", "outputs"]
    digest: Digest
    size: int = Field(ge=0, le=INT64_MAX)
    part: int = Field(ge=0)
    parts: int = Field(ge=1)


class JobDone(Message):
    """The attempt ended (``outcome``: a `neuranet.jobs.lifecycle.Outcome` value)."""

    TYPE: ClassVar[str] = "job_done"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    outcome: Literal["succeeded", "failed", "timed_out", "cancelled", "host_error"]
    exit_code: int | None = None
    reason: Text = ""
    outputs: Digest | None = None  # uploaded before this message
    cpu_seconds: float | None = Field(None, ge=0)
    wall_seconds: float | None = Field(None, ge=0)
    max_rss_bytes: int | None = Field(None, ge=0, le=INT64_MAX)


class JobStop(Message):
    """Coordinator takes attempt ``attempt`` back: the host kills it and answers (if it still runs) with
    a `JobDone` ``cancelled``."""

    TYPE: ClassVar[str] = "job_stop"
    job_id: str = ID_FIELD
    attempt: int = Field(ge=1)
    reason: Text = ""


def job_parts(blob: bytes) -> list[bytes]:
    """``blob`` cut into the payloads of JobUpload messages (at least one)."""
    return split(blob, JOB_PART_BYTES)
