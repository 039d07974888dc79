"""What a person sees of a search in MLflow's UI: the front at a glance, and sentences where the UI shows text.

MLflow's experiment page keeps its chart layout in the browser, which no API reaches. It also opens *shared
views*: an experiment tag `mlflow.sharedViewState.<key>` holding the page's state as JSON, opened by the address
`#/experiments/<id>/runs?viewStateShareKey=<key>` — the "Share" button of the UI writes the same tag. autoprune
writes one per search (keyed by its parent run): the search's runs only (not collapsed under their parent, all of
them shown), sorted by accuracy, and first a scatter chart of accuracy against the cost metric. Points take their
run's colour from MLflow's own run tag `mlflow.runColor`: the front in red, the other trials in grey, the dense
model (a run of its own) in black. One click on a point opens its run's card with a link to the run.

The state's fields are those of MLflow's UI (`ExperimentPageUIState` and its chart configs, MLflow 3.x): nothing in
MLflow's API validates them, so `tests/test_ui.py` opens the address in a real browser and reads the page.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence
from urllib.parse import quote

from autoprune.result import TrialResult
from autoprune.tracking.schema import DEVICE_TAG, PARENT_TAG, PARETO_TAG, VIEW_URL_KEY

EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind: runs and charts, no traces
MAX_NOTE_CHARS = 8000  # MLflow keeps at most this much of a run tag

FRONT_COLOR, TRIAL_COLOR, DENSE_COLOR = "#d62728", "#9e9e9e", "#000000"
FRONT_SECTION = "Pareto front"


def front_path(experiment_id: str, parent_id: str) -> str:
    """The address, below the UI's root, that opens a search's view (the view's key is its parent run's id)."""
    return f"#/experiments/{experiment_id}/runs?{VIEW_URL_KEY}={parent_id}&compareRunsMode=CHART"


def run_path(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def version_path(model: str, version: str) -> str:
    return f"#/models/{quote(model, safe='')}/versions/{version}"


def ui_address(base_url: str, path: str) -> str:
    return f"{base_url.rstrip('/')}/{path}"


def run_colors(trial_run_ids: Sequence[str], front_run_ids: Sequence[str], dense_run_id: str) -> dict[str, str]:
    front = set(front_run_ids)
    colors = {run_id: FRONT_COLOR if run_id in front else TRIAL_COLOR for run_id in trial_run_ids}
    return {**colors, dense_run_id: DENSE_COLOR}


def view_state(parent_id: str, cost_metric: str) -> str:
    """The page state of a search's view, as the tag's JSON."""
    section = f"autoprune-{parent_id}"
    state = {
        # the part of the state the UI also keeps in its address (filter, order, time, lifecycle)
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_id}'",  # the trials and the dense run, not the parent:
        "orderByKey": "metrics.`accuracy`",                       # its children are then rows of their own
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # the rest: which runs, columns and charts
        "runsHiddenMode": "SHOW_ALL",  # the UI's default shows the first 10 runs in charts
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsPinned": [],
        "runsExpanded": {},
        "selectedColumns": [f"metrics.`{name}`" for name in ("accuracy", cost_metric, "sparsity")]
        + ["params.`prune.method`", "params.`heal.method`", f"tags.`{PARETO_TAG}`"],
        "compareRunSections": [{"uuid": section, "name": FRONT_SECTION, "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False, "columns": 1, "cardHeight": 480}],
        "compareRunCharts": [{
            "uuid": f"{section}-scatter", "type": "SCATTER", "metricSectionId": section, "runsCountToCompare": 10000,
            "deleted": False, "isGenerated": False,
            "displayName": f"top-1 against {cost_metric} (red: the Pareto front, black: the dense model)",
            "xaxis": {"key": cost_metric, "type": "METRIC"}, "yaxis": {"key": "accuracy", "type": "METRIC"},
        }],
        "isAccordionReordered": True,  # keeps the front's section above the per-metric charts the UI adds
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "viewMaximized": False,
        "runListHidden": False,
        "autoRefreshEnabled": False,
    }
    return json.dumps(state)


def search_note(*, name: str, experiment_id: str, parent_id: str, dense: TrialResult, trials: int, failed: int,
                front: Sequence[tuple[str, TrialResult, str | None]], registered_model: str) -> str:
    """The parent run's description (Markdown): the front as a table whose rows link to their runs and versions.
    `front` holds (run id, result, registered version or None), fastest first."""
    latency = dense.latency
    lines = [
        f"**autoprune search `{name}`**: {trials} trials ({failed} failed), {len(front)} on the Pareto front.",
        f"Dense model: top-1 {dense.accuracy:.4f} at {latency.median_ms:.4g} ms ({latency.device}, batch"
        f" {latency.batch_size}, {latency.dtype}).",
        "",
        f"[The front at a glance]({front_path(experiment_id, parent_id)}): every trial's top-1 against its latency,"
        " the front in red, the dense model in black.",
        "",
        "| trial | prune | heal | sparsity | top-1 | latency ms | registered |",
        "|---|---|---|---|---|---|---|",
    ]
    for run_id, result, version in front:
        registered = f"[{registered_model} v{version}]({version_path(registered_model, version)})" if version else "—"
        lines.append(f"| [{run_name(result)}]({run_path(experiment_id, run_id)}) | {result.config.prune.method}"
                     f" | {result.config.heal.method} | {result.sparsity:.2f} | {result.accuracy:.4f}"
                     f" | {result.latency.median_ms:.4g} | {registered} |")
    return "\n".join(lines)


def experiment_note(searches: Sequence[Mapping[str, str]], experiment_id: str) -> str:
    """The experiment's description: its searches, newest first, each with the address of its front.
    `searches` holds {run_id, run_name, summary}."""
    lines = ["Pruned models found by **autoprune**. Each search's trials, its Pareto front marked:", ""]
    lines += [f"- [{s['run_name']}]({front_path(experiment_id, s['run_id'])}): {s['summary']}" for s in searches]
    return "\n".join(lines)


def search_summary(metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
    """One line about a finished search, from its parent run's summary metrics and tags."""
    trials = int(metrics.get("trials_finished", 0) + metrics.get("trials_failed", 0))
    return (f"{trials} trials, {int(metrics.get('front_size', 0))} on the front"
            f" (latency on {tags.get(DEVICE_TAG, 'an unrecorded device')})")


def run_name(result: TrialResult) -> str:
    """A trial run's name, as charts and tables show it: what was done to the model."""
    return f"{result.config.prune.method} {result.sparsity:.0%} + {result.config.heal.method}"


def version_description(result: TrialResult, *, search: str, trial_id: str, run_link: str) -> str:
    """A registered version's description: one sentence a person reads on the registry's page."""
    config, latency = result.config, result.latency
    healing = ("not healed" if config.heal.method == "none" else
               f"healed by {config.heal.method} ({config.heal.steps} steps on {config.heal.calibration_images}"
               " images)")
    recipe = ", ".join(part for part in (
        latency.device, f"batch {latency.batch_size}", latency.dtype,
        latency.memory_format if latency.memory_format != "contiguous" else "",
        "2:4 kernels" if latency.format == "2:4" else "", "compiled" if latency.compiled else "") if part)
    return (f"{config.prune.method} pruning to {result.sparsity:.0%} sparsity, {healing}: top-1"
            f" {result.accuracy:.4f} at {latency.median_ms:.4g} ms median (p90 {latency.p90_ms:.4g} ms) on {recipe}."
            f" Trial {trial_id} of search `{search}`: [its run]({run_link}).")
