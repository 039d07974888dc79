"""Every name autoprune writes into Ray Tune and MLflow, and the conversions both ways.

A trial's `TrialResult` travels: worker → Tune report (`report`) → driver (`result_from_report`) → MLflow child run
(`trial_params`, `trial_metrics`, `trial_tags`) → registered model version (`version_tags`) → `best` / `front` /
`serve` (`read_version_tags`, `run_row`). The writers (store, publish) and the readers (select, serve) take their
names from here, so a name changed on one side cannot silently miss the other. The whole result travels as one
JSON document (`TrialResult.to_dict`); the flat values beside it are what Optuna, MLflow's UI and queries need.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from autoprune.config import TrialConfig
from autoprune.result import TrialRecord, TrialResult

# ---- runs: one parent run per search, one child run per trial -----------------------------------------------
ROLE_TAG = "autoprune.role"  # ROLE_SEARCH on parent runs, ROLE_TRIAL on child runs, ROLE_DENSE on the dense model's
ROLE_SEARCH, ROLE_TRIAL, ROLE_DENSE = "search", "trial", "dense"
SEARCH_TAG = "autoprune.search"  # the spec's name, on parent runs
RETARGET_TAG = "autoprune.retarget_of"  # on a retarget's parent run: the search whose models it timed again
TRIAL_TAG = "autoprune.trial_id"  # Tune's trial id, on child runs
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests the child runs under the parent in the UI
PARETO_TAG = "autoprune.pareto"  # "true" on the children on the front, "false" on the others
ERROR_TAG = "error"  # a failed trial's traceback
DEVICE_TAG = "device"  # where latency was measured (parent: the dense model's; child: the trial's)

# ---- MLflow's UI (tracking/view.py) -----------------------------------------------------------------------
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # experiment tag + a key: a page state the UI opens by that key
VIEW_URL_KEY = "viewStateShareKey"  # … given in the address under this name
RUN_COLOR_TAG = "mlflow.runColor"  # run tag: the colour of the run's line, bar or point in every chart
NOTE_TAG = "mlflow.note.content"  # run or experiment tag: its description, rendered as Markdown
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # without it, MLflow 3 guesses between its GenAI and training pages

# ---- artifacts --------------------------------------------------------------------------------------------
SPEC_ARTIFACT = "spec.json"  # parent: the spec as the search ran it (`SearchSpec.as_dict`)
DENSE_ARTIFACT = "dense.json"  # parent: the dense model's whole result (`TrialResult.to_dict`)
TRIALS_ARTIFACT = "trials.json"  # parent: every trial as a row (`trial_row`)
MODEL_ARTIFACT = "model"  # child: the pruned model's folder, which a registered version points at
DENSE_METRICS = ("dense_accuracy", "dense_latency_ms", "dense_macs")  # parent: the reference point

# ---- the registry -----------------------------------------------------------------------------------------
KEY_TAG = "autoprune.trial_key"  # "<parent run id>/<trial id>": what makes registration idempotent
CONFIG_TAG = "config"  # the trial's configuration (`TrialConfig.to_json`)
ALIAS_MOST_ACCURATE = "most-accurate"
ALIAS_FASTEST = "fastest"
# What a version carries, by type: its measurements and the recipe it was timed in (loading and serving apply it).
VERSION_TAGS: Mapping[str, type] = {
    "accuracy": float, "latency_ms": float, "latency_p90_ms": float, "device": str, "batch_size": int,
    "dtype": str, "memory_format": str, "kernels": str, "compiled": bool, "threads": int, "sparsity": float,
    "macs": int, "runtime": str,
}

# ---- a trial's report to Tune -----------------------------------------------------------------------------
RESULT_KEY = "result_json"  # the whole TrialResult
TRIAL_ERROR = "trial_error"  # a trial that failed by itself reports its traceback under this key …
CONFIG_KEY = "config_json"  # … and its configuration (`TrialConfig.to_json`) under this one
STOPPED_AT_RUNG = "stopped_at_rung"  # 1: successive halving stopped the trial part-way (Optuna: pruned)

# ---- the trial table (trials.json, the plots, `autoprune front`) -----------------------------------------
ROW_METRICS = ("sparsity", "accuracy", "latency_ms", "latency_p90_ms", "macs", "params")


def trial_metrics(result: TrialResult) -> dict[str, float]:
    """A trial's MLflow metrics. Accuracy is left out when the trial stopped at the latency target unmeasured."""
    latency = result.latency
    metrics: dict[str, float] = {
        "feasible": int(result.feasible),
        "latency_ms": latency.median_ms,
        "latency_p90_ms": latency.p90_ms,
        "latency_spread": latency.spread,
        "macs": result.macs,
        "params": result.params,
        "sparsity": result.sparsity,
        "latency_cached": int(result.latency_cached),
        # against the dense model, interleaved: the speedup, its 95% interval, and the dense model in that pass
        "speedup": latency.speedup,
        "speedup_low": latency.speedup_low,
        "speedup_high": latency.speedup_high,
        "latency_wide": int(latency.wide),
    }
    if latency.paired:
        metrics["reference_ms"] = latency.reference_ms
    if result.searched_latency_ms is not None:  # the final re-timing replaced what the trial measured
        metrics["latency_ms_in_search"] = result.searched_latency_ms
    if result.feasible:
        metrics["accuracy"] = result.accuracy  # as served: in the recipe its latency was measured in
    if result.accuracy_fp32 is not None:
        metrics["accuracy_fp32"] = result.accuracy_fp32  # the float32 model's, as trained
    metrics["healing_steps"] = result.healing_steps
    metrics.update({f"accuracy_rung{index}": top1 for index, (_, top1) in enumerate(result.rungs, start=1)})
    metrics.update({f"latency_ms_batch{batch}": p.median_ms for batch, p in result.extra_latency.items()})
    metrics.update({f"time_{stage}_s": seconds for stage, seconds in result.timings.items()})
    return metrics


