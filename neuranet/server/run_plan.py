"""What a training run asks for and how it is split: the request (validated at the edge), the layer
profiles, and the plan over the devices (`pipeline/partition.py`), with the reasons a run cannot start.

Planning needs the model (torch), so it runs in a worker thread and only when a run is started or
served; the coordinator imports torch no earlier than that.
"""

from __future__ import annotations

from typing import Any, NamedTuple


from neuranet.api_requests import MAX_PROFILED_BYTES, RunRequest  # noqa: F401  (RunRequest: what a plan is of)
from neuranet.errors import Invalid
from neuranet.protocol.device_profile import DeviceProfile as Reported

DEFAULT_GFLOPS = 10.0
DEFAULT_FREE_BYTES = 1 << 30
DEFAULT_LINK_BYTES_PER_S = 100e6
DEFAULT_CHECKPOINT_EVERY = 50



class RunError(Invalid):
    """A run cannot start as requested; the message says what to change."""


def build_and_profile(model_name: str, seed: int, options: dict[str, Any], micro_batch: int,
                      data_seed: int = 0) -> tuple[list[Any], Any]:
    """A built-in model, built (after sizing it on the meta device) and its layers profiled."""
    from neuranet.pipeline.models import build_model
    from neuranet.pipeline.profile_layers import profile_layers

    import torch

    with torch.device("meta"):  # size it first without allocating: the options come from the user
        probe = build_model(model_name, seed, **options)
    nbytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    if nbytes > MAX_PROFILED_BYTES:
        raise RunError(f"{model_name} with {options} has {nbytes / 2**30:.1f} GiB of parameters; the "
                       f"coordinator profiles models up to {MAX_PROFILED_BYTES / 2**30:.0f} GiB")
    model = build_model(model_name, seed, **options)
    return profile_layers(model, model.sample(micro_batch, data_seed)), model


class Split(NamedTuple):
    stages: list[dict[str, Any]]  # device, start, stop per stage
    text: str  # the plan as the user sees it
    step_time: float  # predicted seconds per step (training) or per request (inference)
    param_bytes: int  # the model's parameters, all stages


def plan_layers(layers: list[Any], devices: list[dict[str, Any]], objective: str, micro_batch: int,
                micro_batches: int = 1, use_all_devices: bool = False) -> Split:
    """Split profiled layers over the devices."""
    from neuranet.pipeline.partition import plan, plan_fixed
    from neuranet.pipeline.profiles import DeviceProfile, Link, PlanError, Workload

    profiles = []
    for d in devices:
        p = Reported.of(d["profile"])
        bw = (p.server_bandwidth_bps or DEFAULT_LINK_BYTES_PER_S * 8) / 8
        links = {o["id"]: Link(bandwidth=bw, latency=(p.server_rtt_ms or 1.0) / 1000) for o in devices if o is not d}
        profiles.append(DeviceProfile(id=d["id"], gflops=p.cpu_gflops or DEFAULT_GFLOPS,
                                      free_bytes=p.ram_available_bytes or DEFAULT_FREE_BYTES, links=links))
    try:
        workload = Workload(micro_batch=micro_batch, micro_batches=micro_batches)
        chooser = plan_fixed if use_all_devices else plan
        result = chooser(layers, profiles, objective, workload)
    except PlanError as exc:
        raise RunError(str(exc)) from None
    stages = [{"device": s.device, "start": s.start, "stop": s.stop,
               "param_bytes": sum(layer.param_bytes for layer in layers[s.start:s.stop])} for s in result.stages]
    text = result.describe()
    if len(result.stages) < len(profiles):  # the user offered more: say why the planner used fewer
        text += "\n" + _fewer_devices(layers, profiles, objective, workload, result, devices)
    return Split(stages, text, result.step_time, sum(layer.param_bytes for layer in layers))


def _fewer_devices(layers: list[Any], profiles: list[Any], objective: str, workload: Any, chosen: Any,
                   devices: list[dict[str, Any]]) -> str:
    """Why a plan uses k of the n devices offered, against a split over all n (`plan_fixed`)."""
    from neuranet.pipeline.partition import plan_fixed
    from neuranet.pipeline.profiles import PlanError, seconds

    k, n = len(chosen.stages), len(profiles)
    unit = "training step" if objective == "throughput" else "request"
    try:
        every = plan_fixed(layers, profiles, objective, workload)  # type: ignore[arg-type]
        why = (f"a split over all {n} would take {seconds(every.step_time)} per {unit}, "
               f"not {seconds(chosen.step_time)}")
    except PlanError as exc:
        why = f"no split over all {n} works: {exc}"
    names = {d["id"]: d.get("name") or d["id"] for d in devices}
    left = ", ".join(names[p.id] for p in profiles if p.id not in {s.device for s in chosen.stages})
    return f"using {k} of the {n} devices offered (not {left}): {why}; --all-devices uses every one"


def plan_run(req: RunRequest, devices: list[dict[str, Any]]) -> Split:
    """Plan a training run: throughput objective, micro-batches of the request's size."""
    from neuranet.pipeline.data import dataset_name
    from neuranet.pipeline.models import build_model
    from neuranet.pipeline.profiles import LayerProfile

    import torch

    micro = max(1, req.batch_size // req.microbatches)
    if req.user_model is not None:
        layers = [LayerProfile(**p.model_dump()) for p in req.user_model.layers]
    else:
        with torch.device("meta"):
            probe = build_model(req.model, req.seed, **req.model_options)
        if not probe.trainable:
            raise RunError(f"{req.model} is a pretrained inference-only model; serve it with `neuranet infer`")
        if req.data is not None and dataset_name(req.data) != probe.dataset:
            raise RunError(f"{req.model} trains on {probe.dataset!r}, not {req.data!r}")
        layers, _ = build_and_profile(req.model, req.seed, req.model_options, micro, req.data_seed)
    return plan_layers(layers, devices, "throughput", micro, req.microbatches, req.use_all_devices)
