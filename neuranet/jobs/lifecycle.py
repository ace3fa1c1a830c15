"""One job's lifecycle as pure state: no I/O, no clocks (times come in as arguments).

    queued → assigned → preparing → running → uploading → succeeded
                                                          | failed | cancelled | timed_out

The coordinator's job book feeds a :class:`JobLife` what happens (matched to a host, the host's
reports, the host lost or back, the user cancelling) and carries out the :class:`Effect` each call
returns (assign the job to a host, tell a host to stop an attempt). The rules:

- Reports name the attempt they belong to; one from another attempt, or from a host that is not the
  attempt's, changes nothing (a host that was taken away and came back is told to stop instead).
- States only move forward within an attempt (a late ``preparing`` after ``running`` is ignored).
- A host lost while it holds the job (assigned … uploading) gets the job taken away: it is queued
  again, that host excluded, and resumes from the last checkpoint uploaded. After ``max_reissues``
  reissues the job fails, saying so. A host that ends an attempt with a *host* fault (it could not
  fetch the archive, its sandbox broke) is treated the same way; a fault of the *job* (exit code, a
  limit, a bad archive) ends it.
- Cancelling a job that has ended is a `JobConflict`; cancelling a held one stops its host.

Every attempt is kept (host, times, outcome, resources used): the record trust builds on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from neuranet.errors import Conflict, Invalid


class JobConflict(Conflict):
    """What was asked does not fit the job's state (cancel a finished job, say)."""


class JobState(str, Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    PREPARING = "preparing"
    RUNNING = "running"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def ended(self) -> bool:
        return self in ENDED

    @property
    def held(self) -> bool:
        """A host holds the job (it was assigned and has not ended)."""
        return self in HELD


ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})
HELD = frozenset({JobState.ASSIGNED, JobState.PREPARING, JobState.RUNNING, JobState.UPLOADING})
ORDER = {s: i for i, s in enumerate(JobState)}  # forward order within an attempt
REPORTED = frozenset({JobState.PREPARING, JobState.RUNNING, JobState.UPLOADING})  # what a host may report


class Outcome(str, Enum):
    """How a host says an attempt ended."""

    SUCCEEDED = "succeeded"  # exit 0, outputs uploaded
    FAILED = "failed"  # the job's fault: a non-zero exit, a limit, a bad archive or requirement
    TIMED_OUT = "timed_out"  # past its time limit
    CANCELLED = "cancelled"  # stopped because it was told to
    HOST_ERROR = "host_error"  # the host's fault (fetch failed, sandbox broke): run it elsewhere


@dataclass(frozen=True)
class Attempt:
    number: int
    host: str
    assigned_at: float
    state: JobState = JobState.ASSIGNED
    resumed_from: str | None = None  # the checkpoint it started from
    ended_at: float | None = None
    outcome: str | None = None  # an Outcome value, or "lost" (host went away), "cancelled"
    exit_code: int | None = None
    reason: str = ""
    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    max_rss_bytes: int | None = None


@dataclass(frozen=True)
class Assign:
    """Send attempt ``attempt`` of the job to ``host``, resuming from ``checkpoint`` when there is one."""

    host: str
    attempt: int
    checkpoint: str | None


@dataclass(frozen=True)
class Stop:
    """Tell ``host`` to stop attempt ``attempt`` (cancelled, or taken from it while it was away)."""

    host: str
    attempt: int
    reason: str


Effect = Assign | Stop


@dataclass(frozen=True)
class Usage:
    """What an attempt used, as the host measured it."""

    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    max_rss_bytes: int | None = None


