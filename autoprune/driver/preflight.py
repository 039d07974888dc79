"""Checks before any trial starts: against the running Ray cluster (a search that could never be scheduled is an
error now, not a hang later) and against the model (a pruning method that cannot prune it is an error now, not a
search of unchanged models)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

from autoprune.config import SearchSpec
from autoprune.data import REFERENCE_IMAGE_SIZE
from autoprune.errors import AutopruneError, SpecError
from autoprune.measure.conditions import NodeConditions
from autoprune.measure.timing import LatencyProfile
from autoprune.models import ModelSource
from autoprune.train.deepspeed import trial_bundles


def check_target_hardware(accelerator_type: str, cluster: Mapping[str, float]) -> None:
    """A latency task for an accelerator type no node has would wait forever: say so before any trial starts."""
    prefix = "accelerator_type:"
    if f"{prefix}{accelerator_type}" in cluster:
        return
    present = sorted(key[len(prefix):] for key in cluster if key.startswith(prefix))
    raise AutopruneError(
        f"profile.target.accelerator_type: no node of this Ray cluster has accelerator type {accelerator_type!r}"
        f" (it has: {', '.join(present) or 'none'}). Start one (a node type with min_workers >= 1 in the cluster"
        f" config, or `ray start --resources '{{\"{prefix}{accelerator_type}\": 1}}'`), or remove profile.target."
    )


def check_healing_resources(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> None:
    """A trial that heals with DeepSpeed reserves its own resources and its workers' together (one placement
    group), so Tune starts it only when all of them are free. A reservation larger than the cluster would never
    start: say so before any trial. (An autoscaling cluster counts only the nodes it has now.)"""
    bundles = trial_bundles({"CPU": spec.search.cpu, "GPU": spec.search.gpu}, spec.heal_runtime)
    healing = spec.heal_runtime
    fits = []
    for resource, trial, per_worker in (("CPU", spec.search.cpu, healing.cpu), ("GPU", spec.search.gpu, healing.gpu)):
        needed = sum(bundle.get(resource, 0) for bundle in bundles)
        if needed > cluster.get(resource, 0):
            raise AutopruneError(
                f"heal_runtime: a trial needs {needed:g} {resource} at once (search.resources {trial:g} + heal_runtime.workers"
                f" {healing.workers} × {per_worker:g}) but this Ray cluster has {cluster.get(resource, 0):g}. Lower"
                f" heal_runtime.workers / heal_runtime.{resource.lower()}, or add nodes."
            )
        if needed:
            fits.append(int(cluster.get(resource, 0) // needed))
    at_once = min(fits + [spec.search.concurrency])
    if at_once < spec.search.concurrency:
        say(f"autoprune: each trial reserves {bundles[0]} for itself and {healing.workers} × {bundles[-1]} for its"
            f" DeepSpeed workers: at most {at_once} of search.concurrency {spec.search.concurrency} run at once here")


def check_cluster(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> None:
    """Every check of the spec against the cluster's resources."""
    if spec.profile.target is not None:
        check_target_hardware(spec.profile.target.accelerator_type, cluster)
    if spec.heal_runtime.engine != "local":
        check_healing_resources(spec, cluster, say)


def check_methods(spec: SearchSpec, source: ModelSource, say: Callable[[str], None], *,
                  drop_unusable: bool = False) -> SearchSpec:
    """`autoprune check` on the spec's model for the spec's pruning methods, before anything starts: a method that
    would remove nothing from this model, refuses it or fails on it is a spec error naming the method, the model and
    why — or, with `drop_unusable`, is dropped from the search with a warning. Each method is tried with its default
    options at the space's highest sparsity, on random weights (structure, not accuracy, decides this)."""
    from autoprune.check import WORKS, check_model

    methods = [method for method in spec.prune.methods if method != "none"]  # the dense reference removes nothing
    if not methods:
        return spec
    size = REFERENCE_IMAGE_SIZE if spec.data.source == "reference" else spec.data.image_size
    result = check_model(source, input_size=(3, size, size), methods=methods, sparsities=(spec.prune.sparsity.high,))
    unusable = {check.method: check for check in result.checks if check.outcome != WORKS}
    if not unusable:
        return spec
    why = "; ".join(f"{name} {check.outcome}" + (f" ({check.reason})" if check.reason else "")
                    for name, check in unusable.items())
    kept = tuple(method for method in spec.prune.methods if method not in unusable)
    if not drop_unusable or not [method for method in kept if method != "none"]:
        raise SpecError(
            f"space.prune.methods: on {spec.model.name} at sparsity {spec.prune.sparsity.high:g}: {why}."
            f" Drop {'it' if len(unusable) == 1 else 'them'} from the spec"
            + (", or pass --drop-unusable-methods to search with the others" if not drop_unusable else "")
            + f" (`autoprune check {spec.model.name}` shows every method on this model).")
    say(f"autoprune: dropping {', '.join(unusable)} from this search: on {spec.model.name}: {why}")
    return replace(spec, prune=replace(spec.prune, methods=kept))


def warn_if_busy(dense: LatencyProfile, say: Callable[[str], None], where: str) -> None:
    """A node that was busy while the dense model was timed will be busy while the others are: say so before they
    are. With several threads a busy neighbour is worse than a share of the time: every parallel operation waits
    for the thread that shares its core, and a model can run many times slower than on a quiet node."""
    if not dense.conditions:
        return
    conditions = NodeConditions.from_dict(dense.conditions)
    if conditions.busy:
        threads = (f" It runs {dense.threads} threads: each parallel operation waits for the one that shares a core"
                   " with the neighbour, so its latency here can be many times a quiet node's."
                   if dense.threads > 1 else "")
        say(f"autoprune: warning: {where} was busy while the dense model was timed ({conditions.describe()};"
            f" dense {dense.median_ms:.3f} ms). Every model is timed against the dense model, interleaved, so a"
            f" steady load cancels in its speedup, but intervals will be wider and timing slower.{threads}")
