"""Reading back from MLflow: the best registered model under a latency target, a search's front, loading a model."""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass
from typing import Any

from autoprune.errors import AutopruneError, NoModelMeetsTarget
from autoprune.tracking.schema import (
    PARENT_TAG,
    PARETO_TAG,
    ROLE_SEARCH,
    ROLE_TAG,
    SEARCH_TAG,
    read_version_tags,
    run_row,
)
from autoprune.tracking.store import Tracker, client
from autoprune.tracking.ui import SearchView, find_search

SEARCHES_READ = 50  # the newest finished searches whose specs are read to tell why a registered model has no versions
NAMES_LISTED = 20  # registered models named in the error for a name that is not there


@dataclass(frozen=True)
class ModelChoice:
    """A registered version and the measurements it was registered with (its tags: `schema.VERSION_TAGS`; the
    defaults stand for tags a version registered by an older autoprune lacks)."""

    name: str
    version: str
    model_uri: str
    run_id: str
    accuracy: float
    latency_ms: float
    latency_p90_ms: float = float("nan")
    device: str = "unknown"
    batch_size: int = 0
    dtype: str = "unknown"
    memory_format: str = "contiguous"  # the rest of the recipe it was timed in (loading applies it)
    kernels: str = "dense"
    compiled: bool = False
    threads: int = 0  # CPU threads it was timed with (0: not recorded)
    sparsity: float = float("nan")
    macs: int = 0
    runtime: str = "torch"  # or onnxruntime: timed, scored and served in ONNX Runtime

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("cpu")  # measure.timing.device_name: "cpu: <model> (N threads)" or a GPU's name

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def conditions(self) -> tuple[str, int, str, str]:
        """What its latency was measured under: only latencies measured under the same conditions compare."""
        return (self.device, self.batch_size, self.dtype, self.runtime)

    def summary(self) -> str:
        layout = "" if self.memory_format == "contiguous" else f", {self.memory_format}"
        extra = layout + (", 2:4 kernels" if self.kernels == "2:4" else "") + (", compiled" if self.compiled else "")
        extra += ", in ONNX Runtime" if self.runtime == "onnxruntime" else ""
        return (f"{self.name} version {self.version}: top-1 {self.accuracy:.4f} at {self.latency_ms:.4g} ms"
                f" (p90 {self.latency_p90_ms:.4g} ms; {self.device}, batch {self.batch_size}, {self.dtype}{extra})")


def registered_versions(model: str, *, tracking_uri: str | None = None) -> list[ModelChoice]:
    from mlflow.exceptions import MlflowException

    try:
        versions = client(tracking_uri).search_model_versions(f"name='{model}'")
    except MlflowException as error:
        raise AutopruneError(f"cannot read registered model {model!r} at {tracking_uri!r}: {error}") from None
    choices = []
    for version in versions:
        measured = read_version_tags(version.tags)
        if measured is None:
            continue  # not registered by autoprune
        choices.append(ModelChoice(name=model, version=str(version.version), run_id=version.run_id or "",
                                   model_uri=f"models:/{model}/{version.version}", **measured))
    return choices


def best(
    *,
    model: str,
    max_latency_ms: float,
    device: str | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    runtime: str | None = None,
    tracking_uri: str | None = None,
    load: bool = False,
):
    """The most accurate registered version whose measured median latency is ≤ `max_latency_ms`.

    Latencies compare only when measured under the same conditions (device, batch size, dtype, runtime): a batch-1
    latency is not ranked against a batch-64 one, nor PyTorch's against ONNX Runtime's. `device`, `batch_size`,
    `dtype` and `runtime` select the conditions; when the
    versions left were measured under more than one, that is an error that lists them. Returns a `ModelChoice`,
    or with `load=True` a `(ModelChoice, model)` pair, the model prepared in the recipe it was timed in. Raises
    `NoModelMeetsTarget` (saying what the fastest is) when none fits, and (saying why: the search whose front was
    empty, or the names registered there) when there is no version at all.
    """
    if not max_latency_ms > 0:
        raise AutopruneError(f"`max_latency_ms > 0` must hold, but got {max_latency_ms=}.")
    candidates = registered_versions(model, tracking_uri=tracking_uri)
    if not candidates:
        raise NoModelMeetsTarget(_why_no_versions(model, tracking_uri))
    for name, wanted, flag in (("device", device, "--device"), ("batch_size", batch_size, "--batch-size"),
                               ("dtype", dtype, "--dtype"), ("runtime", runtime, "--runtime")):
        if wanted is None:
            continue
        present = sorted({str(getattr(c, name)) for c in candidates})
        candidates = [c for c in candidates if getattr(c, name) == wanted]
        if not candidates:
            raise NoModelMeetsTarget(
                f"no version of {model!r} was measured with {name} {wanted!r} (among the rest:"
                f" {', '.join(present)}); change {flag}.")
    conditions = sorted({c.conditions for c in candidates}, key=str)
    if len(conditions) > 1:
        counts = {condition: sum(c.conditions == condition for c in candidates) for condition in conditions}
        listed = "; ".join(f"device {d!r}, batch {b}, {t}, {r} ({counts[d, b, t, r]}"
                           f" version{'s' * (counts[d, b, t, r] > 1)})" for d, b, t, r in conditions)
        raise AutopruneError(
            f"the versions of {model!r} were measured under {len(conditions)} conditions, whose latencies do not"
            f" compare: {listed}. Choose with --device / --batch-size / --dtype / --runtime (device=, batch_size=,"
            " dtype=, runtime=).")
    fitting = [c for c in candidates if c.latency_ms <= max_latency_ms]
    if not fitting:
        fastest = min(candidates, key=lambda c: c.latency_ms)
        raise NoModelMeetsTarget(
            f"no version of {model!r} meets {max_latency_ms:g} ms; the fastest is version {fastest.version} at"
            f" {fastest.latency_ms:.4g} ms ({fastest.device}, accuracy {fastest.accuracy:.4f})."
        )
    choice = max(fitting, key=lambda c: (c.accuracy, -c.latency_ms))
    if load:
        return choice, load_model(choice.model_uri, tracking_uri=tracking_uri)
    return choice


