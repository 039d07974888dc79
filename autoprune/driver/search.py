"""The driver: spec → Ray Tune trials sampled by Optuna → front → MLflow runs, plots and registry.

The driver validates everything and prepares what trials share (data, dense weights) before Ray starts; the
trials run `run_trial` on their own workers and report to Ray Tune, whose storage is the search's record; the
driver alone writes to MLflow, trial by trial as they finish (so the UI fills while the search runs), then, from
Tune's storage, the front, the plots and the registered models (`publish.py`). A driver that stopped is continued
with `resume` (Tune restores the trials and Optuna's history); MLflow failing mid-search costs nothing but a later
`autoprune publish`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune import Callback

from autoprune import data as datasets
from autoprune.config import Choice, Fixed, HealConfig, PruneConfig, SearchSpec, TrialConfig
from autoprune.driver.prepare import dense_weights, model_source
from autoprune.errors import AutopruneError
from autoprune.measure.cache import SharedLatencyCache
from autoprune.measure.latency import assigned_device
from autoprune.models import layer_groups
from autoprune.pareto import pareto_front
from autoprune.result import TrialRecord, TrialResult
from autoprune.space.define import SearchSpace
from autoprune.space.load import load_spec
from autoprune.tracking import schema
from autoprune.tracking.publish import error_text, experiment_path, publish_search, records_from_storage, trial_record
from autoprune.tracking.schema import TRIAL_ERROR, trial_row
from autoprune.tracking.report import table
from autoprune.tracking.store import DEFAULT_WORKDIR, Tracker, is_tracking_server, resolve_tracking_uri
from autoprune.trial import TrialContext, run_trial

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
    retried: int = 0  # trial restarts after a worker died (search.max_retries); a trial's own error is final


def ui_command(tracking_uri: str) -> str:
    if is_tracking_server(tracking_uri):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def load_data(spec: SearchSpec, *, cache_dir: str | Path | None = None, echo=None) -> datasets.DataBundle:
    """The search's data; with `cache_dir`, ImageFolder images decoded once are read from there next time."""
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
        cache_dir=cache_dir,
        echo=echo,
    )


def _largest_calibration_budget(spec: SearchSpec) -> int:
    """How many training images the search may ask for at most: only those are read from an ImageFolder."""
    dimension = spec.heal.calibration_images
    if isinstance(dimension, Fixed):
        return int(dimension.value)
    return int(max(dimension.values) if isinstance(dimension, Choice) else dimension.high)


RESULT_FILE = "result.json"  # in a trial's checkpoint, beside the model: what it reported
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
    # A trial with no measured latency (it failed before reporting one) has not shown that it meets the target.
    return tuple(trial.user_attrs.get(CONSTRAINT_ATTR, (1.0,)))


