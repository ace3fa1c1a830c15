"""The pipeline planner: exact against brute force on small cases, and the behaviour users rely on."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuranet.pipeline.partition import evaluate, plan
from neuranet.pipeline.profiles import GiB, DeviceProfile, LayerProfile, Link, PlanError, Workload

MB = 10**6


def layer(name: str, gflop: float = 1.0, act: int = MB, params: int = 10 * MB, saved: int | None = None) -> LayerProfile:
    return LayerProfile(name, gflop * 1e9, act, params, saved)


def devices(speeds: list[float], free: float = 4 * GiB, bandwidth: float = 100 * MB, latency: float = 1e-3) -> list[DeviceProfile]:
    """Fully linked devices d0, d1, ... with the given GFLOP/s."""
    ids = [f"d{i}" for i in range(len(speeds))]
    return [
        DeviceProfile(i, g, int(free), {j: Link(bandwidth, latency) for j in ids if j != i})
        for i, g in zip(ids, speeds)
    ]


def brute_force(layers, devs, objective, workload) -> float | None:
    """Best step time over every ordered subset of devices and every contiguous split."""
    best = None
    n = len(layers)
    for k in range(1, min(len(devs), n) + 1):
        for order in itertools.permutations(devs, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                try:
                    p = evaluate(layers, order, list(zip(bounds, bounds[1:])), objective, workload)
                except PlanError:
                    continue
                best = p.step_time if best is None else min(best, p.step_time)
    return best


# -- against brute force -------------------------------------------------------

layer_st = st.builds(
    LayerProfile,
    name=st.text("abc", min_size=1, max_size=3),
    flops=st.floats(1e8, 1e11),
    activation_bytes=st.integers(0, 10 * MB),
    param_bytes=st.integers(0, 100 * MB),
    saved_bytes=st.none() | st.integers(0, 50 * MB),
)


@st.composite
def scenarios(draw):
    layers = draw(st.lists(layer_st, min_size=1, max_size=7))
    objective = draw(st.sampled_from(["throughput", "latency"]))
    count = draw(st.integers(1, 3))
    # Free memory as a share of the model's weights (training: with gradients and
    # optimiser state), so that some cases need several devices and some cannot fit.
    model = (4 if objective == "throughput" else 1) * sum(x.param_bytes for x in layers) + 20 * MB
    ids = [f"d{i}" for i in range(count)]
    devs = []
    for i in ids:
        links = {}
        for j in ids:
            if j != i and draw(st.integers(1, 10)) < 10:  # one link in ten is missing
                links[j] = Link(draw(st.floats(1e7, 1e9)), draw(st.floats(0, 0.05)))
        devs.append(DeviceProfile(i, draw(st.floats(5, 50)), int(model * draw(st.floats(0.2, 1.5))), links))
    workload = Workload(draw(st.integers(1, 4)), draw(st.integers(4, 16)), draw(st.sampled_from([2.0, 0.0])))
    return layers, devs, objective, workload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_matches_brute_force(case):
    layers, devs, objective, workload = case
    expected = brute_force(layers, devs, objective, workload)
    if expected is None:
        with pytest.raises(PlanError):
            plan(layers, devs, objective, workload)
        return
    got = plan(layers, devs, objective, workload)
    assert got.step_time == pytest.approx(expected, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_stages_are_contiguous_half_open_and_fit(case):
    layers, devs, objective, workload = case
    try:
        p = plan(layers, devs, objective, workload)
    except PlanError:
        return
    assert p.stages[0].start == 0 and p.stages[-1].stop == len(layers)
    assert all(a.stop == b.start for a, b in zip(p.stages, p.stages[1:]))
    assert sorted(i for s in p.stages for i in s.layers) == list(range(len(layers)))
    assert len(set(p.devices)) == len(p.devices)
    assert all(s.memory_bytes <= s.free_bytes for s in p.stages)


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_heuristic_for_many_devices_is_valid_and_never_beats_exact(objective):
    layers = [layer(f"l{i}", gflop=1 + i % 3, act=MB * (1 + i % 2)) for i in range(9)]
    devs = devices([5, 80, 20, 40, 10, 60], free=0.5 * GiB)
    exact = plan(layers, devs, objective)
    heuristic = plan(layers, devs, objective, exact_limit=3)
    assert heuristic.step_time >= exact.step_time * (1 - 1e-12)
    fastest_first = sorted(devs, key=lambda d: -d.gflops)[:3]
    even = evaluate(layers, fastest_first, [(0, 3), (3, 6), (6, 9)], objective)
    assert heuristic.step_time <= even.step_time


# -- the cost model, worked by hand ---------------------------------------------

def test_cost_model_by_hand():
    layers = [layer("a", gflop=2, act=4 * MB, params=MB, saved=8 * MB), layer("b", gflop=6, act=MB, params=3 * MB)]
    devs = [
        DeviceProfile("x", 10, GiB, {"y": Link(20 * MB, 0.01)}),
        DeviceProfile("y", 30, GiB, {"x": Link(10 * MB, 0.02)}),
    ]
    w = Workload(micro_batch=2, micro_batches=4, optimizer_state_factor=2.0, backward_factor=2.0)
    p = evaluate(layers, devs, [(0, 1), (1, 2)], "throughput", w)
    x, y = p.stages
    assert x.compute_time == pytest.approx(2 * 2e9 * 3 / 10e9)  # 1.2 s: samples x FLOPs x (1 + backward)
    assert y.compute_time == pytest.approx(2 * 6e9 * 3 / 30e9)  # 1.2 s
    assert x.send_time == pytest.approx(0.01 + 8 * MB / (20 * MB))  # 0.41 s: two samples' activations
    assert x.return_time == pytest.approx(0.02 + 8 * MB / (10 * MB))  # 0.82 s: their gradients, reverse link
    assert x.memory_bytes == 4 * MB + 2 * 2 * 8 * MB  # 4x params; 2 micro-batches in flight x 2 samples saved
    assert y.memory_bytes == 4 * 3 * MB + 1 * 2 * MB
    assert p.bottleneck_time == pytest.approx(1.2)
    assert p.step_time == pytest.approx((4 + 2 - 1) * 1.2)
    q = evaluate(layers, devs, [(0, 1), (1, 2)], "latency", w)
    assert q.step_time == pytest.approx(2 * 2e9 / 10e9 + 0.41 + 2 * 6e9 / 30e9)
    assert q.stages[0].memory_bytes == MB + 2 * 2 * 4 * MB  # params + in and out buffers of the largest activation


# -- what users rely on ---------------------------------------------------------

def test_a_layer_too_big_for_any_device_is_named():
    layers = [layer("embed"), layer("huge", params=3 * GiB), layer("head")]
    with pytest.raises(PlanError, match=r"layer 1 \(huge\) needs 12.\d+ GiB but the largest device \(d1\) has 8.00 GiB free"):
        plan(layers, [DeviceProfile("d0", 10, 2 * GiB), DeviceProfile("d1", 20, 8 * GiB)])


def test_too_little_memory_in_all_says_how_much():
    layers = [layer(f"l{i}", params=GiB // 4) for i in range(8)]  # 8 GiB of training state
    with pytest.raises(PlanError, match=r"layers 0-7 .* need at least 8.\d+ GiB but the devices have 6.00 GiB free in all"):
        plan(layers, devices([10, 10, 10], free=2 * GiB))


def test_split_that_cannot_be_packed_says_what_is_left():
    # 3 + 3 + 3 GiB of layers on devices of 5, 5 and 1 GiB: enough in all, but no contiguous fit.
    layers = [layer(f"l{i}", params=3 * GiB // 4) for i in range(3)]
    devs = [DeviceProfile(d.id, 10, int(f * GiB), d.links) for d, f in zip(devices([10, 10, 10]), [5, 5, 1])]
    expected = (
        r"no contiguous split fits in memory: at best layers 1-2 .* fit on d0, d1; "
        r"layer 0 \(l0\) needs at least 3.\d+ GiB, but the devices left have 1.00 GiB free in all"
    )
    with pytest.raises(PlanError, match=expected):
        plan(layers, devs)


def test_a_much_faster_device_gets_more_layers():
    layers = [layer(f"l{i}") for i in range(12)]
    p = plan(layers, devices([10, 40]))
    sizes = {s.device: len(s.layers) for s in p.stages}
    assert sizes["d1"] > 2 * sizes["d0"]


def test_a_device_too_slow_to_help_is_left_out():
    layers = [layer(f"l{i}") for i in range(8)]
    devs = devices([50, 1])
    p = plan(layers, devs)
    assert p.devices == ("d0",)
    with_slow = [evaluate(layers, devs, [(0, k), (k, 8)]).step_time for k in range(1, 8)]
    assert min(with_slow) > p.step_time  # using it at all would be slower


def test_latency_and_throughput_choose_differently():
    # Two equal devices: pipelining halves the training tick, but one request
    # only pays the extra link hop.
    layers = [layer(f"l{i}") for i in range(8)]
    devs = devices([20, 20])
    train, serve = plan(layers, devs, "throughput"), plan(layers, devs, "latency")
    assert len(train.stages) == 2 and len(serve.stages) == 1
    assert serve.step_time < evaluate(layers, devs, train.ranges, "latency").step_time


def test_order_follows_the_fast_links():
    # Each device holds half the model; d0 -> d1 is slow and d1 -> d0 fast, so d1 goes first.
    layers = [layer(f"l{i}", act=50 * MB, params=GiB) for i in range(4)]
    devs = [
        DeviceProfile("d0", 10, int(2.5 * GiB), {"d1": Link(5 * MB)}),
        DeviceProfile("d1", 10, int(2.5 * GiB), {"d0": Link(500 * MB)}),
    ]
    p = plan(layers, devs, "latency", Workload(micro_batch=4))
    assert p.devices == ("d1", "d0")


def test_unlinked_devices_are_never_neighbours():
    layers = [layer(f"l{i}") for i in range(6)]
    devs = devices([10, 10, 10])
    devs[0] = DeviceProfile("d0", 10, 4 * GiB, {"d1": devs[0].links["d1"]})  # no d0 -> d2
    p = plan(layers, devs, "latency", Workload(micro_batch=1))
    assert all((a, b) != ("d0", "d2") for a, b in zip(p.devices, p.devices[1:]))


def test_describe_names_devices_ranges_and_bottleneck():
    p = plan([layer(f"l{i}") for i in range(6)], devices([10, 30]))
    text = p.describe()
    assert "throughput plan: 2 stage(s)" in text and "bottleneck: compute on" in text
    assert all(f"[{s.start}, {s.stop})" in text and s.device in text for s in p.stages)
    assert len(p.rows()) == 2 and len(p.rows()[0]) == len(p.COLUMNS)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="objective"):
        plan([layer("a")], devices([1]), "speed")
    with pytest.raises(PlanError, match="no devices"):
        plan([layer("a")], [])
    with pytest.raises(ValueError, match="contiguous"):
        evaluate([layer("a"), layer("b")], devices([1, 1]), [(0, 1), (2, 2)])


def test_48_layers_on_8_devices_is_fast_and_exact_path():
    layers = [layer("embed", gflop=0.1, params=150 * MB)]
    layers += [layer(f"block.{i}", gflop=8, act=3 * MB, params=28 * MB, saved=60 * MB) for i in range(46)]
    layers += [layer("head", gflop=40, act=200 * MB, params=150 * MB)]
    devs = devices([10, 15, 20, 30, 40, 60, 80, 120], free=16 * GiB, bandwidth=50 * MB, latency=0.01)
    for objective in ("throughput", "latency"):
        start = time.perf_counter()
        p = plan(layers, devs, objective, Workload(micro_batch=4, micro_batches=8))
        assert time.perf_counter() - start < 3
        assert p.stages[-1].stop == 48


def test_many_devices_take_the_heuristic_path_quickly():
    layers = [layer(f"l{i}", gflop=8, act=3 * MB, params=28 * MB, saved=60 * MB) for i in range(48)]
    devs = devices([10 + 7 * i for i in range(16)], free=4 * GiB, bandwidth=50 * MB, latency=0.01)
    start = time.perf_counter()
    p = plan(layers, devs, "throughput", Workload(micro_batch=4, micro_batches=8))
    assert time.perf_counter() - start < 3
    assert [s.start for s in p.stages[1:]] == [s.stop for s in p.stages[:-1]] and p.stages[-1].stop == 48


def test_plan_fixed_uses_every_device_in_order_and_picks_the_best_cuts() -> None:
    from neuranet.pipeline.partition import evaluate, plan_fixed

    layers = [LayerProfile(f"l{i}", flops=1e9 * (i + 1), activation_bytes=1000, param_bytes=1000) for i in range(6)]
    devices = [DeviceProfile(f"d{i}", gflops=100.0, free_bytes=1 << 30,
                             links={f"d{j}": Link(bandwidth=1e9) for j in range(3) if j != i}) for i in range(3)]
    fixed = plan_fixed(layers, devices)
    assert [s.device for s in fixed.stages] == ["d0", "d1", "d2"]
    assert fixed.stages[0].start == 0 and fixed.stages[-1].stop == 6
    even = evaluate(layers, devices, [(0, 2), (2, 4), (4, 6)])
    assert fixed.step_time <= even.step_time  # heavier last layers: the cuts move left
    assert fixed.stages[0].stop - fixed.stages[0].start >= 2
    with pytest.raises(PlanError, match="cannot each take"):
        plan_fixed(layers[:2], devices)
