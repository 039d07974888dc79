"""The driver: spec → Ray Tune trials sampled by Optuna → front → MLflow runs, plots and registry.

The driver validates everything and prepares what trials share (data, dense weights) before Ray starts; the
trials run `run_trial` on their own workers and report; the driver alone writes to MLflow, trial by trial as they
finish (so the UI fills while the search runs), then the front, the plots and the registered models.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from ray.tune import Callback

from autoprune import data as datasets
from autoprune.dense import dense_weights, model_source
from autoprune.errors import AutopruneError
from autoprune.latency_cache import SharedLatencyCache
from autoprune.models import layer_groups
from autoprune.pareto import hypervolume_2d, non_dominated
from autoprune.report import DENSE, plot_html, plot_png, table
from autoprune.space import SearchSpace
from autoprune.spec import Choice, Fixed, HealConfig, PruneConfig, SearchSpec, TrialConfig, load_spec
from autoprune.tracking import DEFAULT_WORKDIR, Tracker, TrialRecord, is_tracking_server, resolve_tracking_uri
from autoprune.trial import TrialContext, TrialResult, run_trial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished search produced, and where to find it."""

    spec: SearchSpec
    tracking_uri: str
    parent_run_id: str
    dense: TrialResult
    records: list[TrialRecord]
    front: list[TrialRecord]  # Pareto-optimal, fastest first
    registered_versions: list[str]
    wall_seconds: float
    ui_command: str
    failed: list[TrialRecord] = field(default_factory=list)
    accounting: dict[str, float] = field(default_factory=dict)  # where the time went (see `time_accounting`)
    retried: int = 0  # trial restarts after a worker died or a trial raised (search.max_retries)


def ui_command(tracking_uri: str) -> str:
    if is_tracking_server(tracking_uri):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def load_data(spec: SearchSpec) -> datasets.DataBundle:
    if spec.data.source == "reference":
        bundle = datasets.reference_task(seed=spec.search.seed)
        if spec.data.eval_images:
            bundle = replace(bundle, eval=bundle.eval.subset(spec.data.eval_images, seed=spec.search.seed))
        return bundle
    return datasets.image_folder(
        train_dir=spec.data.train_dir,
        val_dir=spec.data.val_dir,
        image_size=spec.data.image_size,
        train_images=_largest_calibration_budget(spec),
        eval_images=spec.data.eval_images,
        seed=spec.search.seed,
    )


def _largest_calibration_budget(spec: SearchSpec) -> int:
    """How many training images the search may ask for at most: only those are read from an ImageFolder."""
    dimension = spec.heal.calibration_images
    if isinstance(dimension, Fixed):
        return int(dimension.value)
    return int(max(dimension.values) if isinstance(dimension, Choice) else dimension.high)


CONSTRAINT_ATTR = "constraint"  # Optuna user attribute: (latency − target,), feasible when ≤ 0


def make_sampler(name: str, seed: int, *, constrained: bool = False):
    """Optuna's sampler; `constrained` makes TPE / NSGA-II prefer trials that met the latency target."""
    import optuna

    constraints = {"constraints_func": _trial_constraints} if constrained else {}
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, **constraints),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, **constraints),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),  # samples blindly: constraints do not apply
    }
    return samplers[name]()


def _trial_constraints(trial) -> tuple[float, ...]:
    return tuple(trial.user_attrs.get(CONSTRAINT_ATTR, (0.0,)))


def latency_constrained_searcher(space: SearchSpace, spec: SearchSpec):
    """Ray Tune's OptunaSearch, told each finished trial's latency excess over the spec's target (if any), so
    that Optuna's constrained samplers concentrate where the target is met."""
    from ray.tune.search.optuna import OptunaSearch

    target = spec.latency_target_ms

    class ConstrainedOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # `_ot_trials` (Tune trial id → Optuna trial) is OptunaSearch's own map; a test pins that it exists.
            if target is not None and result and "latency_ms" in result and trial_id in self._ot_trials:
                self._ot_trials[trial_id].set_user_attr(CONSTRAINT_ATTR, (float(result["latency_ms"]) - target,))
            super().on_trial_complete(trial_id, result, error)

    return ConstrainedOptunaSearch(
        space=space.define,
        metric=["accuracy", spec.cost_metric],
        mode=["max", "min"],
        sampler=make_sampler(spec.search.sampler, spec.search.seed, constrained=target is not None),
    )