def latency_constrained_searcher(space: SearchSpace, spec: SearchSpec):
    """Ray Tune's OptunaSearch, told each finished trial's latency excess over the spec's target (if any), so
    that Optuna's constrained samplers concentrate where the target is met."""
    from ray.tune.search.optuna import OptunaSearch

    target = spec.latency_target_ms

    class ConstrainedOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # `_ot_trials` (Tune trial id → Optuna trial) is OptunaSearch's own map; a test pins that it exists.
            if result and TRIAL_ERROR in result:  # a trial that failed and said so: Optuna records it as FAIL
                result, error = None, True
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
    resume: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> SearchOutcome:
    """Run a search end to end. Everything is validated before Ray starts; `echo` shows progress (None: quiet).
    `storage` overrides the spec's `search.storage` (where trials write their checkpoints). `resume` continues a
    search whose driver stopped: a parent run id, or "latest" (the newest unfinished search of this spec's name)."""
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
    storage = spec.search.storage or str(workdir / "ray")
    resumed = _resumable(tracker, spec, resume, storage) if resume else None

    source = model_source(spec.model)
    space = SearchSpace(spec, layer_groups(source.create()))  # the spec's groups exist in the model (no weights needed)

    import ray

    if not ray.is_initialized():
        # Worker output stays in Ray's logs: trial errors reach the user through the progress lines and MLflow.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if spec.profile.target is not None:
        _check_target_hardware(spec.profile.target.accelerator_type, ray.cluster_resources())
    if spec.healing.engine != "local":
        _check_healing_resources(spec, ray.cluster_resources(), say)

    say(f"autoprune: {spec.name}: loading data and the dense model {spec.model.name}")
    cache = workdir / "cache"
    bundle = load_data(spec, cache_dir=cache, echo=lambda line: say(f"autoprune: data.{line}"))
    state = dense_weights(spec.model, spec.data, bundle, cache_dir=cache, seed=spec.search.seed)
    latency_cache = SharedLatencyCache.start()
    # Into the object store once: the dense baseline and every trial read it from there (its images zero-copy).
    context_ref = ray.put(TrialContext(source, state, bundle, spec.profile, spec.latency_target_ms,
                                   latency_cache=latency_cache, healing_engine=spec.healing))
    del bundle, state  # the driver's own copy: the object store holds the one the trials read
    if resumed:
        parent_id = resumed
        dense = tracker.dense_result(parent_id)  # the numbers the trials were held to
        say(f"autoprune: resuming search run {parent_id}; dense top-1 {dense.accuracy:.4f},"
            f" {dense.latency.median_ms:.3f} ms on {dense.latency.device} (as measured when it started)")
    else:
        resources = {"cpu": spec.search.cpu, "gpu": spec.search.gpu}
        say(f"autoprune: measuring the dense model on a trial worker ({resources})")
        dense = ray.get(
            ray.remote(num_cpus=spec.search.cpu, num_gpus=spec.search.gpu)(_dense_baseline).remote(context_ref)
        )
        say(f"autoprune: dense top-1 {dense.accuracy:.4f}, {dense.latency.median_ms:.3f} ms on {dense.latency.device}")
        parent_id = tracker.start_search(name=spec.name, spec=spec.as_dict(),
                                         run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        tracker.log_dense(parent_id, dense)
        say(f"autoprune: search run {parent_id} (if this driver stops: autoprune search SPEC --resume {parent_id})")
    setup_seconds = time.perf_counter() - started

    path = experiment_path(storage, parent_id)
    downloads = workdir / "checkpoints" / parent_id
    earlier = records_from_storage(path, downloads)[0] if resumed else []
    for result in [dense, *(record.result for record in earlier if record.result is not None)]:
        for key, profile in result.latency_entries().items():  # what was measured before is not measured again
            latency_cache.put(key, profile)
    publisher = _TrialPublisher(tracker, parent_id, spec, say, dense, downloads=downloads, earlier=earlier)
    tune_started = time.perf_counter()
    _run_tune(spec, space, context_ref, publisher, storage=storage, run_name=parent_id, resume=bool(resumed))
    tune_seconds = time.perf_counter() - tune_started

    # Tune's storage, not what the callback saw, is the record: it also holds the trials of a resumed search's
    # earlier driver.
    records, _ = records_from_storage(path, downloads)
    before = {record.trial_id for record in earlier}  # a resumed search accounts for the time of this driver
    accounting = time_accounting([r for r in records if r.trial_id not in before], setup_seconds=setup_seconds,
                                 tune_seconds=tune_seconds,
                                 concurrency=min(spec.search.concurrency, spec.search.trials))
    try:
        published = publish_search(tracker, parent_id, name=spec.name, cost_metric=spec.cost_metric,
                                   registered_model=spec.mlflow.registered_model, dense=dense, records=records,
                                   metrics={"trials_retried": publisher.retried, **accounting})
    except Exception as error:
        raise AutopruneError(
            f"the search finished but MLflow at {tracking_uri!r} failed while publishing it ({type(error).__name__}:"
            f" {str(error)[:200]}). Nothing is lost: the results are in {path}. When MLflow is back, run"
            f" `autoprune publish {parent_id}` with the same --workdir/--storage/--tracking-uri."
        ) from None
    outcome = SearchOutcome(
        spec=spec,
        tracking_uri=tracking_uri,
        parent_run_id=parent_id,
        dense=dense,
        records=records,
        front=published.front,
        registered_versions=published.versions,
        wall_seconds=time.perf_counter() - started,
        ui_command=ui_command(tracking_uri),
        failed=[r for r in records if r.result is None],
        accounting=accounting,
        retried=publisher.retried,
    )
    say(summary_text(outcome))
    return outcome


def _resumable(tracker: Tracker, spec: SearchSpec, resume: str, storage: str) -> str:
    """The parent run id of the search to resume, once it is known that it can be: same spec, Tune state there."""
    from ray import tune

    if resume == "latest":
        run = tracker.unfinished_search(spec.name)
        if run is None:
            raise AutopruneError(f"no unfinished search named {spec.name!r} in experiment {spec.mlflow.experiment!r}"
                                 " to resume; run it without --resume, or pass the run id to resume")
        resume = run.info.run_id
    else:
        Tracker.for_search_run(tracker.tracking_uri, resume)  # exists, and is a search
    logged = tracker.search_spec(resume)
    changed = sorted(_differences(logged, spec.as_dict()))
    if changed:
        raise AutopruneError(f"search run {resume} ran with a different spec (changed: {', '.join(changed)}); resume"
                             " it with the spec it started with, or start a new search")
    path = experiment_path(storage, resume)
    if not tune.Tuner.can_restore(path):
        raise AutopruneError(f"search run {resume} left no Ray Tune state at {path!r}; resume with the --workdir"
                             " or --storage it ran with")
    return resume


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new))
                for key in _differences(old.get(name), new.get(name), f"{prefix}{name}.")]
    return [] if old == new else [prefix.rstrip(".")]


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
    front_rows = [trial_row(record, on_front=True) for record in outcome.front]
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


