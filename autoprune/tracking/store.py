"""MLflow writes: one parent run per search, one child run per trial, the front's models in the registry.

Only the driver calls this module, so an sqlite store never has two writers and credentials stay on one machine.
Every write is keyed (trial id, parent run) so that publishing the same search twice duplicates nothing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from autoprune.errors import AutopruneError
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking import schema, view
from autoprune.tracking.schema import (
    DENSE_ARTIFACT,
    KEY_TAG,
    MODEL_ARTIFACT,
    PARENT_TAG,
    PARETO_TAG,
    RETARGET_TAG,
    ROLE_DENSE,
    ROLE_SEARCH,
    ROLE_TAG,
    ROLE_TRIAL,
    SEARCH_TAG,
    SPEC_ARTIFACT,
    TRIAL_TAG,
)

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "timm", "ray", "optuna", "mlflow", "torch-pruning")


DEFAULT_WORKDIR = "autoprune_runs"  # the local MLflow store, Ray results and caches, relative to where you run


def resolve_tracking_uri(flag: str | None, spec_uri: str | None, workdir: str | Path) -> str:
    """The CLI flag, else $MLFLOW_TRACKING_URI, else the spec's, else an sqlite file in the work directory."""
    local = f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or local


def is_tracking_server(tracking_uri: str) -> bool:
    """An MLflow server (http/https) rather than a store the client writes itself (sqlite, a folder, a database)."""
    return tracking_uri.startswith(("http://", "https://"))


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a local sqlite store; None for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]) if tracking_uri.startswith(prefix) else None


