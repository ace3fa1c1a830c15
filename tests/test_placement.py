"""Replica placement, repair and migration decisions: pure functions, checked by hand and by brute force."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.storage.placement import (
    ChunkState,
    DeviceView,
    PlacementError,
    availability,
    place,
    plan_moves,
)

MiB = 2 ** 20


def dev(name: str, *p: float, online: bool = True, free: int = 100 * MiB) -> DeviceView:
    return DeviceView(name, online, tuple(p) if len(p) == 4 else tuple(p) * 4, free)


def test_availability_by_hand() -> None:
    a, b = dev("a", 0.9), dev("b", 0.5)
    assert availability([]) == 0.0
    assert availability([a]) == pytest.approx(0.9)
    assert availability([a, b]) == pytest.approx(1 - 0.1 * 0.5)
    # Weighted over horizons: online now, gone later.
    fading = dev("c", 1.0, 1.0, 0.0, 0.0)
    assert availability([fading]) == pytest.approx(3.5 / 24)  # readable for the first 3.5 h of the day
    assert availability([fading], weights=(1, 1, 1, 1)) == pytest.approx(0.5)
    assert availability([fading], weights=(1, 0, 0, 0)) == pytest.approx(1.0)


def test_place_prefers_reliable_devices_and_spread() -> None:
    # Two day machines that sleep at the same hours and one night machine: the second replica goes
    # to the night machine although the other day machine is more reliable on average.
    day1 = dev("day1", 1.0, 1.0, 0.0, 1.0)
    day2 = dev("day2", 1.0, 1.0, 0.0, 0.95)
    night = dev("night", 0.5, 0.5, 1.0, 0.5)
    even = (1, 1, 1, 1)
    assert place(MiB, 2, [day2, night, day1], weights=even) == ["day1", "night"]
    assert place(MiB, 1, [night, day1], weights=even) == ["day1"]
    # By default the 6 h and 24 h forecasts stand for most of the day: the night machine comes first.
    assert place(MiB, 2, [day2, night, day1]) == ["night", "day1"]


def test_place_respects_quota_holders_exclusions_and_online() -> None:
    devices = [dev("full", 0.99, free=10), dev("off", 0.99, online=False), dev("ok", 0.5), dev("meh", 0.3)]
    assert place(MiB, 3, devices) == ["ok", "meh"]  # fewer than asked: no one else may take it
    assert place(MiB, 3, devices, online_only=False) == ["off", "ok", "meh"]
    assert place(MiB, 3, devices, holders=["ok"]) == ["meh"]
    assert place(MiB, 2, devices, exclude=["ok"]) == ["meh"]
    assert place(MiB, 1, devices, holders=["ok"]) == []  # already has its replica
    # A ledger of free space that a caller keeps across several chunks.
    assert place(MiB, 1, devices, free={"ok": 0}) == ["meh"]


def test_place_errors_say_what_is_short() -> None:
    with pytest.raises(PlacementError, match="quota full.*most free space left is 10 bytes"):
        place(MiB, 1, [dev("a", 0.9, free=10)])
    with pytest.raises(PlacementError, match="no device is online"):
        place(MiB, 1, [dev("a", 0.9, online=False)])
    with pytest.raises(PlacementError, match="no device to store it on"):
        place(MiB, 2, [dev("a", 0.9)], holders=["a"])
    with pytest.raises(ValueError):
        place(-1, 1, [dev("a", 0.9)])
    with pytest.raises(ValueError, match="probabilities"):
        dev("bad", 1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
                min_size=2, max_size=7), st.integers(1, 3))
def test_greedy_is_near_the_best_set(probs: list[tuple[float, ...]], k: int) -> None:
    devices = [DeviceView(f"d{i}", True, p, MiB) for i, p in enumerate(probs)]
    k = min(k, len(devices))
    chosen = place(1, k, devices)
    best = max(availability(s) for s in itertools.combinations(devices, k))
    got = availability([d for d in devices if d.device_id in chosen])
    assert len(chosen) == k
    assert got >= (1 - 1 / 2.718281828) * best - 1e-9  # submodular greedy's guarantee
    assert got >= best - 0.25  # and in practice close


def test_repair_replaces_a_lost_holder_from_an_online_one() -> None:
    devices = [dev("a", 0.9), dev("b", 0.8, online=False), dev("c", 0.7), dev("d", 0.6)]
    chunk = ChunkState("x", MiB, ("a", "b", "c"), replicas=3)
    moves = plan_moves([chunk], devices, budget_bytes=10 * MiB, lost=["b"])
    assert [(m.source, m.target, m.drop, m.reason) for m in moves] == [("a", "d", "b", "repair")]
    # Nothing to copy from: the only holders are offline or lost.
    stuck = ChunkState("y", MiB, ("b",), replicas=2)
    assert plan_moves([stuck], [dev("b", 0.8, online=False), dev("c", 0.7)], 10 * MiB, lost=["b"]) == []


def test_migration_moves_off_a_device_about_to_leave_and_keeps_good_replicas() -> None:
    leaving = dev("leaving", 1.0, 0.1, 0.0, 0.0)
    steady = dev("steady", 0.6)
    spare = dev("spare", 0.95)
    chunk = ChunkState("x", MiB, ("leaving", "steady"), replicas=2, target=0.95)
    [move] = plan_moves([chunk], [leaving, steady, spare], budget_bytes=MiB)
    assert (move.source, move.target, move.drop, move.reason) == ("leaving", "spare", "leaving", "migrate")
    # Already above its target: left alone.
    fine = ChunkState("y", MiB, ("spare", "steady"), replicas=2, target=0.9)
    assert plan_moves([fine], [leaving, steady, spare], budget_bytes=MiB) == []


def test_migration_needs_a_clear_gain() -> None:
    a, b, c = dev("a", 0.70), dev("b", 0.70), dev("c", 0.71)
    chunk = ChunkState("x", MiB, ("a", "b"), replicas=2, target=0.99)
    assert plan_moves([chunk], [a, b, c], budget_bytes=MiB) == []  # 0.71 for 0.70: not worth a copy


def test_budget_limits_copies_and_the_most_urgent_go_first() -> None:
    devices = [dev("a", 0.3), dev("b", 0.9), dev("c", 0.9), dev("gone", 0.0, online=False)]
    short = ChunkState("short", MiB, ("a", "gone"), replicas=2)
    risky = ChunkState("risky", MiB, ("a",), replicas=1, target=0.9)
    moves = plan_moves([risky, short], devices, budget_bytes=MiB, lost=["gone"])
    assert [m.chunk for m in moves] == ["short"]
    both = plan_moves([risky, short], devices, budget_bytes=2 * MiB, lost=["gone"])
    assert [m.chunk for m in both] == ["short", "risky"]
    # One plan never overfills a device: b has room for one chunk only.
    tight = [dev("a", 0.3), dev("b", 0.9, free=MiB), dev("c", 0.5)]
    chunks = [ChunkState(f"k{i}", MiB, ("a",), replicas=1, target=0.9) for i in range(2)]
    assert sorted(m.target for m in plan_moves(chunks, tight, budget_bytes=10 * MiB)) == ["b", "c"]