def _check_healing_resources(spec: SearchSpec, cluster: Mapping[str, float], say: Callable[[str], None]) -> None:
    """A trial that heals with DeepSpeed reserves its own resources and its workers' together (one placement
    group), so Tune starts it only when all of them are free. A reservation larger than the cluster would never
    start: say so before any trial. (An autoscaling cluster counts only the nodes it has now.)"""
    from autoprune.train.deepspeed import trial_bundles

    bundles = trial_bundles({"CPU": spec.search.cpu, "GPU": spec.search.gpu}, spec.healing)
    healing = spec.healing
    fits = []
    for resource, trial, per_worker in (("CPU", spec.search.cpu, healing.cpu), ("GPU", spec.search.gpu, healing.gpu)):
        needed = sum(bundle.get(resource, 0) for bundle in bundles)
        if needed > cluster.get(resource, 0):
            raise AutopruneError(
                f"healing: a trial needs {needed:g} {resource} at once (search.resources {trial:g} + healing.workers"
                f" {healing.workers} × {per_worker:g}) but this Ray cluster has {cluster.get(resource, 0):g}. Lower"
                f" healing.workers / healing.{resource.lower()}, or add nodes."
            )
        if needed:
            fits.append(int(cluster.get(resource, 0) // needed))
    at_once = min(fits + [spec.search.concurrency])
    if at_once < spec.search.concurrency:
        say(f"autoprune: each trial reserves {bundles[0]} for itself and {healing.workers} × {bundles[-1]} for its"
            f" DeepSpeed workers: at most {at_once} of search.concurrency {spec.search.concurrency} run at once here")


# ---- on the workers ----------------------------------------------------------------------------------------


def _dense_baseline(context: TrialContext) -> TrialResult:
    dense = TrialConfig(PruneConfig("none"), HealConfig("none"))
    return run_trial(dense, replace(context, latency_target_ms=None), device=assigned_device(),
                     threads=_assigned_cpus())


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@dataclass(frozen=True)
class _Shared:
    """The trial context's object-store reference, as a Tune parameter: every trial reads the one copy the driver
    put there (a context given to Tune itself would be put a second time)."""

    ref: Any

    def get(self) -> TrialContext:
        import ray

        return ray.get(self.ref)


def _tune_trial(params: dict, *, shared: _Shared, space: SearchSpace) -> None:
    from ray import tune

    config = space.to_config(params)
    memory = _worker_memory()
    restored = tune.get_checkpoint()
    if restored is not None:
        # This trial reported before its driver (or worker) stopped, and Tune restarts it from what it reported:
        # its result is read back from the checkpoint, not measured again.
        with restored.as_directory() as folder:
            tune.report(json.loads((Path(folder) / RESULT_FILE).read_text()))
        return
    with tempfile.TemporaryDirectory() as folder:
        import ray

        try:
            result = run_trial(config, shared.get(), save_dir=folder, device=assigned_device(),
                               threads=_assigned_cpus())
        except Exception:
            # The trial's own failure (out of memory, a NaN loss, a combination the space allowed but the model
            # cannot take) would fail again if run again: it is reported as the trial's result, so that Tune's
            # restarts (search.max_retries) are kept for workers that died. Not BaseException: an interrupt or
            # a worker shutting down still ends the trial the usual way.
            tune.report({**schema.failure_report(config, traceback.format_exc(limit=-8)), **memory})
            return
        result = replace(result, node=ray.get_runtime_context().get_node_id())
        reported = schema.report(result)
        (Path(folder) / RESULT_FILE).write_text(json.dumps(reported))
        tune.report({**reported, **memory}, checkpoint=tune.Checkpoint.from_directory(folder))


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them after a trial's many small tensors are
    freed, which reads as growth of a reused worker, trial after trial)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _worker_memory() -> dict[str, float]:
    """What this worker process holds as a trial starts, after collecting garbage and returning cached CUDA blocks:
    what the trials before it in the same process left behind (Tune reuses workers, so a leak would show as
    growth trial after trial; `autoprune bench faults` prints it)."""
    import gc

    import psutil
    import torch

    gc.collect()
    _trim_heap()
    process = psutil.Process()
    # USS: the pages only this process holds; RSS also counts the shared object-store pages a trial reads.
    memory = {"worker_pid": os.getpid(), "worker_rss_mb": process.memory_info().rss / 2**20}
    try:
        memory["worker_uss_mb"] = process.memory_full_info().uss / 2**20
    except (psutil.AccessDenied, AttributeError):  # some platforms do not let a process read its own page map
        pass
    if assigned_device().type == "cuda":  # not merely visible: touching a GPU Ray did not assign makes a context there
        torch.cuda.empty_cache()  # the caching allocator's free blocks go back to the device for other processes
        memory["worker_cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        memory["worker_cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    return memory


# ---- on the driver -----------------------------------------------------------------------------------------


def _run_tune(spec: SearchSpec, space: SearchSpace, context_ref, publisher, *, storage: str, run_name: str,
              resume: bool = False):
    import optuna
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # autoprune prints its own progress; Tune's tables are noise
    # A snapshot of the search's state at every trial's report is what `checkpoint_config` below asks for.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A trial that failed by itself reports its error, not the objectives (the searcher tells Optuna FAIL).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, shared=_Shared(context_ref), space=space),
                                    trial_resources(spec))
    if resume:
        # Tune restores the trials (ended ones kept, unfinished ones run again from the start) and the Optuna
        # searcher with its history; trials whose worker died more than max_retries times stay failed.
        tuner = tune.Tuner.restore(experiment_path(storage, run_name), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # The restored run config carries the callbacks pickled when the search started, without their MLflow
        # client; this driver's publisher takes their place. (`_local_tuner` is Tune's own: a test resumes.)
        tuner._local_tuner.get_run_config().callbacks = [publisher]
        return tuner.fit()
    searcher = latency_constrained_searcher(space, spec)
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
            # A trial reports once, with its checkpoint: keeping one checkpoint makes Tune save the search's state
            # (trials, Optuna's history) to storage at every report, so a driver killed at any point loses no
            # result (`--resume`). Without it the state is saved every ≥10 s, and results in between are lost.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit()


def trial_resources(spec: SearchSpec):
    """What Tune reserves for a trial: its own resources, and with DeepSpeed healing its workers' as well, in one
    placement group (distributed.py places the workers in it)."""
    from ray import tune

    from autoprune.train.deepspeed import trial_bundles

    own = {"CPU": spec.search.cpu, "GPU": spec.search.gpu}
    if spec.healing.engine != "deepspeed":
        return {key.lower(): value for key, value in own.items()}
    return tune.PlacementGroupFactory(trial_bundles(own, spec.healing), strategy="PACK")


class _TrialPublisher(Callback):
    """Tune callback: writes each trial's child run as it ends, and prints a progress line."""

    def __init__(
        self, tracker: Tracker, parent_id: str, spec: SearchSpec, say: Callable[[str], None], dense: TrialResult,
        *, downloads: Path, earlier: list[TrialRecord] = (),
    ) -> None:
        self.tracker, self.parent_id, self.spec, self.say, self.dense = tracker, parent_id, spec, say, dense
        self.downloads = downloads  # where checkpoints in remote storage are copied for registration
        self.records: list[TrialRecord] = list(earlier)  # a resumed search's trials that ended before
        self.retried = 0
        self.mlflow_error: str | None = None  # set when MLflow failed: the rest is published at the end
        self._started = time.perf_counter()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment state; the MLflow client and the printer stay behind.
        return {key: value for key, value in self.__dict__.items() if key not in ("tracker", "say")}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._add(trial_record(trial, self.downloads, status="TERMINATED"), trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker died and Tune starts it again (search.max_retries): nothing is recorded until it ends."""
        self.retried += 1
        self.say(f"autoprune: trial {trial.trial_id} failed ({error_text(trial).splitlines()[-1][:160]});"
                 f" starting it again")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add(trial_record(trial, self.downloads, status="ERROR"), trials)

    def _add(self, record: TrialRecord, trials) -> None:
        self.records.append(record)
        failed_now = False
        if self.mlflow_error is None:
            try:
                self.tracker.log_trial(self.parent_id, record)
            except Exception as error:  # the search goes on: its results are in Tune's storage
                self.mlflow_error, failed_now = f"{type(error).__name__}: {str(error)[:200]}", True
        self.say(self._progress_line(record, trials))
        if failed_now:
            self.say(f"autoprune: MLflow failed ({self.mlflow_error}); the search goes on and keeps its results"
                     " in Ray Tune's storage, to publish when it ends")

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
