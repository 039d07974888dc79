"""What a person sees of a search in MLflow's UI: the front at a glance, and sentences where the UI shows text.

MLflow's experiment page keeps its chart layout in the browser, which no API reaches. It also opens *shared
views*: an experiment tag `mlflow.sharedViewState.<key>` holding the page's state as JSON, opened by the address
`#/experiments/<id>/runs?viewStateShareKey=<key>` — the "Share" button of the UI writes the same tag. autoprune
writes one per search (keyed by its parent run): the search's runs only (not collapsed under their parent, all of
them shown), sorted by accuracy, and first a scatter chart of accuracy against the cost metric. Points take their
run's colour from MLflow's own run tag `mlflow.runColor`: the front in red, the other trials in grey, the dense
model (a run of its own) in black. One click on a point opens its run's card with a link to the run.

The state's fields are those of MLflow's UI (`ExperimentPageUIState` and its chart configs, MLflow 3.x): nothing in
MLflow's API validates them, so the `browser` tests (test_e2e.py, test_cluster.py) open the address in
headless Chromium and read the page (autoprune/testing/browser.py).
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
    """The address, below the UI's root, that opens a search's view (the view's key is its parent run's id), in
    MLflow's model-training layout: without `workflowType` MLflow 3 opens an experiment in the one it last showed,
    often the GenAI one, whose sidebar has no runs chart."""
    return (f"#/experiments/{experiment_id}/runs?{VIEW_URL_KEY}={parent_id}&compareRunsMode=CHART"
            "&workflowType=machine_learning")


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


MARKDOWN_SPECIAL = set("\\`*_[]<>|")  # what changes text anywhere in a line (a table cell included)


def markdown_text(text: str) -> str:
    """`text` as literal Markdown: names (of searches, models, runs) may hold what Markdown reads as markup."""
    return "".join(f"\\{char}" if char in MARKDOWN_SPECIAL else char for char in str(text))


def search_note(*, name: str, experiment_id: str, parent_id: str, dense: TrialResult, trials: int, failed: int,
                front: Sequence[tuple[str, TrialResult, str | None]], registered_model: str, cost_metric: str) -> str:
    """The parent run's description (Markdown): the front as a table whose rows link to their runs and versions.
    `front` holds (run id, result, registered version or None), fastest first."""
    latency = dense.latency
    lines = [
        f"**autoprune search {markdown_text(name)}**: {trials} trials ({failed} failed), {len(front)} on the Pareto"
        " front.",
        f"Dense model: top-1 {dense.accuracy:.4f}, {cost_metric} {dense.cost(cost_metric):.4g} (latency measured on"
        f" {markdown_text(latency.device)}, batch {latency.batch_size}, {latency.dtype}).",
        "",
        f"[The front at a glance]({front_path(experiment_id, parent_id)}): every trial's top-1 against its"
        f" {cost_metric}, the front in red, the dense model in black.",
        "",
        f"| trial | prune | heal | sparsity | top-1 | {cost_metric} | registered |",
        "|---|---|---|---|---|---|---|",
    ]
    model = markdown_text(registered_model)
    for run_id, result, version in front:
        registered = f"[{model} v{version}]({version_path(registered_model, version)})" if version else "—"
        lines.append(f"| [{markdown_text(run_name(result))}]({run_path(experiment_id, run_id)})"
                     f" | {result.config.prune.method} | {result.config.heal.method} | {result.sparsity:.2f}"
                     f" | {result.accuracy:.4f} | {result.cost(cost_metric):.4g} | {registered} |")
    return "\n".join(lines)


EXPERIMENT_NOTE_HEAD = "Pruned models found by **autoprune**."  # how autoprune's description of an experiment starts
MAX_EXPERIMENT_NOTE_CHARS = 5000  # what MLflow servers before 3.x's later releases keep of an experiment tag


def experiment_note(searches: Sequence[Mapping[str, str]], experiment_id: str) -> str:
    """The experiment's description: its searches, newest first, each with the address of its front (as many as
    fit). `searches` holds {run_id, run_name, summary}."""
    note = f"{EXPERIMENT_NOTE_HEAD} Each search's trials, its Pareto front marked:\n"
    for search in searches:
        line = f"\n- [{markdown_text(search['run_name'])}]({front_path(experiment_id, search['run_id'])}):" \
               f" {search['summary']}"
        if len(note) + len(line) > MAX_EXPERIMENT_NOTE_CHARS:
            break
        note += line
    return note


def search_summary(metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
    """One line about a finished search, from its parent run's summary metrics and tags."""
    trials = int(metrics.get("trials_finished", 0) + metrics.get("trials_failed", 0))
    return (f"{trials} trials, {int(metrics.get('front_size', 0))} on the front"
            f" (latency on {tags.get(DEVICE_TAG, 'an unrecorded device')})")


def run_name(result: TrialResult) -> str:
    """A trial run's name, as charts and tables show it: what was done to the model."""
    return f"{result.config.prune.method} {result.sparsity:.0%} + {result.config.heal.method}"


def version_description(result: TrialResult, *, search: str | None, trial_id: str, run_link: str) -> str:
    """A registered version's description: one sentence a person reads on the registry's page."""
    config, latency = result.config, result.latency
    healing = ("not healed" if config.heal.method == "none" else
               f"healed by {config.heal.method} ({config.heal.steps} steps on {config.heal.calibration_images}"
               " images)")
    recipe = ", ".join(part for part in (
        markdown_text(latency.device), f"batch {latency.batch_size}", latency.dtype,
        latency.memory_format if latency.memory_format != "contiguous" else "",
        "2:4 kernels" if latency.format == "2:4" else "", "compiled" if latency.compiled else "") if part)
    return (f"{config.prune.method} pruning to {result.sparsity:.0%} sparsity, {healing}: top-1"
            f" {result.accuracy:.4f} at {latency.median_ms:.4g} ms median (p90 {latency.p90_ms:.4g} ms) on {recipe}."
            f" Trial {trial_id}" + (f" of search {markdown_text(search)}" if search else "")
            + f": [its run]({run_link}).")
