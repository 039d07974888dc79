"""A trial's latency, as the spec's `profile` section asks for it: which batch sizes, on which hardware, and
measured once per structure.

timing.py times one model against its reference; this module decides what to time:
- every batch size of the spec (the objective's first), each paired with the dense model and looked up in the
  search's latency cache before it is timed (cache.py): a structure measured within the tolerance is not timed
  again, one measured less precisely is timed again and both measurements are merged;
- on the trial's own worker, or — when the spec names a `target` accelerator type — in a Ray task placed on a
  node of that type, so that a search can heal on its training GPUs and measure on its deployment GPU;
- a model with the dense shapes on dense kernels (masks; a 2:4 model on hardware without sparse kernels, or
  without a layer they take) is the dense model's twin: it gets the dense model's measurement (speedup exactly
  1), with a note that says why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

from autoprune.config import ProfileSpec
from autoprune.measure.cache import LatencyCache, structure_signature
from autoprune.measure.formats import DENSE, TORCH_DTYPES, plan_kernels
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
    reference: nn.Module | None = None,
    references: Mapping[int, LatencyProfile] | None = None,
) -> Latencies:
    """Measure `model` run in execution format `fmt` at every batch size of `settings`, paired with `reference`
    (the dense model: None times it alone), reusing cached profiles that are precise enough. `references` are the
    search's dense profiles by batch size: the scale a speedup is put on, and the reference's memory format.
    `model` is not changed: a copy prepared for timing is measured."""
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    references = references or {}
    fallback = ""
    if settings.target is None:
        where = device_name(device, torch.get_num_threads())
        runs_as, fallback = plan_kernels(model, fmt, device, TORCH_DTYPES[settings.dtype], settings.runtime)
    else:
        where, runs_as = f"Ray accelerator type {settings.target.accelerator_type}", fmt
    keys = {batch: _key(model, runs_as, where, settings, batch, input_size) for batch in settings.batch_sizes}
    if reference is not None and runs_as == DENSE and _shapes(model) == _shapes(reference):
        # The dense structure on dense kernels (masks, a 2:4 model without sparse kernels here, the dense model
        # itself): the dense model's measurement, not a noisy twin of it that could put it ahead of the dense model.
        # Without the search's references (run_trial alone), the dense structure is timed alone, once per cache.
        twin = {batch: references.get(batch) or (cache.get(keys[batch]) if cache is not None else None)
                for batch in settings.batch_sizes}
        missing = [batch for batch, profile in twin.items() if profile is None]
        alone = _measure(model, fmt, settings, input_size, missing, device, threads, None, {}) if missing else {}
        for batch, profile in alone.items():
            if cache is not None:
                cache.put(keys[batch], profile)
        found = {batch: profile or alone.get(batch) for batch, profile in twin.items()}
        reused = {batch for batch, profile in twin.items() if profile is not None}
    else:
        found = {batch: cache.get(key) if cache is not None else None for batch, key in keys.items()}
        # a structure timed before within the tolerance is not timed again; one timed less precisely is timed
        # again and the two measurements merged (cache.put pools their evidence)
        missing = [batch for batch, profile in found.items()
                   if profile is None or profile.half_width > settings.tolerance]
        fresh = _measure(model, fmt, settings, input_size, missing, device, threads, reference,
                         references) if missing else {}
        reused = set(found) - set(missing)
        for batch in missing:
            if batch not in fresh:  # an extra batch size that did not fit in memory
                found[batch] = None
                continue
            if fresh[batch].format != runs_as:  # the sparse kernels failed at run time: it ran as the dense twin
                keys[batch] = _key(model, fresh[batch].format, where, settings, batch, input_size)
            found[batch] = cache.put(keys[batch], fresh[batch]) if cache is not None else fresh[batch]
            if found[batch].note != fresh[batch].note:
                found[batch] = replace(found[batch], note=join_notes(fresh[batch].note, found[batch].note))
    untimed = sorted(batch for batch, profile in found.items() if profile is None)
    found = {batch: profile for batch, profile in found.items() if profile is not None}
    if untimed:
        fallback = join_notes(fallback, f"batch size {', '.join(map(str, untimed))} ran out of memory: not timed")
    if fallback:
        found = {batch: replace(profile, note=join_notes(fallback, profile.note)) for batch, profile in found.items()}
    extra = {batch: profile for batch, profile in found.items() if batch != settings.batch_size}
    return Latencies(found[settings.batch_size], extra, cached=settings.batch_size in reused, keys=keys)


def _shapes(model: nn.Module) -> list:
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def _key(model, runs_as: str, where: str, settings: ProfileSpec, batch: int, input_size) -> str:
    return structure_signature(model, format=runs_as, device=where, dtype=settings.dtype, batch_size=batch,
                               input_size=input_size, memory_format=settings.memory_format,
                               compile=settings.compile, tf32=settings.tf32 and "cpu" not in where,
                               runtime=settings.runtime, torch_version=torch.__version__)


def _measure(model, fmt, settings: ProfileSpec, input_size, batch_sizes, device, threads, reference,
             references) -> dict[int, LatencyProfile]:
    if settings.target is None:
        return _profile_batches(model, fmt, settings, input_size, batch_sizes, device, threads, reference,
                                references)
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
    # The models travel as CPU copies: the trial's own device may not exist on the target node.
    cpu_reference = copy.deepcopy(reference).cpu() if reference is not None else None
    return ray.get(task.remote(copy.deepcopy(model).cpu(), fmt, settings, input_size, batch_sizes, cpu_reference,
                               dict(references)))


def _profile_batches(model, fmt, settings: ProfileSpec, input_size, batch_sizes, device, threads, reference,
                     references) -> dict[int, LatencyProfile]:
    """Each batch size's profile; an extra batch size (logged, not the objective) that runs out of memory is left
    out, which `measure_latency` records, rather than failing the trial."""
    profiles = {}
    for batch in batch_sizes:
        dense = references.get(batch)
        try:
            profiles[batch] = profile_latency(
                model, input_size=input_size, batch_size=batch, dtype=settings.dtype, warmup=settings.warmup,
                repeats=settings.repeats, device=device, threads=threads, execution_format=fmt,
                memory_format=settings.memory_format, compile=settings.compile, tf32=settings.tf32,
                runtime=settings.runtime, reference=reference,
                reference_memory_format=dense.memory_format if dense is not None else None,
                scale_ms=dense.median_ms if dense is not None else None, tolerance=settings.tolerance,
                max_seconds=settings.max_seconds)
        except torch.OutOfMemoryError:
            if batch == settings.batch_size:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed batch held, before the next one is timed
    return profiles


def _profile_on_target(model, fmt, settings: ProfileSpec, input_size, batch_sizes, reference=None,
                       references=None) -> dict[int, LatencyProfile]:
    """Runs in a Ray task on a node of the target accelerator type, with the GPU (if any) Ray assigned to it."""
    import ray

    context = ray.get_runtime_context()
    device = assigned_device()
    threads = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    reference = reference.to(device) if reference is not None else None
    return _profile_batches(model, fmt, settings, input_size, batch_sizes, device, threads, reference,
                            references or {})


def assigned_device() -> torch.device:
    """The device Ray assigned to this task or actor: its GPU when it was given one, else the CPU — never a GPU
    merely because the machine has one (Ray no longer hides GPUs from tasks that asked for none)."""
    import ray

    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
