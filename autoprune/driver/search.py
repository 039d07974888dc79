"""`search()`: spec → Ray Tune trials sampled by Optuna → front → MLflow runs, plots and registry, as its steps.

The driver validates everything and prepares what trials share (data, dense weights) before Ray starts; the
trials run `run_trial` on their own workers (worker.py) and report to Ray Tune, whose storage is the search's
record; the driver alone writes to MLflow, trial by trial as they finish (progress.py), then, from Tune's storage,
the front, the plots and the registered models (tracking/publish.py). A driver that stopped is continued with
`resume` (Tune restores the trials and Optuna's history); MLflow failing mid-search costs nothing but a later
`autoprune publish`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from autoprune import prune
from autoprune.config import SearchSpec
from autoprune.driver.connect import check_address, start_ray
from autoprune.driver.outcome import SearchOutcome, summary_text, time_accounting
from autoprune.driver.preflight import check_cluster, check_data, check_methods, warn_if_busy
from autoprune.driver.prepare import model_source, shared_context
from autoprune.driver.progress import TrialPublisher
from autoprune.driver.resume import resumable_parent
from autoprune.driver.retime import retime_final
from autoprune.driver.tune import gpu_type_resource, run_tune
from autoprune.driver.warm import earlier_search, fit_point, warm_start
from autoprune.driver.worker import dense_baseline
from autoprune.errors import AutopruneError
from autoprune.halving import SharedRungJudge, rungs_of
from autoprune.measure.timing import LatencyProfile
from autoprune.models import layer_groups
from autoprune.result import TrialRecord, TrialResult
from autoprune.space.define import SearchSpace, full_budget
from autoprune.space.load import load_spec, validate
from autoprune.tracking.final import apply_final, save_final
from autoprune.tracking.publish import Published, experiment_path, publish_search, records_from_storage
from autoprune.tracking.store import (
    DEFAULT_WORKDIR,
    Tracker,
    check_answers,
    is_tracking_server,
    resolve_tracking_uri,
)
from autoprune.tracking.ui import ui_hint


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
    drop_unusable_methods: bool = False,
    first_points: Sequence[Mapping[str, Any]] = (),
    warm_start_from: str | None = None,
) -> SearchOutcome:
    """Run a search end to end. Everything is validated before Ray starts; `echo` shows progress (None: quiet).
    `storage` overrides the spec's `search.storage` (where trials write their checkpoints). `resume` continues a
    search whose driver stopped: a parent run id, or "latest" (the newest unfinished search of this spec's name).
    A pruning method that cannot prune the spec's model is an error, or with `drop_unusable_methods` left out.
    `first_points` are Optuna parameters (`prune.method`, `prune.sparsity.knot0`, …) the first trials take, in order
    (a grid, configurations known to be good); what a point leaves out is sampled. `warm_start_from` (an earlier
    search's parent run id, in the same MLflow and storage) seeds the sampler with its trials (driver/warm.py)."""
    started = time.perf_counter()
    say = echo or (lambda line: None)
    spec = load_spec(spec) if not isinstance(spec, SearchSpec) else spec
    spec = validate(_with_overrides(spec, trials, storage))  # a spec built in Python, and the overrides, too
    if resume and warm_start_from:
        raise AutopruneError("--resume continues a search with its own history; --warm-start begins a new one from"
                             " another's: give one of them")
    # the cheap checks first, each a line in seconds: the servers it needs answer, the data and weights fit the model
    check_answers(resolve_tracking_uri(tracking_uri, spec.mlflow.tracking_uri, workdir))
    check_address(address)
    source = model_source(spec.model)
    check_data(spec, source)  # files, classes, image size: before the pre-flight prunes anything
    # methods that could never be faster here, then those that cannot prune this model: both before any training
    spec = _methods_that_can_be_faster(spec, say)
    spec = check_methods(spec, source, say, drop_unusable=drop_unusable_methods)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracker = _tracker(spec, tracking_uri, workdir)
    storage = spec.search.storage or str(workdir / "ray")
    resumed = resumable_parent(tracker, spec, resume, storage) if resume else None
    earlier_run = (earlier_search(warm_start_from, tracker=tracker, storage=storage,
                                  downloads=workdir / "checkpoints" / warm_start_from) if warm_start_from else None)
    space = SearchSpace(spec, layer_groups(source.create()))  # the spec's groups exist in the model (no weights needed)

    ray = start_ray(address)
    spec = check_cluster(spec, ray.cluster_resources(), say)
    context_ref, latency_cache, judge = shared_context(spec, source, workdir, say)
    try:
        dense, parent_id = _dense_and_parent_run(spec, tracker, context_ref, resumed, say)
        setup_seconds = time.perf_counter() - started

        path, downloads = experiment_path(storage, parent_id), workdir / "checkpoints" / parent_id
        earlier = records_from_storage(path, downloads)[0] if resumed else []
        _remember_latencies(latency_cache, [dense, *(record.result for record in earlier)])
        _remember_rungs(judge, [record.result for record in earlier], spec, say)
        space = SearchSpace(spec, space.groups)
        warm = warm_start(earlier_run, spec=spec, space=space, dense=dense, say=say) if earlier_run else None
        first_points = _fitting(first_points, space, say)
        publisher = TrialPublisher(tracker, parent_id, spec, say, dense, downloads=downloads, earlier=earlier)
        tune_started = time.perf_counter()
        run_tune(spec, space, context_ref, publisher, storage=storage, run_name=parent_id, resume=bool(resumed),
                 references=dense_references(dense), stop_unless_faster=_stops_unless_faster(spec),
                 first_points=[*(warm.points if warm else ()), *first_points], earlier=warm.completed if warm else ())
        tune_seconds = time.perf_counter() - tune_started
        # Tune's storage, not what the callback saw, is the record: it also holds a resumed search's earlier trials.
        records, _ = records_from_storage(path, downloads)
        final = retime_final(spec, context_ref, records, dense, say=say)  # the latencies that are registered
    finally:  # the search's small actors end with it (one Python session may run many searches)
        _stop(latency_cache, judge)
    if final is not None:
        save_final(final, path)
        records, dense = apply_final(final, records, dense)
    before = {record.trial_id for record in earlier}  # a resumed search accounts for this driver's time only
    accounting = time_accounting([r for r in records if r.trial_id not in before], setup_seconds=setup_seconds,
                                 tune_seconds=tune_seconds, concurrency=min(spec.search.concurrency, spec.search.trials))
    published = _publish(tracker, spec, parent_id, dense, records, path=path,
                         timed_again=None if final is None else set(final.trials),
                         metrics={"trials_retried": publisher.retried, **accounting})
    outcome = SearchOutcome(
        spec=spec, tracking_uri=tracker.tracking_uri, parent_run_id=parent_id, dense=dense, records=records,
        front=published.front, registered_versions=published.versions, wall_seconds=time.perf_counter() - started,
        ui_hint=ui_hint(tracker.tracking_uri, published.view_path), failed=[r for r in records if r.result is None],
        accounting=accounting, retried=publisher.retried,
    )
    say(summary_text(outcome))
    return outcome


def _with_overrides(spec: SearchSpec, trials: int | None, storage: str | None) -> SearchSpec:
    if trials is not None:
        spec = replace(spec, search=replace(spec.search, trials=trials))
    if storage is not None:
        spec = replace(spec, search=replace(spec.search, storage=storage))
    return spec


def _tracker(spec: SearchSpec, tracking_uri: str | None, workdir: Path) -> Tracker:
    tracking_uri = resolve_tracking_uri(tracking_uri, spec.mlflow.tracking_uri, workdir)
    # A local store keeps its artifacts next to it; a tracking server decides where artifacts go (it serves them).
    local = None if is_tracking_server(tracking_uri) else (workdir / "mlartifacts").as_uri()
    return Tracker(tracking_uri, spec.mlflow.experiment, artifact_location=local)


def _stops_unless_faster(spec: SearchSpec) -> bool:
    """Whether a trial confidently not faster than the dense model stops unhealed (search.stop_unless_faster)."""
    return spec.search.stop_unless_faster and spec.cost_metric in ("latency_ms", "latency_p90_ms")


def dense_references(dense: TrialResult) -> dict[int, LatencyProfile]:
    """The dense model's profiles by batch size: what every trial is timed against, and the scale its speedup is
    put on."""
    return {dense.latency.batch_size: dense.latency, **dense.extra_latency}


def _methods_that_can_be_faster(spec: SearchSpec, say) -> SearchSpec:
    """With search.stop_unless_faster, the spec without the pruning methods that keep the dense shapes and, on the
    kind of device its trials are timed on (a GPU when they take one or target one), run dense kernels: none of
    their trials could be faster than the dense model, so each would be a trial spent to learn nothing. Decided
    before anything is trained; says which were left out, and why."""
    if not _stops_unless_faster(spec):
        return spec
    on_gpu = spec.search.gpu > 0 or spec.profile.target is not None
    device = "a GPU" if on_gpu else "a CPU"
    dense_kernels = [name for name in spec.prune.methods if name != "none" and not prune.get(name).structured
                     and not (prune.get(name).semi_structured and on_gpu)]
    if not dense_kernels:
        return spec
    kept = tuple(name for name in spec.prune.methods if name not in dense_kernels)
    if not [name for name in kept if name != "none"]:
        raise AutopruneError(
            f"space.prune.methods: on {device}, {', '.join(dense_kernels)} run with the dense shapes"
            " on dense kernels, so no trial could be faster than the dense model. Add a method that removes"
            " channels (structured, vbp; `autoprune check MODEL` says which can prune your model), time on a GPU"
            " with 2:4 kernels for nm, or set search.stop_unless_faster: false to heal them anyway.")
    say(f"autoprune: on {device}, {', '.join(dense_kernels)} run with the dense shapes on dense kernels: no trial"
        " of theirs could be faster than the dense model, so this search leaves them out"
        " (search.stop_unless_faster: false keeps and heals them)")
    return replace(spec, prune=replace(spec.prune, methods=kept))


def _remember_rungs(judge: SharedRungJudge | None, results: list[TrialResult | None], spec: SearchSpec,
                    say) -> None:
    """Successive halving: what a resumed search's trials showed at their rungs is what later ones are judged
    against. Says how trials are judged."""
    if judge is None:
        return
    budget = full_budget(spec)
    rungs = ", ".join(f"{steps} steps" if steps else "before training"
                      for _, steps in rungs_of(budget, judge.halving.rungs))
    say(f"autoprune: successive halving: a trial that trains is judged at {rungs} of its {budget}, and heals on while"
        f" it is among the best 1/{judge.halving.eta} at that rung by front (margin {judge.halving.margin:g} top-1)")
    for result in results:
        if result is not None and result.rungs:
            fractions = dict((steps, fraction) for fraction, steps in rungs_of(budget, judge.halving.rungs))
            for steps, top1 in result.rungs:
                if steps in fractions:  # a result of an earlier rung schedule is no competitor at this one's
                    judge.promote(fractions[steps], top1, result.latency.median_ms)


def _dense_and_parent_run(spec: SearchSpec, tracker: Tracker, context_ref: Any, resumed: str | None,
                          say: Callable[[str], None]) -> tuple[TrialResult, str]:
    """The dense model's result and the search's parent run: both as they were when a resumed search started (the
    numbers its trials were held to), else measured on a trial worker and logged on a new parent run."""
    if resumed:
        dense = tracker.dense_result(resumed)
        say(f"autoprune: resuming search run {resumed}; dense top-1 {dense.accuracy:.4f},"
            f" {dense.latency.median_ms:.3f} ms on {dense.latency.device} (as measured when it started)")
        return dense, resumed
    import ray

    resources = {"cpu": spec.search.cpu, "gpu": spec.search.gpu}
    say(f"autoprune: measuring the dense model on a trial worker ({resources})")
    worker = ray.remote(num_cpus=spec.search.cpu, num_gpus=spec.search.gpu,
                        resources=gpu_type_resource(spec))(dense_baseline)
    dense = ray.get(worker.remote(context_ref))
    say(f"autoprune: dense top-1 {dense.accuracy:.4f}, {dense.latency.median_ms:.3f} ms on {dense.latency.device}")
    warn_if_busy(dense.latency, say, "the trial worker's node")
    parent_id = tracker.start_search(name=spec.name, spec=spec.as_dict(),
                                     run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.log_dense(parent_id, dense)
    say(f"autoprune: search run {parent_id} (if this driver stops: autoprune search SPEC --resume {parent_id})")
    return dense, parent_id


def _fitting(points: Sequence[Mapping[str, Any]], space: SearchSpace, say) -> list[dict]:
    """The given first points that are configurations of this search's space (which may have left methods out)."""
    fitting = [dict(point) for point in points if fit_point(space, point, complete=False) is not None]
    if len(fitting) < len(points):
        say(f"autoprune: {len(points) - len(fitting)} of the {len(points)} first points are not configurations of"
            " this search's space (a method it leaves out, a value outside a range): they are left out")
    return fitting


def _stop(*helpers) -> None:
    import ray

    for helper in helpers:
        if helper is not None:
            ray.kill(helper.actor)


def _remember_latencies(latency_cache, results: list[TrialResult | None]) -> None:
    """What was measured before (the dense model, a resumed search's trials) is not measured again."""
    for result in results:
        if result is not None:
            for key, profile in result.latency_entries().items():
                latency_cache.put(key, profile)


def _publish(tracker: Tracker, spec: SearchSpec, parent_id: str, dense: TrialResult, records: list[TrialRecord],
             metrics: dict[str, float], *, path: str, timed_again=None) -> Published:
    try:
        return publish_search(tracker, parent_id, name=spec.name, cost_metric=spec.cost_metric,
                              registered_model=spec.mlflow.registered_model, dense=dense, records=records,
                              metrics=metrics, timed_again=timed_again)
    except Exception as error:
        raise AutopruneError(
            f"the search finished but MLflow at {tracker.tracking_uri!r} failed while publishing it"
            f" ({type(error).__name__}: {str(error)[:200]}). Nothing is lost: the results are in {path}. When MLflow"
            f" is back, run `autoprune publish {parent_id}` with the same --workdir/--storage/--tracking-uri."
        ) from None