def search(
    spec: SearchSpec | str | Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    workdir: str | Path = DEFAULT_WORKDIR,
    trials: int | None = None,
    storage: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> SearchOutcome:
    """Run a search end to end. Everything is validated before Ray starts; `echo` shows progress (None: quiet).
    `storage` overrides the spec's `search.storage` (where trials write their checkpoints)."""
    started = time.perf_counter()
    say = echo or (lambda line: None)
    if not isinstance(spec, SearchSpec):
        spec = load_spec(spec)
    if trials is not None:
        spec = replace(spec, search=replace(spec.search, trials=trials))
    if storage is not None:
        spec = replace(spec, search=replace(spec.search, storage=storage))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = resolve_tracking_uri(tracking_uri, spec.mlflow.tracking_uri, workdir)
    # A local store keeps its artifacts next to it; a tracking server decides where artifacts go (it serves them).
    tracker = Tracker(tracking_uri, spec.mlflow.experiment,
                      artifact_location=None if is_tracking_server(tracking_uri) else (workdir / "mlartifacts").as_uri())

    source = model_source(spec.model)
    space = SearchSpace(spec, layer_groups(source.create()))  # the spec's groups exist in the model (no weights needed)

    import ray

    if not ray.is_initialized():
        # Worker output stays in Ray's logs: trial errors reach the user through the progress lines and MLflow.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if spec.profile.target is not None:
        _check_target_hardware(spec.profile.target.accelerator_type, ray.cluster_resources())
    if spec.healing.engine != "local":
        _check_healing_resources(spec, ray.cluster_resources())

    say(f"autoprune: {spec.name}: loading data and the dense model {spec.model.name}")
    bundle = load_data(spec)
    state = dense_weights(spec.model, spec.data, bundle, cache_dir=workdir / "cache", seed=spec.search.seed)
    context = TrialContext(source, state, bundle, spec.profile, spec.latency_target_ms,
                           latency_cache=SharedLatencyCache.start(),
                           healing_engine=replace(spec.healing, storage=spec.search.storage))
    resources = {"cpu": spec.search.cpu, "gpu": spec.search.gpu}
    say(f"autoprune: measuring the dense model on a trial worker ({resources})")
    dense = ray.get(
        ray.remote(num_cpus=spec.search.cpu, num_gpus=spec.search.gpu)(_dense_baseline).remote(context)
    )
    say(f"autoprune: dense top-1 {dense.accuracy:.4f}, {dense.latency.median_ms:.3f} ms on {dense.latency.device}")

    setup_seconds = time.perf_counter() - started
    parent_id = tracker.start_search(name=spec.name, spec=spec.as_dict(), run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.log_dense(parent_id, dense)
    publisher = _TrialPublisher(tracker, parent_id, spec, say, dense, downloads=workdir / "checkpoints" / parent_id)
    tune_started = time.perf_counter()
    _run_tune(spec, space, context, publisher, storage=spec.search.storage or str(workdir / "ray"), run_name=parent_id)
    tune_seconds = time.perf_counter() - tune_started

    records = publisher.records
    front = pareto_front(records, spec.cost_metric, dense=dense)
    rows = [_row(record, on_front=record in front) for record in records]
    rows.append({**_row(TrialRecord("dense", dense), on_front=False), "prune": DENSE})
    with tempfile.TemporaryDirectory() as folder:
        title = f"{spec.name}: {len(records)} trials, {len(front)} on the front"
        device = dense.latency.device
        plots = {
            "png": plot_png(rows, Path(folder) / "pareto.png", title=title, device=device),
            "html": plot_html(rows, Path(folder) / "pareto.html", title=title, device=device),
        }
        feasible = [r.result for r in records if r.result is not None and r.result.feasible]
        accounting = time_accounting(records, setup_seconds=setup_seconds, tune_seconds=tune_seconds,
                                     concurrency=min(spec.search.concurrency, spec.search.trials))
        summary = {
            "trials_finished": len([r for r in records if r.result is not None]),
            "trials_failed": len([r for r in records if r.result is None]),
            "trials_retried": publisher.retried,
            "front_size": len(front),
            **accounting,
        }
        if feasible:
            costs = [r.cost(spec.cost_metric) for r in feasible]
            summary["hypervolume"] = hypervolume_2d(
                [r.accuracy for r in feasible], costs, reference=(0.0, max(costs) * 1.1)
            )
        tracker.finish_search(
            parent_id, rows=rows, front_run_ids=[publisher.run_ids[r.trial_id] for r in front],
            artifacts=plots, metrics=summary,
        )
    versions = tracker.register(
        spec.mlflow.registered_model, parent_id, [(publisher.run_ids[r.trial_id], r) for r in front]
    )
    outcome = SearchOutcome(
        spec=spec,
        tracking_uri=tracking_uri,
        parent_run_id=parent_id,
        dense=dense,
        records=records,
        front=front,
        registered_versions=[str(v.version) for v in versions],
        wall_seconds=time.perf_counter() - started,
        ui_command=ui_command(tracking_uri),
        failed=[r for r in records if r.result is None],
        accounting=accounting,
        retried=publisher.retried,
    )
    say(summary_text(outcome))
    return outcome


def pareto_front(
    records: list[TrialRecord], cost_metric: str = "latency_ms", *, dense: TrialResult | None = None
) -> list[TrialRecord]:
    """The feasible, finished trials that no other one beats on both accuracy and cost; fastest first.

    The dense model takes part as a competitor, so that a pruned model it beats on both counts (masks that run the
    same dense kernels, say) is not offered as a trade-off; the dense model itself is never on the returned front.
    """
    candidates = [r for r in records if r.result is not None and r.result.feasible and r.model_dir]
    if not candidates:
        return []
    points = [[r.result.accuracy, r.result.cost(cost_metric)] for r in candidates]
    if dense is not None:
        points.append([dense.accuracy, dense.cost(cost_metric)])
    mask = non_dominated(np.array(points), maximize=[True, False])[: len(candidates)]
    return sorted((r for r, keep in zip(candidates, mask) if keep), key=lambda r: r.result.cost(cost_metric))


WORK_STAGES = ("prune", "profile", "heal", "evaluate", "count")  # the rest of a trial's time is overhead


def time_accounting(records: list[TrialRecord], *, setup_seconds: float, tune_seconds: float,
                    concurrency: int) -> dict[str, float]:
    """Where a search's time went: the trials' work stages against the trial slots Tune held.

    `overhead_share` = 1 − work ÷ (Tune wall time × concurrent slots): what Ray scheduling, worker start-up, model
    loading and saving, checkpoint transfer, MLflow writes and idle slots cost, as a share of the slot time.
    """
    timings = [r.result.timings for r in records if r.result is not None]
    work = sum(t.get(stage, 0.0) for t in timings for stage in WORK_STAGES)
    load_save = sum(t.get("load", 0.0) + t.get("save", 0.0) for t in timings)
    slot_seconds = tune_seconds * concurrency
    done = [r.result for r in records if r.result is not None]
    return {
        "latency_measured": sum(1 for result in done if not result.latency_cached),
        "latency_reused": sum(1 for result in done if result.latency_cached),
        "setup_s": setup_seconds,  # data, dense weights, Ray start, dense baseline
        "tune_wall_s": tune_seconds,
        "trial_work_s": work,
        "trial_load_save_s": load_save,
        "overhead_share": 1.0 - work / slot_seconds if slot_seconds else 0.0,
    }


def summary_text(outcome: SearchOutcome) -> str:
    front_rows = [_row(record, on_front=True) for record in outcome.front]
    lines = [
        "",
        f"Search {outcome.spec.name!r} finished in {outcome.wall_seconds:.0f} s: {len(outcome.records)} trials,"
        f" {len(outcome.failed)} failed" + (f" ({outcome.retried} restarts)" if outcome.retried else "")
        + f", {len(outcome.front)} on the Pareto front.",
        f"Dense model: top-1 {outcome.dense.accuracy:.4f}, {outcome.dense.latency.median_ms:.3f} ms"
        f" ({outcome.dense.latency.device}, batch {outcome.dense.latency.batch_size}, {outcome.dense.latency.dtype}).",
        "",
        table(front_rows) if front_rows else "(no trial beat the dense model on latency or accuracy: the front is empty)",
        "",
        f"Registered as {outcome.spec.mlflow.registered_model!r} versions {', '.join(outcome.registered_versions) or '—'}"
        f" (aliases: most-accurate, fastest).",
        f"MLflow UI: {outcome.ui_command}",
    ]
    if outcome.accounting:
        a = outcome.accounting
        lines.insert(3, f"Time: setup {a['setup_s']:.0f} s; trials {a['tune_wall_s']:.0f} s, of which pruning, profiling,"
                        f" healing, evaluating and counting filled {1 - a['overhead_share']:.0%} of the trial slots"
                        f" (model load/save {a['trial_load_save_s']:.1f} s; the rest is Ray, MLflow and idle slots)."
                        f" Latency: {a['latency_measured']:.0f} structures timed, {a['latency_reused']:.0f} trials"
                        f" reused an identical structure's measurement.")
    return "\n".join(lines)


def _row(record: TrialRecord, *, on_front: bool) -> dict[str, Any]:
    result = record.result
    if result is None:
        return {"trial": record.trial_id, "prune": "failed", "heal": "", "error": record.error, "pareto": False}
    return {
        "trial": record.trial_id,
        "prune": result.config.prune.method,
        "heal": result.config.heal.method,
        "sparsity": result.sparsity,
        "accuracy": result.accuracy,
        "latency_ms": result.latency.median_ms,
        "latency_p90_ms": result.latency.p90_ms,
        "macs": result.macs,
        "params": result.params,
        "pareto": on_front,
        **{key: value for key, value in result.config.flat().items() if key not in ("prune.method", "heal.method")},
    }


def _check_target_hardware(accelerator_type: str, cluster: Mapping[str, float]) -> None:
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


def _check_healing_resources(spec: SearchSpec, cluster: Mapping[str, float]) -> None:
    """A trial that heals with DeepSpeed holds its own resources while its workers take theirs: if the cluster can
    never hold both, the workers would wait forever. (An autoscaling cluster counts only the nodes it has now.)"""
    healing = spec.healing
    for resource, trial, per_worker in (("CPU", spec.search.cpu, healing.cpu), ("GPU", spec.search.gpu, healing.gpu)):
        needed = trial + healing.workers * per_worker
        if needed > cluster.get(resource, 0):
            raise AutopruneError(
                f"healing: a trial needs {needed:g} {resource} at once (search.resources {trial:g} + healing.workers"
                f" {healing.workers} × {per_worker:g}) but this Ray cluster has {cluster.get(resource, 0):g}. Lower"
                f" healing.workers / healing.{resource.lower()}, or add nodes."
            )


# ---- on the workers ----------------------------------------------------------------------------------------


def _dense_baseline(context: TrialContext) -> TrialResult:
    dense = TrialConfig(PruneConfig("none"), HealConfig("none"))
    return run_trial(dense, replace(context, latency_target_ms=None), threads=_assigned_cpus())


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _tune_trial(params: dict, *, context: TrialContext, space: SearchSpace) -> None:
    from ray import tune

    config = space.to_config(params)
    with tempfile.TemporaryDirectory() as folder:
        import ray

        result = run_trial(config, context, save_dir=folder, threads=_assigned_cpus())
        result = replace(result, node=ray.get_runtime_context().get_node_id())
        tune.report(result.metrics(), checkpoint=tune.Checkpoint.from_directory(folder))


# ---- on the driver -----------------------------------------------------------------------------------------


def _run_tune(spec: SearchSpec, space: SearchSpace, context: TrialContext, publisher, *, storage: str, run_name: str):
    import optuna
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # autoprune prints its own progress; Tune's tables are noise
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = latency_constrained_searcher(space, spec)
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, context=context, space=space),
        {"cpu": spec.search.cpu, "gpu": spec.search.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=spec.search.trials,
            max_concurrent_trials=spec.search.concurrency,
            # Trials share one resource shape, so a worker serves trial after trial: without reuse, every trial
            # pays a new process and the torch/timm imports (≈2 s, more than a small trial's work).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage,
            callbacks=[publisher],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_retries),
        ),
    )
    return tuner.fit()


