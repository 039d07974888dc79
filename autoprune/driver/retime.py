"""A search's last measurement: the front and the trials near it timed again, together with the dense model, in
one pass on a trial worker — the latencies that are registered.

During a search every trial is timed against the dense model under whatever load there was (its neighbour
healing, another job on the node), and its speedup is put on the dense latency measured when the search started.
That is good enough to decide which trials heal; it is not the number to register. So when the trials have ended
(nothing of the search's own runs beside it any more), the candidates — every trial with an accuracy that no other
one beats on accuracy and, by its whole interval, on latency — are timed once more in one interleaved pass with the
dense model, with more repeats and a tighter tolerance. That pass's dense median becomes the search's scale: the
candidates' new speedups and every other trial's speedup are put on it, so that the published table, the front and
the registered versions share one scale and one set of conditions.

The pass is saved beside the search's Tune run (tracking/final.py), so that `autoprune publish` publishes the
same numbers without timing anything again.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from autoprune.config import SearchSpec
from autoprune.driver.tune import gpu_type_resource
from autoprune.measure.timing import LatencyProfile
from autoprune.pareto import pareto_front
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking.final import FinalTiming

MAX_CANDIDATES = 24  # a pass holds every candidate prepared at once: the front first, then the nearest
TOLERANCE_SHARE = 0.5  # the final pass's tolerance: half the trials'…
REPEATS_FACTOR = 2  # …with twice their repeats…
SECONDS_FACTOR = 3  # …and three times their time cap


def candidates(records: Sequence[TrialRecord], dense: TrialResult) -> list[TrialRecord]:
    """The trials worth timing again: healed, saved, and not beaten with certainty — no other trial (nor the dense
    model) is at least as accurate and faster even at the slow end of its interval than this one at its fast end.
    The front by point estimates comes first; at most MAX_CANDIDATES."""
    healed = [r for r in records if r.result is not None and r.result.feasible and r.model_dir]
    bounds = {r.trial_id: _bounds(r.result.latency) for r in healed}
    rivals = [(r.result.accuracy, bounds[r.trial_id][1]) for r in healed]
    rivals.append((dense.accuracy, dense.latency.median_ms))

    def beaten(record: TrialRecord) -> bool:
        fastest = bounds[record.trial_id][0]
        return any(accuracy >= record.result.accuracy and slowest < fastest for accuracy, slowest in rivals)

    near = [r for r in healed if not beaten(r)]
    front = pareto_front(near, "latency_ms", dense=dense)
    rest = sorted((r for r in near if r not in front), key=lambda r: -r.result.accuracy)
    return (front + rest)[:MAX_CANDIDATES]


def _bounds(profile: LatencyProfile) -> tuple[float, float]:
    """(fastest, slowest) latency the profile's speedup interval allows."""
    scale = profile.median_ms * profile.speedup
    return scale / profile.speedup_high, scale / profile.speedup_low if profile.speedup_low > 0 else float("inf")


def final_timing_options(spec: SearchSpec) -> dict[str, Any]:
    """Where the final pass runs: on a node of the spec's target type, or where a trial runs — its CPUs, its GPUs
    and its GPU type — so that on a cluster of several GPU types the registered latencies come from the type the
    trials and the dense baseline were timed on, not from whichever GPU is free."""
    target = spec.profile.target
    if target is not None:
        return {"num_cpus": target.cpu, "num_gpus": target.gpu, "accelerator_type": target.accelerator_type}
    options: dict[str, Any] = {"num_cpus": spec.search.cpu, "num_gpus": spec.search.gpu}
    pinned = gpu_type_resource(spec)
    if pinned:
        options["resources"] = pinned
    return options


def retime_final(spec: SearchSpec, context_ref: Any, records: Sequence[TrialRecord], dense: TrialResult, *,
                 say: Callable[[str], None]) -> FinalTiming | None:
    """Time the candidates again with the dense model in one pass on a trial worker (or on a node of the spec's
    target accelerator type); None when there is nothing to time or latency is not an objective."""
    if spec.cost_metric not in ("latency_ms", "latency_p90_ms"):
        return None
    chosen = candidates(records, dense)
    if not chosen:
        return None
    import ray

    from autoprune.saved import load_model_dir

    profile = spec.profile
    options = final_timing_options(spec)
    # The dense structure on dense kernels (masks) is the dense model's twin: it gets the dense model's new
    # measurement, not a noisy one of its own that could put it ahead of the dense model.
    twins = [record for record in chosen if not record.result.latency.paired]
    timed = [record for record in chosen if record.result.latency.paired]
    say(f"autoprune: timing the front again: {len(timed)} candidate models with the dense model, interleaved in one"
        " pass (the registered latencies)")
    models = [load_model_dir(record.model_dir, recipe=False) for record in timed]
    task = ray.remote(_time_final).options(**options, name="autoprune-final-timing")
    dense_profile, profiles = ray.get(task.remote(
        context_ref, models, [record.result.latency for record in timed], dense.latency, profile))
    final = FinalTiming(dense_profile, {**{record.trial_id: p for record, p in zip(timed, profiles)},
                                        **{record.trial_id: dense_profile for record in twins}})
    wide = [trial for trial, p in final.trials.items() if p.wide]
    say(f"autoprune: dense {dense_profile.median_ms:.3f} ms in the final pass (at the start:"
        f" {dense.latency.median_ms:.3f} ms)" + (f"; still imprecise (interval wider than ±15%): {', '.join(wide)}"
                                                  if wide else ""))
    return final


def _time_final(context, models, profiles: Sequence[LatencyProfile], dense: LatencyProfile, settings):
    """On the worker: the dense model and the candidates, each in the recipe its trial was timed in."""
    from autoprune.driver.worker import assigned_cpus
    from autoprune.measure.latency import assigned_device
    from autoprune.measure.timing import profile_together

    return profile_together(
        context.dense_model(), [(model, profile.recipe) for model, profile in zip(models, profiles)],
        reference_recipe=dense.recipe, input_size=dense.input_size, batch_size=dense.batch_size,
        warmup=settings.warmup, repeats=settings.repeats * REPEATS_FACTOR, device=assigned_device(),
        threads=assigned_cpus(), tolerance=settings.tolerance * TOLERANCE_SHARE,
        max_seconds=settings.max_seconds * SECONDS_FACTOR)