def _why_no_versions(model: str, tracking_uri: str | None) -> str:
    """Why `model` has no version to choose from, and what to do: a search that found nothing to register into it
    (its front was empty), or, for a name that is not registered at all, the names that are (the closest first)."""
    fallback = f"registered model {model!r} has no versions; run `autoprune search` first."
    try:
        names = _registered_model_names(tracking_uri)
        search = _search_registering_into(model, tracking_uri) if model in names else None
    except Exception:  # a store that cannot tell why must not hide that there is nothing to choose from
        return fallback
    if search is not None:
        run_id, name = search.info.run_id, search.data.tags.get(SEARCH_TAG, "?")
        on_front = int(search.data.metrics.get("front_size", 0))  # publish_search's summary of the search
        if not on_front:
            return (f"registered model {model!r} has no versions: search run {run_id} (search {name!r}) found no"
                    " trial that beat the dense model on latency or accuracy, so nothing was registered; the dense"
                    " model stays the best choice.")
        return (f"registered model {model!r} has no versions, though search run {run_id} (search {name!r}) put"
                f" {on_front} trial{'s' * (on_front > 1)} on its front (were they deleted?); `autoprune publish"
                f" {run_id}` registers them again.")
    if model in names:
        return fallback
    if not names:
        return (f"no registered model named {model!r} at {tracking_uri!r}, nor any other; run `autoprune search`"
                " first.")
    closest = difflib.get_close_matches(model, names, n=1)
    listed = ", ".join(names[:NAMES_LISTED]) + (f", … ({len(names) - NAMES_LISTED} more)"
                                                if len(names) > NAMES_LISTED else "")
    where = f"no registered model named {model!r} at {tracking_uri!r}"
    if closest:
        return f"{where}; did you mean {closest[0]!r}? (registered models there: {listed})"
    return f"{where}; registered models there: {listed}."


def _registered_model_names(tracking_uri: str | None) -> list[str]:
    mlflow, names, token = client(tracking_uri), [], None
    while True:
        page = mlflow.search_registered_models(max_results=1000, page_token=token)
        names.extend(found.name for found in page)
        token = page.token
        if not token:
            return sorted(names)


def _search_registering_into(model: str, tracking_uri: str | None):
    """The parent run of the newest finished search (or retarget) whose spec registers into `model`, or None. The
    parent runs do not name the registered model: their spec (`Tracker.search_spec`) does."""
    mlflow = client(tracking_uri)
    experiments = [experiment.experiment_id for experiment in mlflow.search_experiments()]
    if not experiments:
        return None
    searches = mlflow.search_runs(
        experiments, filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SEARCH}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=SEARCHES_READ,
    )
    trackers: dict[str, Tracker] = {}
    bar, drawn = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[bar] = "false"  # MLflow draws a progress bar per download: the error must stay one line on stderr
    try:
        for run in searches:
            if run.info.experiment_id not in trackers:
                trackers[run.info.experiment_id] = Tracker.for_search_run(tracking_uri, run.info.run_id)
            try:
                spec = trackers[run.info.experiment_id].search_spec(run.info.run_id)
            except Exception:  # a parent run without its spec (logged by an older autoprune, or damaged) names no model
                continue
            if (spec.get("mlflow") or {}).get("registered_model") == model:
                return run
        return None
    finally:
        if drawn is None:
            os.environ.pop(bar, None)
        else:
            os.environ[bar] = drawn


