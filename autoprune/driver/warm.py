"""Warm start (`autoprune search SPEC --warm-start RUN`): an earlier search's trials seed this one's sampler.

Accuracy does not depend on where latency is measured, but latency does, and both depend on the model and the
data. So an earlier trial tells Optuna what it measured (a completed trial in the new study) only when the earlier
search pruned the same model on the same data and timed it on the same device, batch and dtype; otherwise its
configuration is only worth trying again, and it becomes one of the first points of the new search, the earlier
front first. Configurations that do not fit this search's space (a method it does not offer, a value outside its
ranges) are left out, with a count; failed trials are left out (they would fail again).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from autoprune.config import SearchSpec
from autoprune.errors import AutopruneError
from autoprune.models import POOLED_GROUP
from autoprune.pareto import pareto_front
from autoprune.result import TrialRecord, TrialResult
from autoprune.space.define import SearchSpace
from autoprune.tracking.final import apply_final, load_final
from autoprune.tracking.publish import experiment_path, records_from_storage
from autoprune.tracking.store import Tracker

# What must match for an earlier trial's measurements to count in this search: spec sections, and the device.
SAME_MEASUREMENT = ("model", "data", "objectives")
SAME_PROFILE = ("batch_size", "dtype", "memory_format", "compile")


@dataclass(frozen=True)
class Completed:
    """An earlier trial as Optuna records it: its parameters and their distributions, what it measured."""

    params: Mapping[str, Any]
    distributions: Mapping[str, Any]
    values: tuple[float, float] | None  # accuracy, cost; None: stopped at a rung of successive halving (pruned)
    latency_ms: float  # for the latency target's constraint


@dataclass(frozen=True)
class WarmStart:
    run_id: str
    completed: list[Completed] = field(default_factory=list)  # told to Optuna before the first trial
    points: list[dict] = field(default_factory=list)  # evaluated again, first
    left_out: int = 0


@dataclass(frozen=True)
class EarlierSearch:
    run_id: str
    spec: Mapping[str, Any]  # as it was logged when it started
    dense: TrialResult
    records: list[TrialRecord]


def earlier_search(run_id: str, *, tracker: Tracker, storage: str, downloads: Path) -> EarlierSearch:
    """The earlier search `run_id` (its parent run in this MLflow, its trials in this storage), read before Ray
    starts, so that a wrong run id or storage is an error before any worker does anything."""
    earlier = Tracker.for_search_run(tracker.tracking_uri, run_id)
    try:
        path = experiment_path(storage, run_id)
        records, _ = records_from_storage(path, downloads)
    except AutopruneError as error:
        raise AutopruneError(f"--warm-start {run_id}: {error}") from None
    # on the scale the earlier search published: its final re-timing, where it got there
    records, dense = apply_final(load_final(path), records, earlier.dense_result(run_id))
    return EarlierSearch(run_id, earlier.search_spec(run_id), dense, records)


def warm_start(earlier: EarlierSearch, *, spec: SearchSpec, space: SearchSpace, dense: TrialResult,
               say: Callable[[str], None]) -> WarmStart:
    """`earlier`'s trials as this search's start: completed Optuna trials when it measured as this search does
    (`dense` is this search's dense model, measured on its workers), else points to evaluate again."""
    differences = _differences(earlier.spec, earlier.dense, spec, dense)
    completed, points, left_out = [], [], 0
    for record in _front_first(earlier.records, spec.cost_metric, earlier.dense):
        params = _parameters(record)
        fitted = fit_point(space, params) if record.result is not None and _same_scale(record, spec) else None
        if fitted is None:
            left_out += 1
        elif not differences:
            completed.append(Completed({name: params[name] for name in fitted}, fitted,
                                       _values(record.result, spec.cost_metric), record.result.latency.median_ms))
        elif len(points) < spec.search.trials:
            points.append({name: params[name] for name in fitted})
    if differences:
        say(f"autoprune: warm start from {earlier.run_id}: it measured another {', '.join(differences)}, so its"
            f" configurations are run again first ({len(points)} of them, its front first); {left_out} left out")
    else:
        say(f"autoprune: warm start from {earlier.run_id}: Optuna starts from its {len(completed)} trials (same"
            f" model, data and device); {left_out} left out (failed, or outside this search's space)")
    return WarmStart(earlier.run_id, completed, points, left_out)


def _same_scale(record, spec: SearchSpec) -> bool:
    """Whether a trial's parameters mean here what they meant there: a reduction and a shape (sparsity chosen by
    cost) are positions within the sparsity range, so under another range they name other structures."""
    prune_config = record.result.config.prune
    bounds = (spec.prune.sparsity.low, spec.prune.sparsity.high)
    return prune_config.allocation != "macs" or tuple(prune_config.bounds or ()) == bounds


def _differences(earlier_spec: Mapping[str, Any], earlier_dense: TrialResult, spec: SearchSpec,
                 dense: TrialResult) -> list[str]:
    """What differs between the earlier search's measurements and this one's (empty: they compare)."""
    current = spec.as_dict()
    different = [section for section in SAME_MEASUREMENT if earlier_spec.get(section) != current.get(section)]
    if earlier_dense.latency.device != dense.latency.device:
        different.append(f"device ({earlier_dense.latency.device})")
    profile = [key for key in SAME_PROFILE
               if (earlier_spec.get("profile") or {}).get(key) != current["profile"].get(key)]
    return different + [f"profile.{key}" for key in profile]


def _front_first(records: list[TrialRecord], cost_metric: str, dense: TrialResult) -> list[TrialRecord]:
    front = pareto_front(records, cost_metric, dense=dense)
    ids = {record.trial_id for record in front}
    rest = sorted((r for r in records if r.trial_id not in ids),
                  key=lambda r: -(r.result.best_known_accuracy or 0.0) if r.result is not None else 1.0)
    return [*front, *rest]


def _parameters(record: TrialRecord) -> dict[str, Any]:
    """The trial's sampled parameters, with those its space held fixed (not sampled, so not among them) read from
    its configuration: methods, budget, options — what another space may sample."""
    if record.result is None:
        return dict(record.params)
    config = record.result.config
    fixed: dict[str, Any] = {"prune.method": config.prune.method, "heal.method": config.heal.method,
                             "heal.calibration_images": config.heal.calibration_images, "heal.steps": config.heal.steps,
                             "heal.lr": config.heal.lr}
    fixed.update({f"prune.{config.prune.method}.{key}": value for key, value in config.prune.options.items()})
    fixed.update({f"heal.{config.heal.method}.{key}": value for key, value in config.heal.options.items()})
    if set(config.prune.sparsity) == {POOLED_GROUP}:
        fixed["prune.sparsity"] = config.prune.sparsity[POOLED_GROUP]
    return {**fixed, **record.params}


def _values(result: TrialResult, cost_metric: str) -> tuple[float, float] | None:
    """What the trial told Optuna: its objectives, or nothing when successive halving stopped it (pruned)."""
    if result.rungs and not result.feasible:
        return None
    return (result.best_known_accuracy or 0.0, result.cost(cost_metric))


def fit_point(space: SearchSpace, params: Mapping[str, Any], *, complete: bool = True) -> dict | None:
    """The distributions this space gives `params` when its define-by-run walks them, or None if they hold a value
    outside its distributions (a method it does not offer, a number out of range) or, when `complete`, if the
    space asks for a parameter they lack (not complete: the sampler fills it in)."""
    import optuna

    if not params:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a study per point: not worth a line each
    study = optuna.create_study(directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns of an enqueued value outside the distribution: checked below
        study.enqueue_trial(dict(params), skip_if_exists=False)
        trial = study.ask()
        try:
            space.define(trial)
        except Exception:  # a method or option this space does not know
            return None
    given = {name: value for name, value in trial.params.items() if name in params}
    if (complete and len(given) < len(trial.params)) or any(
            params[name] != value or not trial.distributions[name]._contains(
                trial.distributions[name].to_internal_repr(value)) for name, value in given.items()):
        return None
    return dict(trial.distributions)
