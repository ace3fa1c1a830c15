"""The job lifecycle's pure core: every transition, stale reports, reissue on a lost host, cancel, and
random event sequences that never break its rules (no I/O, no clocks)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.errors import Conflict
from neuranet.jobs.lifecycle import Assign, JobConflict, JobLife, JobState, Outcome, Stop, Usage

S = JobState


def running(host: str = "h1") -> JobLife:
    job = JobLife("j")
    job.assign(host, 10.0)
    job.reported(host, 1, S.PREPARING)
    job.reported(host, 1, S.RUNNING)
    return job


def test_the_happy_path_records_the_attempt() -> None:
    job = JobLife("j")
    assert job.state is S.QUEUED and job.host is None and job.attempt == 0
    assert job.waiting("needs 4 GiB RAM; the most any host has free is 2 GiB") == []
    assert "4 GiB" in job.reason
    assert job.assign("h1", 10.0) == [Assign("h1", 1, None)]
    assert job.state is S.ASSIGNED and job.host == "h1" and job.reason == ""
    for state in (S.PREPARING, S.RUNNING, S.UPLOADING):
        assert job.reported("h1", 1, state) == [] and job.state is state
    job.finished("h1", 1, Outcome.SUCCEEDED, 99.0, exit_code=0, usage=Usage(12.5, 89.0, 2**20), outputs="o" * 64)
    assert job.state is S.SUCCEEDED and job.exit_code == 0 and job.outputs == "o" * 64 and job.host is None
    (a,) = job.attempts
    assert (a.host, a.assigned_at, a.ended_at, a.outcome, a.cpu_seconds, a.max_rss_bytes) == \
        ("h1", 10.0, 99.0, "succeeded", 12.5, 2**20)


@pytest.mark.parametrize("outcome,state", [(Outcome.FAILED, S.FAILED), (Outcome.TIMED_OUT, S.TIMED_OUT),
                                           (Outcome.CANCELLED, S.CANCELLED)])
def test_a_job_fault_ends_it_with_the_reason(outcome: Outcome, state: JobState) -> None:
    job = running()
    job.finished("h1", 1, outcome, 50.0, exit_code=137, reason="killed: memory limit 4 GiB")
    assert job.state is state and job.reason == "killed: memory limit 4 GiB" and job.exit_code == 137
    assert job.attempts[-1].outcome == outcome.value


def test_success_without_outputs_is_a_failure() -> None:
    job = running()
    job.finished("h1", 1, Outcome.SUCCEEDED, 50.0, exit_code=0)
    assert job.state is S.FAILED and "without uploading the outputs" in job.reason


def test_states_only_move_forward_and_only_reported_ones() -> None:
    job = running()
    job.reported("h1", 1, S.PREPARING)  # late
    assert job.state is S.RUNNING
    for state in (S.QUEUED, S.ASSIGNED, S.SUCCEEDED, S.FAILED):
        job.reported("h1", 1, state)  # a host cannot claim these by a status report
        assert job.state is S.RUNNING


def test_reports_of_another_attempt_or_host_change_nothing() -> None:
    job = running()
    job.reported("h2", 1, S.UPLOADING)
    job.reported("h1", 2, S.UPLOADING)
    job.checkpointed("h2", 1, "c" * 64)
    job.finished("h1", 7, Outcome.SUCCEEDED, 1.0, outputs="x")
    job.finished("h2", 1, Outcome.FAILED, 1.0)
    assert job.state is S.RUNNING and job.checkpoint is None and job.attempts[-1].outcome is None


def test_a_lost_host_has_the_job_reissued_from_its_last_checkpoint() -> None:
    job = running()
    job.checkpointed("h1", 1, "c" * 64)
    assert job.host_lost("h2", 20.0) == [] and job.state is S.RUNNING  # not its host
    assert job.host_lost("h1", 20.0) == []
    assert job.state is S.QUEUED and "h1 went offline" in job.reason and "resume" in job.reason
    assert job.excluded == {"h1"} and job.attempts[0].outcome == "lost"
    assert job.assign("h2", 30.0) == [Assign("h2", 2, "c" * 64)]
    assert job.attempts[1].resumed_from == "c" * 64
    # The first host comes back: it is told to stop its old attempt; its late reports are ignored.
    assert job.host_back("h1") == [Stop("h1", 1, "the job was given to another host while this one was away")]
    job.finished("h1", 1, Outcome.SUCCEEDED, 40.0, outputs="o")
    assert job.state is S.ASSIGNED and job.host == "h2"
    assert job.host_back("h2") == []  # nothing of its own to stop


def test_a_host_fault_is_run_elsewhere_and_reissues_are_bounded() -> None:
    job = JobLife("j", max_reissues=2)
    for n, host in enumerate(["h1", "h2", "h3"], start=1):
        job.assign(host, float(n))
        job.finished(host, n, Outcome.HOST_ERROR, float(n) + 0.5, reason="cannot fetch the archive")
    assert job.state is S.FAILED and "given up after 3 attempts" in job.reason
    assert job.excluded == {"h1", "h2", "h3"} and job.reissues == 2


def test_cancel_queued_held_and_ended() -> None:
    queued = JobLife("q")
    assert queued.cancel(1.0) == [] and queued.state is S.CANCELLED
    held = running()
    assert held.cancel(5.0) == [Stop("h1", 1, "cancelled by its owner")]
    assert held.state is S.CANCELLED and held.attempts[-1].outcome == "cancelled"
    held.finished("h1", 1, Outcome.CANCELLED, 6.0)  # the host's confirmation changes nothing now
    assert held.state is S.CANCELLED
    with pytest.raises(JobConflict, match="already been cancelled"):
        held.cancel(7.0)
    assert issubclass(JobConflict, Conflict)


def test_assign_only_from_the_queue() -> None:
    job = running()
    with pytest.raises(JobConflict, match="is running, not queued"):
        job.assign("h2", 1.0)


def test_a_queued_job_can_be_ended_when_it_can_never_run() -> None:
    job = JobLife("j")
    job.timed_out_queued("needs 64 CPUs; no host could ever offer that")
    assert job.state is S.FAILED and "64 CPUs" in job.reason
    job2 = running()
    job2.timed_out_queued("x")
    assert job2.state is S.RUNNING


# --- random event sequences -------------------------------------------------------------

HOSTS = ["h1", "h2", "h3"]
events = st.lists(st.one_of(
    st.tuples(st.just("assign"), st.sampled_from(HOSTS)),
    st.tuples(st.just("report"), st.sampled_from(HOSTS), st.integers(0, 4), st.sampled_from(list(JobState))),
    st.tuples(st.just("finish"), st.sampled_from(HOSTS), st.integers(0, 4), st.sampled_from(list(Outcome)),
              st.booleans()),
    st.tuples(st.just("checkpoint"), st.sampled_from(HOSTS), st.integers(0, 4)),
    st.tuples(st.just("lost"), st.sampled_from(HOSTS)),
    st.tuples(st.just("back"), st.sampled_from(HOSTS)),
    st.tuples(st.just("cancel"),),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(events)
def test_no_event_sequence_breaks_the_rules(seq: list[tuple]) -> None:
    job = JobLife("j", max_reissues=3)
    t = 0.0
    for event in seq:
        t += 1.0
        before = (job.state, job.attempt, list(job.attempts))
        kind = event[0]
        try:
            if kind == "assign":
                effects = job.assign(event[1], t)
            elif kind == "report":
                effects = job.reported(event[1], event[2], event[3])
            elif kind == "finish":
                effects = job.finished(event[1], event[2], event[3], t, outputs="o" if event[4] else None)
            elif kind == "checkpoint":
                effects = job.checkpointed(event[1], event[2], f"c{t}")
            elif kind == "lost":
                effects = job.host_lost(event[1], t)
            elif kind == "back":
                effects = job.host_back(event[1])
            else:
                effects = job.cancel(t)
        except JobConflict:
            assert (job.state, job.attempt, job.attempts) == before  # a refusal changes nothing
            continue
        if before[0].ended:
            assert job.state is before[0] and job.attempts == before[2]  # an ended job stays as it ended
        assert job.reissues <= 3
        assert (job.host is not None) == job.state.held
        assert [a.number for a in job.attempts] == list(range(1, job.attempt + 1))
        assert all(a.ended_at is not None for a in job.attempts[:-1])  # only the last attempt may be open
        if job.state.held:
            assert job.attempts[-1].ended_at is None
        for e in effects:
            if isinstance(e, Assign):
                assert e.attempt == job.attempt and e.host == job.host
            else:
                assert any(a.number == e.attempt and a.host == e.host for a in job.attempts)