def load_model(model_uri: str, *, tracking_uri: str | None = None, recipe: bool = True, device=None):
    """Download a registered (or run) model and rebuild it, in eval mode, prepared in the recipe its latency was
    measured in (dtype, memory format, 2:4 kernels, compiled) on `device` (default: the kind it was measured on)
    and warmed up; `recipe=False` gives the plain float32 model. Nothing is unpickled."""
    from autoprune.saved import load_model_dir

    return load_model_dir(download_model(model_uri, tracking_uri), recipe=recipe, device=device)


def load_served(model_uri: str, *, tracking_uri: str | None = None, device=None):
    """`load_model`'s prepared model itself (measure/prepared.py): what a server calls, with the recipe that runs
    and the batch shape it was timed and warmed on."""
    from autoprune.saved import load_prepared

    return load_prepared(download_model(model_uri, tracking_uri), device=device)


def download_model(model_uri: str, tracking_uri: str | None) -> str:
    """A registered (models:/NAME/VERSION, resolved against `tracking_uri`) or run model's folder, downloaded."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if model_uri.startswith("models:/") and tracking_uri:
        # resolved here, against `tracking_uri`: MLflow resolves models:/ against its global registry URI, and
        # mlflow.set_registry_uri / set_tracking_uri would change it (and $MLFLOW_TRACKING_URI) for the whole process
        registry = client(tracking_uri)
        path = model_uri[len("models:/"):]
        if "/" not in path and "@" in path:  # models:/NAME@ALIAS
            name, alias = path.rsplit("@", 1)
            reference = registry.get_model_version_by_alias(name, alias).version
        else:  # models:/NAME/VERSION
            name, _, reference = path.rpartition("/")
        model_uri = registry.get_model_version_download_uri(name, reference)
    return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri)


def front(*, experiment: str | None = None, run_id: str | None = None,
          tracking_uri: str | None = None) -> tuple[SearchView, list[dict[str, Any]]]:
    """The search (`run_id`, else the newest finished one, in `experiment` if given) and its Pareto-optimal trials,
    fastest first (none when no trial beat the dense model), each with its registered `version` and `aliases`."""
    search, rows, _ = search_rows(experiment=experiment, run_id=run_id, tracking_uri=tracking_uri)
    return search, [row for row in rows if row["pareto"]]


def search_rows(*, experiment: str | None = None, run_id: str | None = None,
                tracking_uri: str | None = None) -> tuple[SearchView, list[dict[str, Any]], dict[str, Any]]:
    """The search, every finished trial's row (fastest first; `pareto` marks the front, whose rows also name their
    registered version and its aliases) and the dense model's row."""
    from autoprune.result import TrialRecord
    from autoprune.tracking.report import DENSE
    from autoprune.tracking.schema import trial_row

    search = find_search(tracking_uri, experiment=experiment, run_id=run_id, with_view=False)
    mlflow = client(tracking_uri)
    children = mlflow.search_runs([mlflow.get_experiment_by_name(search.experiment).experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{search.run_id}'", max_results=10000)
    rows, aliases = [], {}  # registered model → {version: its aliases} (searching versions does not give them)
    for run in children:
        row = {**run_row(run), "pareto": run.data.tags.get(PARETO_TAG) == "true"}
        if row["prune"] is None or row["accuracy"] is None or row["latency_ms"] is None:
            continue  # the dense model's run (its row is below), or a trial that failed or stopped unscored
        if row["pareto"]:
            versions = mlflow.search_model_versions(f"run_id='{run.info.run_id}'")
            for name in {v.name for v in versions} - set(aliases):
                aliases[name] = {}
                for alias, version in mlflow.get_registered_model(name).aliases.items():
                    aliases[name].setdefault(str(version), []).append(alias)
            row["version"] = ", ".join(f"{v.name}/{v.version}" for v in versions) or None
            row["aliases"] = ", ".join(alias for v in versions
                                       for alias in aliases[v.name].get(str(v.version), ())) or None
        rows.append(row)
    dense = Tracker.for_search_run(tracking_uri, search.run_id).dense_result(search.run_id)
    dense_row = {**trial_row(TrialRecord(DENSE, dense), on_front=False), "prune": DENSE, "pareto": False,
                 "device": dense.latency.device}
    return search, sorted(rows, key=lambda row: row["latency_ms"]), dense_row
