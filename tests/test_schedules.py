"""Pipeline schedules: complete, causal, deadlock-free, memory-bounded, and with the textbook bubble."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuranet.pipeline.schedules import (
    Op,
    ScheduleDeadlock,
    UnknownSchedule,
    bubble_fraction,
    gpipe,
    one_f_one_b,
    peak_in_flight,
    schedule,
    simulate,
)

BUILDERS = [gpipe, one_f_one_b]
sizes = given(num_stages=st.integers(1, 12), num_microbatches=st.integers(1, 24))


@pytest.mark.parametrize("build", BUILDERS)
@sizes
def test_every_stage_runs_each_pass_of_each_microbatch_once(build, num_stages: int, num_microbatches: int) -> None:
    stages = build(num_stages, num_microbatches)
    assert len(stages) == num_stages
    expected = sorted((k, i) for k in "BF" for i in range(num_microbatches))
    for ops in stages:
        assert sorted((op.kind, op.mb) for op in ops) == expected


@pytest.mark.parametrize("build", BUILDERS)
@sizes
def test_backward_follows_forward_on_each_stage(build, num_stages: int, num_microbatches: int) -> None:
    for ops in build(num_stages, num_microbatches):
        for i in range(num_microbatches):
            assert ops.index(Op("B", i)) > ops.index(Op("F", i))


@pytest.mark.parametrize("build", BUILDERS)
@sizes
def test_no_deadlock_with_blocking_single_slot_links(build, num_stages: int, num_microbatches: int) -> None:
    result = simulate(build(num_stages, num_microbatches), link_capacity=1)
    assert all(len(busy) == 2 * num_microbatches for busy in result.busy)


@sizes
def test_one_f_one_b_bounds_activations_in_flight(num_stages: int, num_microbatches: int) -> None:
    for s, ops in enumerate(one_f_one_b(num_stages, num_microbatches)):
        assert peak_in_flight(ops) == min(num_stages - s, num_microbatches)


@sizes
def test_gpipe_holds_every_microbatch(num_stages: int, num_microbatches: int) -> None:
    assert all(peak_in_flight(ops) == num_microbatches for ops in gpipe(num_stages, num_microbatches))


@pytest.mark.parametrize("build", BUILDERS)
@given(num_stages=st.integers(1, 8), num_microbatches=st.integers(1, 16),
       forward=st.integers(1, 4), backward=st.integers(1, 4))
def test_simulated_bubble_matches_theory(build, num_stages: int, num_microbatches: int,
                                         forward: int, backward: int) -> None:
    result = simulate(build(num_stages, num_microbatches), forward, backward)
    assert result.bubble == pytest.approx(bubble_fraction(num_stages, num_microbatches), abs=1e-12)
    assert result.makespan == (num_microbatches + num_stages - 1) * (forward + backward)


@pytest.mark.parametrize(("stages", "microbatches", "expected"),
                         [(1, 1, 0.0), (1, 8, 0.0), (2, 1, 0.5), (4, 1, 0.75), (4, 4, 3 / 7), (4, 8, 3 / 11),
                          (8, 32, 7 / 39)])
def test_bubble_fraction_known_values(stages: int, microbatches: int, expected: float) -> None:
    assert bubble_fraction(stages, microbatches) == pytest.approx(expected)


def test_measured_bubble_for_four_stages_four_microbatches() -> None:
    result = simulate(one_f_one_b(4, 4), forward=1, backward=2)
    assert result.makespan == 21  # (M + K - 1) ticks of F+B
    assert result.bubble == pytest.approx(3 / 7)


def test_one_f_one_b_known_order() -> None:
    assert [repr(op) for op in one_f_one_b(3, 4)[0]] == "F0 F1 F2 B0 F3 B1 B2 B3".split()
    assert [repr(op) for op in one_f_one_b(3, 4)[2]] == "F0 B0 F1 B1 F2 B2 F3 B3".split()


def test_simulator_detects_deadlock() -> None:
    crossed = [[Op("B", 0), Op("F", 0)], [Op("F", 0), Op("B", 0)]]
    with pytest.raises(ScheduleDeadlock) as info:
        simulate(crossed)
    assert info.value.waiting == {0: Op("B", 0), 1: Op("F", 0)}


def test_simulator_rejects_out_of_order_arrivals() -> None:
    swapped = [[Op("F", 0), Op("F", 1), Op("B", 0), Op("B", 1)], [Op("F", 1), Op("F", 0), Op("B", 0), Op("B", 1)]]
    with pytest.raises(ValueError, match="wants F1 but 0 arrives first"):
        simulate(swapped, link_capacity=2)


def test_schedule_by_name_and_bad_name() -> None:
    assert schedule("1F1B", 2, 3) == one_f_one_b(2, 3)
    assert schedule("gpipe", 2, 3) == gpipe(2, 3)
    with pytest.raises(UnknownSchedule, match=r"'pipedream'.*1f1b, gpipe"):
        schedule("pipedream", 2, 3)


@pytest.mark.parametrize(("stages", "microbatches"), [(0, 1), (1, 0), (-1, 4)])
def test_sizes_must_be_positive(stages: int, microbatches: int) -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        gpipe(stages, microbatches)
    with pytest.raises(ValueError, match="at least one stage"):
        bubble_fraction(stages, microbatches)
