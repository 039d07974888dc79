"""Tune's storage → MLflow: a search's trials as child runs, then its front, plots and registered models.

Ray Tune's run (its folder under the search's storage, named after the MLflow parent run) is where a search's
results are safe: every trial's last result and checkpoint are written there as it ends. MLflow is a copy made
from it — trial by trial while the search runs, and in full by `publish_search` when it ends. Because every step
here is idempotent (a trial already logged or registered is found, not written again), the same call publishes
a finished search, completes one whose driver lost MLflow half-way (`autoprune publish RUN`), and finishes one
that was resumed (`autoprune search SPEC --resume`), without duplicating a run or a model version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

from autoprune.errors import AutopruneError
from autoprune.pareto import hypervolume_2d, pareto_front
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking import schema, view
from autoprune.tracking.final import apply_final, load_final
from autoprune.tracking.report import DENSE, plot_html, plot_png
from autoprune.tracking.schema import trial_row
from autoprune.tracking.store import Tracker
from autoprune.tracking.ui import ui_hint

log = logging.getLogger(__name__)


def experiment_path(storage: str, run_id: str) -> str:
    """Tune's folder for the search whose MLflow parent run is `run_id` (Tune's run is named after it). A URI's
    query (s3://bucket/prefix?endpoint_override=…) stays at the end."""
    base, _, query = str(storage).partition("?")
    return f"{base.rstrip('/')}/{run_id}" + (f"?{query}" if query else "")


def trial_record(trial, downloads: Path, *, status: str | None = None) -> TrialRecord | None:
    """One Tune trial as the driver records it; None while it has not ended (pending, or running when the driver
    stopped). A checkpoint in remote storage is downloaded under `downloads` (the registry reads a local folder).
    `status` overrides the trial's own (Tune's callbacks hear that a trial ended before its status says so)."""
    status = status or trial.status
    if status == "ERROR":  # its worker died more often than search.max_retries allowed
        return TrialRecord(trial.trial_id, None, error=error_text(trial), params=dict(trial.config or {}))
    if status != "TERMINATED":
        return None
    reported = trial.last_result or {}
    result = schema.result_from_report(reported)
    if result is None:
        return TrialRecord(trial.trial_id, None, params=schema.failed_params(reported) or dict(trial.config or {}),
                           error=reported.get(schema.TRIAL_ERROR, "the trial ended without reporting a result"))
    checkpoint = trial.checkpoint
    model_dir = _local_copy(checkpoint, downloads / trial.trial_id) if checkpoint else None
    return TrialRecord(trial.trial_id, result, model_dir=model_dir, params=dict(trial.config or {}))


def records_from_storage(path: str, downloads: Path) -> tuple[list[TrialRecord], int]:
    """The ended trials of the Tune run at `path`, in the order Tune created them, and how many have not ended."""
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")  # warns of trials that never reported
    level, quiet.level = quiet.level, logging.ERROR
    try:
        analysis = ExperimentAnalysis(path)
    except Exception as error:  # no such folder, or not a Tune run
        raise AutopruneError(
            f"no Ray Tune run at {path!r} ({type(error).__name__}: {str(error)[:200]}). Pass the --workdir or"
            " --storage the search ran with."
        ) from None
    finally:
        quiet.setLevel(level)
    records = [trial_record(trial, downloads) for trial in sorted(analysis.trials, key=_created)]
    return [r for r in records if r is not None], sum(1 for r in records if r is None)


def _created(trial) -> int:
    """The trial's place in the order Tune created it. The experiment state does not keep that order (Tune caches
    the trials to save in a set), but its search generator numbers each trial's tag: "3_prune.method=…"."""
    number = (getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(number) if number.isdigit() else 0


def error_text(trial) -> str:
    """The error Tune wrote for a trial: beside the driver while it runs, in the run's storage afterwards."""
    name = trial.run_metadata.error_filename
    local = os.path.join(trial.local_path, name) if name and getattr(trial, "local_path", None) else None
    try:
        if local and os.path.exists(local):
            return Path(local).read_text().strip()
        if name:
            with trial.storage.storage_filesystem.open_input_stream(f"{trial.storage.trial_fs_path}/{name}") as f:
                return f.read().decode().strip()
    except Exception:  # an unreadable error file must not hide that the trial failed
        pass
    return "the trial failed (no error file)"


def _local_copy(checkpoint, destination: Path) -> str:
    """A local directory holding the checkpoint: its own path on a local or shared filesystem, else a download
    (s3://, gs://: the driver registers the models from the run's storage)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    if destination.is_dir():  # downloaded when the trial ended: not again
        return str(destination)
    partial = destination.with_name(destination.name + ".partial")  # renamed when complete: a driver killed
    shutil.rmtree(partial, ignore_errors=True)                       # mid-download leaves no half model behind
    checkpoint.to_directory(str(partial))
    partial.rename(destination)
    return str(destination)


@dataclass(frozen=True)
class Published:
    front: list[TrialRecord]  # Pareto-optimal, fastest first
    run_ids: dict[str, str]  # trial id → MLflow child run id
    versions: list[str]  # registered model versions of the front
    view_path: str = ""  # the address of the search's front in MLflow's UI, below the UI's root (view.front_path)


def publish_search(
    tracker: Tracker, parent_id: str, *, name: str, cost_metric: str, registered_model: str, dense: TrialResult,
    records: Sequence[TrialRecord], metrics: Mapping[str, float] | None = None, aliases: bool = True,
    timed_again: Collection[str] | None = None,
) -> Published:
    """Every trial as a child run (those already there are kept), the front tagged, the table, plots and summary
    metrics on the parent run, the front registered (with `aliases`, the most accurate and the fastest of them
    get the registered model's aliases); `metrics` adds to the parent's summary. `timed_again`: the trials the
    search's final pass timed (driver/retime.py) — only they can be on the front, whose latencies are registered as
    that pass's: a trial left out of it was beaten with certainty, and its rescaled latency from the busy search
    must not put it on the front because the pass found the others slower (None: no final pass)."""
    records = list(records)
    logged = tracker.trial_runs(parent_id)
    run_ids = {record.trial_id: tracker.log_trial(parent_id, record, logged=logged) for record in records}
    for record in records:  # logged while the search ran, before its final re-timing put them on its scale
        if record.result is not None and record.result.searched_latency_ms is not None:
            tracker.log_final_latency(run_ids[record.trial_id], record.result)
    eligible = records if timed_again is None else [r for r in records if r.trial_id in timed_again]
    front = pareto_front(eligible, cost_metric, dense=dense)
    rows = [trial_row(record, on_front=record in front) for record in records]
    rows.append({**trial_row(TrialRecord("dense", dense), on_front=False), "prune": DENSE})
    feasible = [r.result for r in records if r.result is not None and r.result.feasible]
    summary = {
        "trials_finished": len([r for r in records if r.result is not None]),
        "trials_failed": len([r for r in records if r.result is None]),
        "front_size": len(front),
        # the scale the published latencies are on (a search's final re-timing may have measured it again)
        "dense_latency_ms": dense.latency.median_ms,
        **(metrics or {}),
    }
    if feasible:
        costs = [r.cost(cost_metric) for r in feasible]
        summary["hypervolume"] = hypervolume_2d([r.accuracy for r in feasible], costs,
                                                reference=(0.0, max(costs) * 1.1))
    with tempfile.TemporaryDirectory() as folder:
        title = f"{name}: {len(records)} trials, {len(front)} on the front"
        device = dense.latency.device
        plots = {
            "png": plot_png(rows, Path(folder) / "pareto.png", title=title, device=device),
            "html": plot_html(rows, Path(folder) / "pareto.html", title=title, device=device),
        }
        tracker.finish_search(parent_id, rows=rows, front_run_ids=[run_ids[r.trial_id] for r in front],
                              artifacts=plots, metrics=summary)
    versions = tracker.register(registered_model, parent_id, [(run_ids[r.trial_id], r) for r in front],
                                search=name, aliases=aliases)
    registered = [str(v.version) for v in versions]
    try:  # what the UI shows: a search whose models are registered is published even if this fails
        dense_run_id = tracker.log_reference(parent_id, dense)
        note = view.search_note(
            name=name, experiment_id=tracker.experiment_id, parent_id=parent_id, dense=dense, trials=len(records),
            failed=summary["trials_failed"], registered_model=registered_model, cost_metric=cost_metric,
            front=[(run_ids[r.trial_id], r.result, version) for r, version in zip(front, registered)])
        colors = view.run_colors([run_ids[r.trial_id] for r in records if r.result is not None],
                                 [run_ids[r.trial_id] for r in front], dense_run_id)
        view_path = tracker.show_search(parent_id, cost_metric=cost_metric, colors=colors, note=note)
    except Exception as error:
        log.warning("autoprune: the front's view in MLflow's UI was not written (%s: %s); `autoprune publish %s`"
                    " writes it again", type(error).__name__, str(error)[:200], parent_id)
        view_path = ""
    return Published(front=front, run_ids=run_ids, versions=registered, view_path=view_path)


def publish_run(run_id: str, *, tracking_uri: str, workdir: Path, storage: str | None = None,
                echo: Callable[[str], None] = print) -> Published:
    """`autoprune publish RUN`: (re)publish the search whose parent run is `run_id` from its Tune storage
    (`storage`, else the spec's search.storage, else the workdir's, as the search chose it)."""
    tracker = Tracker.for_search_run(tracking_uri, run_id)
    spec = tracker.search_spec(run_id)  # SearchSpec.as_dict() as the search started, overrides applied
    name, registered_model = spec["name"], spec["mlflow"]["registered_model"]
    cost_metric = next(metric for metric in spec["objectives"] if metric != "accuracy")
    dense = tracker.dense_result(run_id)
    path = experiment_path(storage or spec["search"]["storage"] or str(workdir / "ray"), run_id)
    records, not_ended = records_from_storage(path, workdir / "checkpoints" / run_id)
    final = load_final(path)
    records, dense = apply_final(final, records, dense)  # the search's final re-timing, if it got there
    echo(f"autoprune: publishing {len(records)} trials of search {name!r} (run {run_id}) from {path}"
         + (f"; {not_ended} had not ended (`autoprune search SPEC --resume {run_id}` runs them)" if not_ended else ""))
    published = publish_search(tracker, run_id, name=name, cost_metric=cost_metric,
                               registered_model=registered_model, dense=dense, records=records,
                               timed_again=None if final is None else set(final.trials))
    echo(f"autoprune: {len(published.run_ids)} trial runs, {len(published.front)} on the front;"
         f" registered as {registered_model!r} versions {', '.join(published.versions) or '—'}")
    echo(f"autoprune: the front in MLflow's UI: {ui_hint(tracking_uri, published.view_path)}")
    return published
