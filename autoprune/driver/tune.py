"""Ray Tune's wiring: the trainable with its resources, the searcher, storage, retries and resuming.

Two places reach into Tune's private state, each pinned by a test: a restored Tuner's run config
(`_local_tuner`) to put this driver's callback in place of the pickled one, and OptunaSearch's `_ot_trials`
(sampling.py)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from autoprune.config import SearchSpec
from autoprune.driver.sampling import latency_constrained_searcher
from autoprune.driver.warm import Completed
from autoprune.driver.worker import SharedContext, tune_trial
from autoprune.space.define import SearchSpace
from autoprune.tracking.publish import experiment_path
from autoprune.train.deepspeed import trial_bundles


def run_tune(spec: SearchSpec, space: SearchSpace, context_ref, publisher, *, storage: str, run_name: str,
             resume: bool = False, references=None, stop_unless_faster: bool = False, first_points: Sequence[Mapping] = (),
             earlier: Sequence[Completed] = ()):
    import optuna
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # autoprune prints its own progress; Tune's tables are noise
    # A snapshot of the search's state at every trial's report is what `checkpoint_config` below asks for.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A trial that failed by itself reports its error, not the objectives (the searcher tells Optuna FAIL).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shared = SharedContext(context_ref, references, stop_unless_faster)
    trainable = tune.with_resources(tune.with_parameters(tune_trial, shared=shared, space=space), trial_resources(spec))
    if resume:
        # Tune restores the trials (ended ones kept, unfinished ones run again from the start) and the Optuna
        # searcher with its history; trials whose worker died more than max_retries times stay failed.
        tuner = tune.Tuner.restore(experiment_path(storage, run_name), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # The restored run config carries the callbacks pickled when the search started, without their MLflow
        # client; this driver's publisher takes their place. (`_local_tuner` is Tune's own: a test resumes.)
        tuner._local_tuner.get_run_config().callbacks = [publisher]
        return tuner.fit()
    # a warm start's trials, measured as this search measures, take the coarse start's place: they already show
    # the sampler where in the range the front lies
    searcher = latency_constrained_searcher(space, spec, first_points=first_points, coarse_start=not earlier)
    searcher.tell_earlier(earlier)
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


def gpu_type_resource(spec: SearchSpec) -> dict[str, float]:
    """The custom resource that places a task on a node of the trials' GPU type (Ray gives every GPU node
    `accelerator_type:<type>`: 1; a trial asks for a sliver of it, so that any number share the node)."""
    if spec.search.gpu <= 0 or spec.search.accelerator_type is None:
        return {}
    return {f"accelerator_type:{spec.search.accelerator_type}": 0.001}


def trial_resources(spec: SearchSpec):
    """What Tune reserves for a trial: its own resources, and with DeepSpeed healing its workers' as well, in one
    placement group (train/deepspeed.py places the workers in it)."""
    from ray import tune

    own = {"CPU": spec.search.cpu, "GPU": spec.search.gpu, **gpu_type_resource(spec)}
    if spec.heal_runtime.engine != "deepspeed":
        return {key.lower() if key in ("CPU", "GPU") else key: value for key, value in own.items()}
    return tune.PlacementGroupFactory(trial_bundles(own, spec.heal_runtime), strategy="PACK")