def trial_params(result: TrialResult) -> dict[str, Any]:
    return result.config.flat()


def trial_tags(result: TrialResult) -> dict[str, str]:
    """How a trial's latency was measured, as child-run tags."""
    latency = result.latency
    return {key: str(value) for key, value in {
        DEVICE_TAG: latency.device, "dtype": latency.dtype, "batch_size": latency.batch_size,
        "threads": latency.threads, "feasible": result.feasible, "format": latency.format,
        "memory_format": latency.memory_format, "compiled": latency.compiled, "ray_node": result.node,
        "stopped": result.stopped, "latency_note": latency.note, "heal_note": result.heal_note,
        **conditions_tags(latency.conditions),
    }.items()}


def conditions_tags(conditions: Mapping[str, Any]) -> dict[str, str]:
    """What else ran on the node while a latency was measured (measure/conditions.py), as tags."""
    if not conditions:
        return {}
    from autoprune.measure.conditions import NodeConditions

    return NodeConditions.from_dict(conditions).as_tags()


def dense_metrics(result: TrialResult) -> dict[str, float]:
    return dict(zip(DENSE_METRICS, (result.accuracy, result.latency.median_ms, result.macs)))


def report(result: TrialResult) -> dict[str, Any]:
    """What a trial reports to Tune: the whole result, and flat values for Optuna. A trial stopped at a rung says so
    (the searcher tells Optuna it was pruned) beside the accuracy it had there; one stopped unhealed reports 0, a
    bad point."""
    return {**trial_metrics(result), "accuracy": result.best_known_accuracy or 0.0,
            STOPPED_AT_RUNG: int(bool(result.rungs) and not result.feasible), RESULT_KEY: json.dumps(result.to_dict())}


def failure_report(config: TrialConfig, error: str) -> dict[str, Any]:
    """What a trial that failed by itself reports: its error and its configuration (no result)."""
    return {TRIAL_ERROR: error, CONFIG_KEY: config.to_json()}


def result_from_report(values: Mapping[str, Any]) -> TrialResult | None:
    """The result a trial reported; None when it reported a failure (or nothing)."""
    if TRIAL_ERROR in values or RESULT_KEY not in values:
        return None
    return TrialResult.from_dict(json.loads(values[RESULT_KEY]))


def failed_params(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """A failed trial's configuration as MLflow params, when it reported one."""
    return TrialConfig.from_json(values[CONFIG_KEY]).flat() if CONFIG_KEY in values else None


def version_tags(result: TrialResult, key: str) -> dict[str, str]:
    """A registered version's tags: what it measured and the recipe it was timed in (VERSION_TAGS)."""
    latency = result.latency
    values = {
        "accuracy": result.accuracy, "latency_ms": latency.median_ms, "latency_p90_ms": latency.p90_ms,
        "device": latency.device, "batch_size": latency.batch_size, "dtype": latency.dtype,
        "memory_format": latency.memory_format, "kernels": latency.format, "compiled": latency.compiled,
        "threads": latency.threads, "sparsity": result.sparsity, "macs": result.macs, "runtime": latency.runtime,
    }
    assert values.keys() == VERSION_TAGS.keys()
    return {KEY_TAG: key, CONFIG_TAG: result.config.to_json(), **{name: str(value) for name, value in values.items()}}


def read_version_tags(tags: Mapping[str, str]) -> dict[str, Any] | None:
    """A version's VERSION_TAGS, typed; None for a version autoprune did not register (no measurements)."""
    if "accuracy" not in tags or "latency_ms" not in tags:
        return None
    typed = {}
    for name, kind in VERSION_TAGS.items():
        if name in tags:  # a version registered by an older autoprune may lack the newer tags
            typed[name] = tags[name] == "True" if kind is bool else kind(tags[name])
    return typed


def trial_row(record: TrialRecord, *, on_front: bool) -> dict[str, Any]:
    """A trial as one row of the search's table: ROW_METRICS and its configuration."""
    result = record.result
    if result is None:
        return {"trial": record.trial_id, "prune": "failed", "heal": "", "error": record.error, "pareto": False}
    values = {"sparsity": result.sparsity, "accuracy": result.accuracy, "latency_ms": result.latency.median_ms,
              "latency_p90_ms": result.latency.p90_ms, "macs": result.macs, "params": result.params}
    assert values.keys() == set(ROW_METRICS)
    return {
        "trial": record.trial_id,
        "prune": result.config.prune.method,
        "heal": result.config.heal.method,
        **values,
        "pareto": on_front,
        **{key: value for key, value in result.config.flat().items() if key not in ("prune.method", "heal.method")},
    }


def run_row(run) -> dict[str, Any]:
    """A trial's child run read back from MLflow as a row with the table's columns, plus where it ran."""
    data = run.data
    row = {"trial": data.tags.get(TRIAL_TAG), "prune": data.params.get("prune.method"),
           "heal": data.params.get("heal.method")}
    row.update({name: data.metrics.get(name) for name in ROW_METRICS})
    if row["params"] is not None:
        row["params"] = int(row["params"])
    return {**row, "device": data.tags.get(DEVICE_TAG), "run_id": run.info.run_id}
