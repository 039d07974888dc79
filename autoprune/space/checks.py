"""Rules across sections, checked once the sections are read: what the objectives may be, which methods fit the
sparsity mode and the healing engine, and where a fraction of a GPU would spoil a measurement or a job."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from autoprune import heal, prune
from autoprune.config import (LATENCY_METRICS, Fixed, HealingEngine, HealSpace, ProfileSpec, SearchSettings,
                              SparsitySpace, largest)
from autoprune.errors import SpecError


def whole_gpus(settings: SearchSettings, profile: ProfileSpec, healing: HealingEngine,
               objectives: Mapping[str, Any], origin: str) -> None:
    """A GPU shared by several trials while one of them is timed measures the others' work too; NCCL refuses two
    DeepSpeed workers on one GPU. Fractions are refused where they would do that."""
    times_latency = any(metric.startswith("latency") for metric in objectives)
    shares = []
    if profile.target is None and times_latency:
        shares.append(("search.resources.gpu", settings.gpu,
                       "trials time their latency on their own GPU; a fraction lets other trials run on it meanwhile"
                       " (give whole GPUs, or measure on `profile.target`)"))
    if profile.target is not None:
        shares.append(("profile.target.gpu", profile.target.gpu,
                       "latency is timed on it; a fraction lets other work share it meanwhile"))
    if healing.engine == "deepspeed":
        shares.append(("heal_runtime.gpu", healing.gpu, "NCCL cannot run two DeepSpeed workers on one GPU"))
    for key, value, why in shares:
        if value != int(value):
            raise SpecError(f"{origin}: {key}: must be 0 or a whole number of GPUs, but got {value:g}: {why}.")


def deepspeed_combinations(healing: HealingEngine, prune_methods: Sequence[str], heal_methods: Sequence[str],
                           origin: str) -> None:
    """Combinations a DeepSpeed healing job cannot run, refused before anything starts."""
    for index, method in enumerate(heal_methods):
        if healing.zero_stage > heal.get(method).max_zero_stage:
            raise SpecError(
                f"{origin}: heal_runtime.zero_stage: {healing.zero_stage} does not work with"
                f" space.heal.methods[{index}] {method!r} (at most ZeRO stage {heal.get(method).max_zero_stage});"
                f" lower the stage or drop the method."
            )
    for index, method in enumerate(prune_methods):
        if not prune.get(method).distributable:
            raise SpecError(
                f"{origin}: space.prune.methods[{index}]: {method!r} cannot heal with `heal_runtime.engine: deepspeed`"
                f" ({prune.get(method).distributable_why}); drop the method or heal locally."
            )


def objectives(objectives: Mapping[str, Any], origin: str) -> None:
    if objectives.get("accuracy") != "max":
        raise SpecError(f"{origin}: objectives: must contain `accuracy: max`, but got {dict(objectives)!r}.")
    costs = [metric for metric in objectives if metric != "accuracy"]
    if len(costs) != 1 or costs[0] not in LATENCY_METRICS:
        raise SpecError(
            f"{origin}: objectives: besides accuracy, name exactly one cost to minimise from"
            f" {', '.join(LATENCY_METRICS)}, but got {costs!r}."
        )
    if objectives[costs[0]] != "min":
        raise SpecError(f"{origin}: objectives.{costs[0]}: must be `min`, but got {objectives[costs[0]]!r}.")


def halving_objective(settings, objectives: Mapping[str, Any], origin: str) -> None:
    """Successive halving judges trials at their rungs by accuracy and measured latency: the search's cost must be
    a latency."""
    cost = next(metric for metric in objectives if metric != "accuracy")
    if settings.halving is not None and cost not in ("latency_ms", "latency_p90_ms"):
        raise SpecError(f"{origin}: search.halving: judges trials by accuracy and latency, but the objective here is"
                        f" {cost!r}; use latency_ms / latency_p90_ms, or leave search.halving out.")


def halving_engine(settings, healing: HealingEngine, origin: str) -> None:
    """A rung stops a heal part-way and continues it from its weights and optimiser state, in the trial's process;
    a DeepSpeed job heals in one go."""
    if settings.halving is not None and healing.engine != "local":
        raise SpecError(f"{origin}: search.halving: rungs continue a heal in the trial's own process, but"
                        f" heal_runtime.engine is {healing.engine!r}, whose workers heal in one go; leave"
                        " search.halving out (or heal with engine: local).")


def fixed_budget(heal_space: HealSpace, section) -> None:
    """With `space.heal.budget: fixed` (the default), the budget is one value: the fidelity every trial heals to."""
    for key in [k for k in ("steps", "calibration_images") if heal_space.budget == "fixed"]:
        if not isinstance(getattr(heal_space, key), Fixed):  # more healing never costs accuracy: not a design choice
            raise section.fail(key, f"is a range, but the healing budget is the search's fidelity, not a dimension (more"
                                    f" healing never costs accuracy): give the full budget as one value (say"
                                    f" {largest(getattr(heal_space, key))}; search.halving stops the trials not worth"
                                    " it early), or set space.heal.budget: searched to sample it.")


def gpu_type_needs_gpu(search, resources) -> None:
    """`search.resources.accelerator_type` names the trials' GPU type: trials that take no GPU have none."""
    if search.accelerator_type is not None and search.gpu <= 0:
        raise resources.fail("accelerator_type", f"{search.accelerator_type!r} is the trials' GPU type, but"
                             f" `{resources.key('gpu')}` is 0 (the trials take no GPU): set it to 1, or leave"
                             " accelerator_type out.")


def sparsity_mode(sparsity: SparsitySpace, methods: Sequence[str], origin: str) -> None:
    """Each method that takes a sparsity must take the space's way of spreading it."""
    for method in methods:
        allowed = prune.get(method).sparsity_modes
        if prune.get(method).uses_sparsity and sparsity.mode not in allowed:
            raise SpecError(
                f"{origin}: space.prune.sparsity.mode: {sparsity.mode!r} does not apply to method {method!r},"
                f" which takes: {', '.join(allowed)}."
            )