@dataclass
class JobLife:
    """The state of one job; each method applies one event and returns the effects to carry out."""

    job_id: str
    max_reissues: int = 3
    state: JobState = JobState.QUEUED
    reason: str = ""  # why it waits, or how it ended
    exit_code: int | None = None
    checkpoint: str | None = None  # digest of the last checkpoint uploaded (any attempt)
    outputs: str | None = None  # digest of the outputs, once uploaded
    attempts: list[Attempt] = field(default_factory=list)
    reissues: int = 0

    # --- reading -------------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        return len(self.attempts)

    @property
    def host(self) -> str | None:
        """The host holding the job now, if one does."""
        return self.attempts[-1].host if self.state.held else None

    @property
    def excluded(self) -> frozenset[str]:
        """Hosts the job was taken from or that failed it through their own fault: not matched again."""
        return frozenset(a.host for a in self.attempts if a.outcome in ("lost", Outcome.HOST_ERROR.value))

    def current(self, attempt: int, host: str) -> bool:
        """Whether a report of ``attempt`` from ``host`` is about the attempt in progress."""
        return self.state.held and attempt == self.attempt and self.attempts[-1].host == host

    # --- events --------------------------------------------------------------------------

    def waiting(self, reason: str) -> list[Effect]:
        """The matcher found no host for it now: keep it queued, saying why."""
        if self.state is JobState.QUEUED:
            self.reason = reason
        return []

    def assign(self, host: str, at: float) -> list[Effect]:
        """Matched to ``host``: a new attempt there."""
        if self.state is not JobState.QUEUED:
            raise JobConflict(f"job {self.job_id} is {self.state.value}, not queued: it cannot be assigned")
        if not host:
            raise Invalid("a job is assigned to a host, not to no one")
        self.attempts.append(Attempt(self.attempt + 1, host, at, resumed_from=self.checkpoint))
        self.state, self.reason = JobState.ASSIGNED, ""
        return [Assign(host, self.attempt, self.checkpoint)]

    def reported(self, host: str, attempt: int, state: JobState) -> list[Effect]:
        """The host says the attempt is preparing, running or uploading."""
        if state not in REPORTED or not self.current(attempt, host) or ORDER[state] <= ORDER[self.state]:
            return []
        self.state = state
        self._update(state=state)
        return []

    def checkpointed(self, host: str, attempt: int, digest: str) -> list[Effect]:
        """The attempt uploaded a whole checkpoint: a reissue resumes from it."""
        if self.current(attempt, host):
            self.checkpoint = digest
        return []

    def finished(self, host: str, attempt: int, outcome: Outcome, at: float, *, exit_code: int | None = None,
                 reason: str = "", usage: Usage = Usage(), outputs: str | None = None) -> list[Effect]:
        """The host says the attempt ended."""
        if not self.current(attempt, host):
            return []
        if outcome is Outcome.HOST_ERROR:
            return self._take_away(at, "host_error", reason or "the host could not run it", exit_code, usage)
        if outcome is Outcome.SUCCEEDED and outputs is None:
            outcome, reason = Outcome.FAILED, reason or "the host reported success without uploading the outputs"
        self._end_attempt(at, outcome.value, exit_code, reason, usage)
        self.state = JobState(outcome.value)
        self.exit_code, self.reason = exit_code, reason
        if outputs is not None:
            self.outputs = outputs
        return []

    def host_lost(self, host: str, at: float) -> list[Effect]:
        """``host`` went offline (or missed its heartbeats past the grace)."""
        if not self.state.held or self.attempts[-1].host != host:
            return []
        return self._take_away(at, "lost", f"host {host} went offline", None, Usage())

    def host_back(self, host: str) -> list[Effect]:
        """``host`` is online again: stop any attempt of this job it may still run that is not the current one."""
        return [Stop(host, a.number, "the job was given to another host while this one was away")
                for a in self.attempts if a.host == host and a.outcome == "lost"]

    def cancel(self, at: float, why: str = "cancelled by its owner") -> list[Effect]:
        if self.state.ended:
            raise JobConflict(f"job {self.job_id} has already {_ended_text(self.state)}")
        effects: list[Effect] = []
        if self.state.held:
            held = self.attempts[-1]
            effects.append(Stop(held.host, held.number, why))
            self._end_attempt(at, "cancelled", None, why, Usage())
        self.state, self.reason = JobState.CANCELLED, why
        return effects

    def timed_out_queued(self, why: str) -> list[Effect]:
        """Queued past what its owner allowed (or it can never be matched): it ends failed, saying why."""
        if self.state is JobState.QUEUED:
            self.state, self.reason = JobState.FAILED, why
        return []

    # --- inside ----------------------------------------------------------------------------

    def _take_away(self, at: float, outcome: str, why: str, exit_code: int | None, usage: Usage) -> list[Effect]:
        self._end_attempt(at, outcome, exit_code, why, usage)
        if self.reissues >= self.max_reissues:
            self.state = JobState.FAILED
            self.reason = f"{why}; given up after {self.attempt} attempts"
            return []
        self.reissues += 1
        self.state = JobState.QUEUED
        self.reason = f"{why}; queued again" + (" to resume from its last checkpoint" if self.checkpoint else "")
        return []

    def _end_attempt(self, at: float, outcome: str, exit_code: int | None, reason: str, usage: Usage) -> None:
        self._update(ended_at=at, outcome=outcome, exit_code=exit_code, reason=reason, cpu_seconds=usage.cpu_seconds,
                     wall_seconds=usage.wall_seconds, max_rss_bytes=usage.max_rss_bytes)

    def _update(self, **changes: object) -> None:
        self.attempts[-1] = replace(self.attempts[-1], **changes)  # type: ignore[arg-type]


def _ended_text(state: JobState) -> str:
    return {JobState.SUCCEEDED: "succeeded", JobState.FAILED: "failed", JobState.CANCELLED: "been cancelled",
            JobState.TIMED_OUT: "timed out"}[state]