class _TrialPublisher(Callback):
    """Tune callback: writes each trial's child run as it ends, and prints a progress line."""

    def __init__(
        self, tracker: Tracker, parent_id: str, spec: SearchSpec, say: Callable[[str], None], dense: TrialResult,
        *, downloads: Path,
    ) -> None:
        self.tracker, self.parent_id, self.spec, self.say, self.dense = tracker, parent_id, spec, say, dense
        self.downloads = downloads  # where checkpoints in remote storage are copied for registration
        self.records: list[TrialRecord] = []
        self.run_ids: dict[str, str] = {}
        self.retried = 0
        self._started = time.perf_counter()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the MLflow client and the printer stay behind.
        return {key: value for key, value in self.__dict__.items() if key not in ("tracker", "say")}

    def on_trial_complete(self, iteration, trials, trial, **info):
        metrics = trial.last_result or {}
        if "config_json" not in metrics:
            self._add(TrialRecord(trial.trial_id, None, error="the trial ended without reporting a result"), trials)
            return
        checkpoint = trial.checkpoint
        model_dir = _local_copy(checkpoint, self.downloads / trial.trial_id) if checkpoint else None
        self._add(TrialRecord(trial.trial_id, TrialResult.from_metrics(metrics), model_dir=model_dir), trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial failed and Tune starts it again (search.max_retries): nothing is recorded until it ends."""
        self.retried += 1
        self.say(f"autoprune: trial {trial.trial_id} failed ({_error_text(trial).splitlines()[-1][:160]});"
                 f" starting it again")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add(TrialRecord(trial.trial_id, None, error=_error_text(trial)), trials)

    def _add(self, record: TrialRecord, trials) -> None:
        self.records.append(record)
        self.run_ids[record.trial_id] = self.tracker.log_trial(self.parent_id, record)
        self.say(self._progress_line(record, trials))

    def _progress_line(self, record: TrialRecord, trials) -> str:
        total = self.spec.search.trials
        done = len(self.records)
        failed = sum(1 for r in self.records if r.result is None)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id != record.trial_id)
        elapsed = time.perf_counter() - self._started
        head = f"[{done:>3}/{total} done, {running} running, {failed} failed, {elapsed:5.0f} s]"
        if record.result is None:
            return f"{head} trial {record.trial_id} FAILED: {(record.error or '').splitlines()[-1][:160]}"
        result = record.result
        this = (f"{result.config.prune.method}/{result.config.heal.method} sparsity {result.sparsity:.2f}: "
                + (f"top-1 {result.accuracy:.4f}" if result.feasible else "missed the latency target")
                + f" @ {result.latency.median_ms:.3f} ms" + (" (same structure timed before)" if result.latency_cached else ""))
        front = pareto_front(self.records, self.spec.cost_metric, dense=self.dense)
        if front:
            best = max(front, key=lambda r: r.result.accuracy)
            fastest = front[0]
            this += (f" | front {len(front)}: best {best.result.accuracy:.4f} @ {best.result.latency.median_ms:.3f} ms,"
                     f" fastest {fastest.result.latency.median_ms:.3f} ms @ {fastest.result.accuracy:.4f}")
        return f"{head} {this}"


def _local_copy(checkpoint, destination: Path) -> str:
    """A local directory holding the checkpoint: its own path on a local or shared filesystem, else a download
    (s3://, gs://: the driver registers the models from the run's storage)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(str(destination))


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path) as handle:
            return handle.read().strip()
    return "the trial failed (no error file)"

