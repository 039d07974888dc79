"""Checks against the running Ray cluster, before any trial starts: a search that could never be scheduled is
an error now, not a hang later."""

from __future__ import annotations

from typing import Callable, Mapping

from autoprune.config import SearchSpec
from autoprune.errors import AutopruneError
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
