"""A trial's latency, as the spec's `profile` section asks for it: which batch sizes, on which hardware, and
measured once per structure.

timing.py times one model once; this module decides what to time:
- every batch size of the spec (the objective's first), each looked up in the search's latency cache before it
  is timed (cache.py);
- on the trial's own worker, or — when the spec names a `target` accelerator type — in a Ray task placed on a
  node of that type, so that a search can heal on its training GPUs and measure on its deployment GPU;
- a 2:4 model on hardware without sparse kernels (or without a layer they take) runs the dense kernels, so it
  shares the dense structure's measurement, with a note that says why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

from autoprune.config import ProfileSpec
from autoprune.measure.cache import LatencyCache, structure_signature
from autoprune.measure.formats import TORCH_DTYPES, plan_kernels
from autoprune.measure.timing import LatencyProfile, device_name, join_notes, profile_latency


@dataclass(frozen=True)
class Latencies:
    """The objective's profile, the other batch sizes' profiles, and whether the objective's came from the cache."""

    objective: LatencyProfile
    extra: Mapping[int, LatencyProfile]  # batch size → profile, for `ProfileSpec.extra_batch_sizes`
    cached: bool
    keys: Mapping[int, str] = field(default_factory=dict)  # batch size → the cache key the profile is stored under


def measure_latency(
    model: nn.Module,
    fmt: str,
    settings: ProfileSpec,
    input_size: tuple[int, int, int],
    *,
    device: torch.device,
    threads: int | None,
    cache: LatencyCache | None,
) -> Latencies:
    """Measure `model` run in execution format `fmt` at every batch size of `settings`, reusing cached profiles.
    `model` is not changed: a copy prepared for timing is measured."""
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    fallback = ""
    if settings.target is None:
        where = device_name(device, torch.get_num_threads())
        runs_as, fallback = plan_kernels(model, fmt, device, TORCH_DTYPES[settings.dtype])
    else:
        where, runs_as = f"Ray accelerator type {settings.target.accelerator_type}", fmt
    # A 2:4 model that will run dense kernels here is the dense structure's twin: it shares that measurement.
    keys = {batch: _key(model, runs_as, where, settings, batch, input_size) for batch in settings.batch_sizes}
    found = {batch: cache.get(key) if cache is not None else None for batch, key in keys.items()}
    missing = [batch for batch, profile in found.items() if profile is None]
    fresh = _measure(model, fmt, settings, input_size, missing, device, threads) if missing else {}
    reused = set(found) - set(missing)
    for batch in missing:
        if fresh[batch].format != runs_as:  # the sparse kernels failed at run time: it ran as the dense twin
            keys[batch] = _key(model, fresh[batch].format, where, settings, batch, input_size)
        # first writer wins: another trial may have stored this structure while this one was measuring it
        found[batch] = cache.put(keys[batch], fresh[batch]) if cache is not None else fresh[batch]
        if found[batch] != fresh[batch]:
            reused.add(batch)
            found[batch] = replace(found[batch], note=join_notes(fresh[batch].note, found[batch].note))
    if fallback:
        found = {batch: replace(profile, note=join_notes(fallback, profile.note)) for batch, profile in found.items()}
    extra = {batch: profile for batch, profile in found.items() if batch != settings.batch_size}
    return Latencies(found[settings.batch_size], extra, cached=settings.batch_size in reused, keys=keys)


def _key(model, runs_as: str, where: str, settings: ProfileSpec, batch: int, input_size) -> str:
    return structure_signature(model, format=runs_as, device=where, dtype=settings.dtype, batch_size=batch,
                               input_size=input_size, memory_format=settings.memory_format,
                               compile=settings.compile, torch_version=torch.__version__)


def _measure(model, fmt, settings: ProfileSpec, input_size, batch_sizes, device, threads) -> dict[int, LatencyProfile]:
    if settings.target is None:
        return _profile_batches(model, fmt, settings, input_size, batch_sizes, device, threads)
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    target = settings.target
    task = ray.remote(_profile_on_target).options(
        num_cpus=target.cpu, num_gpus=target.gpu, accelerator_type=target.accelerator_type,
        name=f"autoprune-latency-{target.accelerator_type}",
        # A Tune trial's placement group captures the tasks it starts, and holds no node of the target type:
        # this task is placed on the cluster at large, or it would wait forever.
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    # The model travels as a CPU copy: the trial's own device may not exist on the target node.
    return ray.get(task.remote(copy.deepcopy(model).cpu(), fmt, settings, input_size, batch_sizes))


def _profile_batches(model, fmt, settings: ProfileSpec, input_size, batch_sizes, device, threads) -> dict[int, LatencyProfile]:
    return {
        batch: profile_latency(model, input_size=input_size, batch_size=batch, dtype=settings.dtype,
                               warmup=settings.warmup, repeats=settings.repeats, device=device, threads=threads,
                               execution_format=fmt, memory_format=settings.memory_format, compile=settings.compile)
        for batch in batch_sizes
    }


def _profile_on_target(model, fmt, settings: ProfileSpec, input_size, batch_sizes) -> dict[int, LatencyProfile]:
    """Runs in a Ray task on a node of the target accelerator type, with the GPU (if any) Ray assigned to it."""
    import ray

    context = ray.get_runtime_context()
    device = assigned_device()
    threads = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    return _profile_batches(model, fmt, settings, input_size, batch_sizes, device, threads)


def assigned_device() -> torch.device:
    """The device Ray assigned to this task or actor: its GPU when it was given one, else the CPU — never a GPU
    merely because the machine has one (Ray no longer hides GPUs from tasks that asked for none)."""
    import ray

    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