def local_artifacts(tracking_uri: str) -> str | None:
    """Where a local sqlite store keeps its artifacts: beside the database. (MLflow's default is ./mlruns in
    whatever directory the command ran in.) None for a tracking server, which decides where artifacts go."""
    database = sqlite_file(tracking_uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


SERVER_ANSWER_S = 10.0  # a tracking server answers in milliseconds (seconds when busy); MLflow retries ~4 min
_answered: set[str] = set()  # tracking servers that answered this process (checked once: a later outage is retried)


def check_answers(tracking_uri: str) -> None:
    """A tracking server that does not answer, or is not MLflow, is one line within seconds, not MLflow's retries
    (minutes of silence, then a long error). Its REST API is asked for the Default experiment: an MLflow server
    answers with JSON (or 401/403 where it authenticates, which the real calls report with their own message); a
    refused connection, an unknown host, silence or another server's page is the error. Stores the client writes
    itself are not checked."""
    if not is_tracking_server(tracking_uri) or tracking_uri in _answered:
        return
    import urllib.error
    import urllib.request

    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    fix = "start it, or check --tracking-uri / $MLFLOW_TRACKING_URI / the spec's mlflow.tracking_uri"
    try:
        urllib.request.urlopen(url, timeout=SERVER_ANSWER_S).close()
    except urllib.error.HTTPError as error:  # it answered: with MLflow's JSON error, or as something else
        body = error.read(2000).decode(errors="replace")
        if error.code not in (401, 403) and '"error_code"' not in body:
            raise AutopruneError(f"{tracking_uri!r} answers, but not as an MLflow tracking server (HTTP {error.code}"
                                 f" for its REST API): {fix}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        why = (f"no answer within {SERVER_ANSWER_S:g} s" if isinstance(reason, TimeoutError) or "timed out" in str(reason)
               else getattr(reason, "strerror", None) or str(reason))
        raise AutopruneError(f"the MLflow tracking server at {tracking_uri!r} does not answer ({why}): {fix}") from None
    _answered.add(tracking_uri)


def client(tracking_uri: str | None, *, create: bool = False):
    """An MLflow client for runs and the registry at `tracking_uri` (None: MLflow's own default), whose server, if it
    is one, answered. A local sqlite store that does not exist is an error unless `create` (MLflow would create an
    empty one wherever the path points, and a command that only reads would then say it found nothing there)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    database = sqlite_file(uri)
    if database is not None and not create and not database.exists():
        raise AutopruneError(f"no MLflow store at {uri!r}: run a search first (`autoprune search SPEC`, or"
                             " `autoprune demo`), or pass the --workdir or --tracking-uri it used")
    check_answers(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _refused(error: Exception) -> bool:
    """A tracking server's answer that the client's credentials are missing or wrong."""
    text = str(error)
    return "401" in text or "UNAUTHENTICATED" in text or "Unauthorized" in text


class Tracker:
    """A client bound to one tracking server and experiment."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri, create=True)
        if artifact_location is None:
            artifact_location = local_artifacts(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id if found
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
        except Exception as error:  # unreachable server, bad URI, locked store: say so before any trial runs
            if _refused(error):
                raise AutopruneError(
                    f"MLflow at {tracking_uri!r} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and"
                    " MLFLOW_TRACKING_PASSWORD in the environment (never in the spec)"
                ) from None
            raise AutopruneError(
                f"MLflow at {tracking_uri!r} is not usable ({type(error).__name__}: {str(error)[:200]})."
                " Check --tracking-uri / mlflow.tracking_uri, or start the server."
            ) from None

    # ---- runs ----------------------------------------------------------------------------------------------

    def start_search(self, *, name: str, spec: Mapping[str, Any], run_name: str | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name or name,
            tags={ROLE_TAG: ROLE_SEARCH, SEARCH_TAG: name, **library_versions()},
        )
        self.client.log_dict(run.info.run_id, dict(spec), SPEC_ARTIFACT)
        return run.info.run_id

    @classmethod
    def for_search_run(cls, tracking_uri: str, run_id: str) -> "Tracker":
        """A tracker bound to the experiment of the search whose parent run is `run_id`."""
        mlflow = client(tracking_uri)
        try:
            run = mlflow.get_run(run_id)
        except Exception as error:
            raise AutopruneError(f"no MLflow run {run_id!r} at {tracking_uri!r} ({str(error)[:200]})") from None
        if run.data.tags.get(ROLE_TAG) != ROLE_SEARCH:
            raise AutopruneError(f"MLflow run {run_id!r} is not a search's parent run (its role is"
                                 f" {run.data.tags.get(ROLE_TAG)!r}); pass the run id `autoprune search` printed")
        return cls(tracking_uri, mlflow.get_experiment(run.info.experiment_id).name)

    def search_spec(self, parent_id: str) -> dict:
        """The spec a search ran with, as logged when it started."""
        return self._load_json(parent_id, SPEC_ARTIFACT)

    def dense_result(self, parent_id: str) -> TrialResult:
        """The dense model's result as the search measured it when it started."""
        return TrialResult.from_dict(self._load_json(parent_id, DENSE_ARTIFACT))

    def _load_json(self, run_id: str, name: str) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            return json.loads(Path(self.client.download_artifacts(run_id, name, folder)).read_text())

    def unfinished_search(self, name: str):
        """The newest parent run of search `name` that did not finish (its driver stopped), or None."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE_SEARCH}' and tags.`{SEARCH_TAG}` = '{name}'",
            order_by=["attributes.start_time DESC"], max_results=50,
        )
        # a retarget's run (driver/retarget.py) has no Tune state of its own: there is nothing to resume in it
        return next((run for run in runs if run.info.status != "FINISHED" and RETARGET_TAG not in run.data.tags),
                    None)

    def log_dense(self, parent_id: str, result: TrialResult) -> None:
        """The unpruned model's measurements, for comparison on the parent run (and in full, for a resumed or
        republished search to compare against the same numbers)."""
        self.client.log_dict(parent_id, result.to_dict(), DENSE_ARTIFACT)
        for key, value in schema.dense_metrics(result).items():
            self.client.log_metric(parent_id, key, value)
        self.client.set_tag(parent_id, schema.DEVICE_TAG, result.latency.device)

    def log_trial(self, parent_id: str, record: TrialRecord, *, logged: Mapping[str, Any] | None = None) -> str:
        """A child run for one trial (created once; a second call returns the same run). `logged` (trial id → run,
        from `trial_runs`) saves a query per trial when many are published at once."""
        if logged is not None:
            existing = [logged[record.trial_id]] if record.trial_id in logged else []
        else:
            existing = self.child_runs(parent_id, trial_id=record.trial_id)
        if existing and existing[0].info.status != "RUNNING":
            return existing[0].info.run_id
        if existing:  # begun by a driver that was stopped while writing it: completed now (writes are the same)
            run_id = existing[0].info.run_id
        else:
            tags = {ROLE_TAG: ROLE_TRIAL, TRIAL_TAG: record.trial_id, PARENT_TAG: parent_id,
                    **library_versions()}
            what = view.run_name(record.result) if record.result is not None else "failed"
            run_id = self.client.create_run(self.experiment_id, run_name=f"{what} · {record.trial_id}",
                                            tags=tags).info.run_id
        from mlflow.entities import Metric, RunTag

        result = record.result
        if result is None:
            self._log_params(run_id, record.params)
            self.client.set_tag(run_id, schema.ERROR_TAG, (record.error or "unknown error")[:5000])
            self.client.set_terminated(run_id, status="FAILED")
            return run_id
        now_ms = int(time.time() * 1000)
        self._log_params(run_id, schema.trial_params(result))
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now_ms, 0) for key, value in schema.trial_metrics(result).items()],
            tags=[RunTag(key, value) for key, value in schema.trial_tags(result).items()],
        )
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=batch[start : start + 100])

    def trial_runs(self, parent_id: str) -> dict[str, Any]:
        """The search's child runs by trial id."""
        return {run.data.tags[TRIAL_TAG]: run for run in self.child_runs(parent_id) if TRIAL_TAG in run.data.tags}

    def child_runs(self, parent_id: str, *, trial_id: str | None = None) -> list:
        """The search's trial runs (not its dense model's run)."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
        if trial_id is not None:
            query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=10000)

    def log_final_latency(self, run_id: str, result: TrialResult) -> None:
        """A trial's latency from the search's final re-timing, onto the run logged while the search ran (its metrics
        are the latest values: the UI's charts and queries read these, the trial's own stays `latency_ms_in_search`).
        Logging the same values again changes nothing that is read."""
        from mlflow.entities import Metric

        keys = ("latency_ms", "latency_p90_ms", "latency_spread", "speedup", "speedup_low", "speedup_high",
                "latency_wide", "reference_ms", "latency_ms_in_search")
        metrics = schema.trial_metrics(result)
        now_ms = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, float(metrics[key]), now_ms, 1) for key in keys
                                               if key in metrics])

    def log_reference(self, parent_id: str, dense: TrialResult) -> str:
        """The dense model as a run beside the trials (created once), so that charts of the trials show it."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = '{ROLE_DENSE}'"
        existing = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if existing and existing[0].info.status != "RUNNING":
            return existing[0].info.run_id
        from mlflow.entities import Metric, RunTag

        if existing:  # begun by a driver that was stopped while writing it: completed now (writes are the same)
            run_id = existing[0].info.run_id
        else:
            run_id = self.client.create_run(self.experiment_id, run_name="dense model (reference)",
                                            tags={ROLE_TAG: ROLE_DENSE, PARENT_TAG: parent_id}).info.run_id
        now_ms = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(key, float(value), now_ms, 0) for key, value in schema.trial_metrics(dense).items()],
            tags=[RunTag(key, value) for key, value in schema.trial_tags(dense).items()])
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def finish_search(
        self,
        parent_id: str,
        *,
        rows: Sequence[Mapping[str, Any]],
        front_run_ids: Sequence[str],
        artifacts: Mapping[str, Path],
        metrics: Mapping[str, float],
    ) -> None:
        """Front membership on every child, the trial table, plots and summary metrics on the parent."""
        front = set(front_run_ids)
        for run in self.child_runs(parent_id):
            self.client.set_tag(run.info.run_id, PARETO_TAG, str(run.info.run_id in front).lower())
        with tempfile.TemporaryDirectory() as folder:
            table = Path(folder) / schema.TRIALS_ARTIFACT
            table.write_text(json.dumps(list(rows), indent=1, default=str))
            self.client.log_artifact(parent_id, str(table))
        for path in artifacts.values():
            self.client.log_artifact(parent_id, str(path))
        for key, value in metrics.items():
            self.client.log_metric(parent_id, key, float(value))
        self.client.set_terminated(parent_id, status="FINISHED")

    def show_search(self, parent_id: str, *, cost_metric: str, colors: Mapping[str, str], note: str) -> str:
        """What MLflow's UI shows of a finished search (tracking/view.py): its runs' colours, its description, and
        the saved view of its front, listed in the experiment's description. Returns the view's address."""
        for run_id, color in colors.items():
            self.client.set_tag(run_id, schema.RUN_COLOR_TAG, color)
        self.client.set_tag(parent_id, schema.NOTE_TAG, note[: view.MAX_NOTE_CHARS])
        experiment = self.experiment_id
        self.client.set_experiment_tag(experiment, schema.EXPERIMENT_KIND_TAG, view.EXPERIMENT_KIND)
        self.client.set_experiment_tag(experiment, schema.VIEW_TAG_PREFIX + parent_id,
                                       view.view_state(parent_id, cost_metric))
        written = self.client.get_experiment(experiment).tags.get(schema.NOTE_TAG)
        if written is None or written.startswith(view.EXPERIMENT_NOTE_HEAD):  # never overwrite a person's words
            searches = self.client.search_runs(
                [experiment], f"tags.`{ROLE_TAG}` = '{ROLE_SEARCH}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"], max_results=50)
            listed = [{"run_id": run.info.run_id, "run_name": run.info.run_name,
                       "summary": view.search_summary(run.data.metrics, run.data.tags)} for run in searches]
            self.client.set_experiment_tag(experiment, schema.NOTE_TAG, view.experiment_note(listed, experiment))
        return view.front_path(experiment, parent_id)

    # ---- registry ------------------------------------------------------------------------------------------

    def register(self, model_name: str, parent_id: str, entries: Sequence[tuple[str, TrialRecord]], *,
                 search: str | None = None, aliases: bool = True) -> list:
        """Register each (child run id, record) as a version of `model_name`; with `aliases`, the registered
        model's aliases go to the extremes among them.

        A trial already registered (same parent run and trial id) is not registered again.
        """
        from mlflow.exceptions import MlflowException

        from autoprune.tracking.pyfunc import save_mlflow_model

        try:
            self.client.create_registered_model(model_name, description="Pareto-optimal pruned models (autoprune).")
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        existing = {v.tags.get(KEY_TAG): v for v in self.client.search_model_versions(f"name='{model_name}'")}
        versions = []
        for run_id, record in entries:
            key = f"{parent_id}/{record.trial_id}"
            if key in existing:
                versions.append(existing[key])
                continue
            with tempfile.TemporaryDirectory() as folder:  # an MLflow model, which MLflow loads and serves itself
                mlflow_model = save_mlflow_model(record.model_dir, Path(folder) / MODEL_ARTIFACT,
                                                 input_size=record.result.latency.input_size)
                self.client.log_artifacts(run_id, str(mlflow_model), MODEL_ARTIFACT)
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
            description = view.version_description(
                record.result, search=search, trial_id=record.trial_id,
                run_link=view.run_path(self.experiment_id, run_id))
            versions.append(
                self.client.create_model_version(
                    model_name, source, run_id=run_id, tags=schema.version_tags(record.result, key),
                    description=description,
                )
            )
        if versions and aliases:
            most_accurate = max(versions, key=lambda v: (float(v.tags["accuracy"]), -float(v.tags["latency_ms"])))
            fastest = min(versions, key=lambda v: (float(v.tags["latency_ms"]), -float(v.tags["accuracy"])))
            self.client.set_registered_model_alias(model_name, schema.ALIAS_MOST_ACCURATE, most_accurate.version)
            self.client.set_registered_model_alias(model_name, schema.ALIAS_FASTEST, fastest.version)
        return versions
