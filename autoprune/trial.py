"""One trial, start to end: dense model → prune → profile → heal → evaluate → count → save.

`run_trial` needs no Ray: the search calls it inside a Tune trial, tests and notebooks call it directly.
Latency depends only on the structure, so it is measured right after pruning: with a latency target, a trial
that misses it stops there and costs seconds instead of a healing run. A gradual method's structure is final only
after healing, so it is profiled then.

Everything runs on the trial's device: the model goes there before pruning, so that pruning statistics (VBP, CAST,
Taylor) are gathered where the trial's accelerator is, and calibration images are normalised there batch by batch.
The profile times a copy prepared for timing; the accuracy registered is that of a copy prepared the same way
(the float32 model's is kept beside it); the model saved is the one that healed, with the recipe it was timed in,
so that it loads and serves as it was measured and scored.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from autoprune import heal, prune
from autoprune.config import HealingEngine, ProfileSpec, PruneConfig, TrialConfig
from autoprune.data import DataBundle
from autoprune.halving import RungJudge, rung_decay, rungs_of
from autoprune.heal.recalibrate import reestimate_batchnorm
from autoprune.measure.cache import LatencyCache
from autoprune.measure.formats import ExecutionRecipe
from autoprune.measure.latency import Latencies, measure_latency
from autoprune.measure.metrics import (
    accuracy,
    achieved_sparsity,
    count_macs,
    count_params,
    eval_batch_size,
    prunable_weight_count,
    served_accuracy,
)
from autoprune.measure.prepared import PreparedModel
from autoprune.measure.timing import LatencyProfile
from autoprune.models import POOLED_GROUP, LayerGroup, ModelSource, layer_groups, pooled_group, prunable_layers
from autoprune.prune.spectral import spectral_allocation
from autoprune.prune.target import solve
from autoprune.result import TrialResult
from autoprune.saved import save_model
from autoprune.train import TrainingRun


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares (in Ray's object store, so workers need no files or hub access)."""

    source: ModelSource
    dense_state: Mapping[str, torch.Tensor]
    data: DataBundle
    profile: ProfileSpec = field(default_factory=ProfileSpec)
    latency_target_ms: float | None = None
    latency_cache: LatencyCache | None = None  # identical structures are timed once (see measure/cache.py)
    healing_engine: HealingEngine | None = None  # None: heal in the trial's process
    # The dense model's profiles on this search's workers, by batch size: every trial is timed against the dense
    # model and its speedup put on this scale (None: on the dense model's time in the trial's own pass).
    references: Mapping[int, LatencyProfile] | None = None
    # A trial confidently not faster than the dense model stops after profiling: it cannot join the front.
    stop_unless_faster: bool = False
    judge: RungJudge | None = None  # successive halving (halving.py); None: every trial heals its whole budget
    heal_budget: int | None = None  # the full healing budget the rungs are fractions of (None: the trial's steps)

    def dense_model(self) -> torch.nn.Module:
        model = self.source.create(pretrained=False)
        model.load_state_dict(self.dense_state)
        return model.eval()


def run_trial(
    config: TrialConfig,
    context: TrialContext,
    *,
    save_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> TrialResult:
    """Prune, profile, heal, evaluate and (if `save_dir`) save one configuration of the dense model.
    `device` defaults to a GPU when this process sees one; a Ray worker passes the one Ray assigned it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None:
        torch.set_num_threads(threads)
    data = context.data
    timings: dict[str, float] = {}
    stage = _stopwatch(timings)

    with stage("load"):
        torch.manual_seed(config.seed)
        dense = context.dense_model()  # the teacher: bound to the device only while healing uses it
        model = copy.deepcopy(dense).to(device)
        layers = [name for name, _ in prunable_layers(model)]
        _, dense_weights = prunable_weight_count(dense, layers)

    calibration = data.train.subset(config.heal.calibration_images, seed=config.seed)  # pruning and healing share it

    with stage("prune"):
        method = prune.get(config.prune.method)
        options = {**method.options, **config.prune.options}  # defaults for what the config leaves out

        def pruning(groups: tuple[LayerGroup, ...], sparsity: Mapping[str, float]) -> prune.PruneRequest:
            return prune.PruneRequest(
                groups=groups,
                sparsity=sparsity,
                options=options,
                example_inputs=data.normalize(data.train.take(slice(0, 2)).to(device)),
                calibration=data.batches(calibration, device) if method.needs_images(options) else None,
                seed=config.seed,
            )

        def cost(groups: tuple[LayerGroup, ...], sparsity: Mapping[str, float]) -> float:
            return _pruned_cost(model, method, pruning(groups, sparsity), data.input_size, layers)

        groups, sparsity = _allocate(model, config.prune, cost)
        masks = method.apply(model, pruning(groups, sparsity))

    healing = heal.get(config.heal.method)
    if method.gradual and not healing.trains:
        masks = masks.finish(model)  # no steps to spread the pruning over: straight to the final sparsity

    latency: Latencies | None = None
    fmt = method.execution_format(options)

    def profile() -> Latencies:  # paired with the dense model, interleaved (measure/timing.py)
        return measure_latency(model, fmt, context.profile, data.input_size, device=device, threads=threads,
                               cache=context.latency_cache, reference=dense, references=context.references)

    if not method.gradual:  # the structure is final already: measure now, and skip healing if it is too slow
        with stage("profile"):
            latency = profile()

    heal_notes: list[str] = []
    stopped = "" if latency is None else _stop_reason(latency.objective, context, config.prune.method)
    # Successive halving judges a trial whose heal can stop part-way and go on; a gradual method's structure is
    # final only once it has healed, so it is never judged on the way
    local = context.healing_engine is None or context.healing_engine.engine == "local"
    judge = context.judge if healing.continues and local and latency is not None else None

    def request(batch_size: int) -> heal.HealRequest:
        return heal.HealRequest(calibration=calibration, data=data, steps=config.heal.steps, lr=config.heal.lr,
                                batch_size=batch_size, masks=masks, teacher=dense,
                                options={**healing.options, **config.heal.options}, seed=config.seed, device=device,
                                engine=context.healing_engine)

    def evaluate(target: torch.nn.Module) -> float:
        with stage("evaluate"):
            return accuracy(target, data.eval, data, device=device)

    def heal_at(batch_size: int) -> tuple[list[tuple[int, float]], str, int]:
        """(rungs, why it stopped, optimiser steps spent): heal `model` to its full budget in one go, or through
        the rungs of successive halving, continuing from each rung."""
        if judge is None:
            with stage("heal"):
                healing.apply(model, request(batch_size))
            return [], "", config.heal.steps if healing.trains else 0
        run = heal.start(healing, model, request(batch_size))
        try:
            with stage("heal"):
                rungs, why = _heal_in_rungs(run, judge, context.heal_budget or config.heal.steps,
                                            latency.objective.median_ms, evaluate=evaluate,
                                            zero_shot=lambda: _zero_shot(model, data, calibration, batch_size, device,
                                                                         evaluate))
                if not why:
                    run.advance(config.heal.steps)
        finally:
            run.close()
        return rungs, why, run.spent

    top1 = top1_trained = None
    rungs: list[tuple[int, float]] = []
    steps_spent = 0
    if not stopped:
        batch_size = config.heal.batch_size
        before = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
        try:
            rungs, stopped, steps_spent = heal_at(batch_size)
            out_of_memory = False
        except torch.OutOfMemoryError:
            if batch_size < 2:
                raise
            out_of_memory = True
        if out_of_memory:  # outside `except`: its traceback held the failed step's activations and optimiser state
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model.load_state_dict(before)
            heal_notes.append(f"healing ran out of memory at batch {batch_size}: healed at batch {batch_size // 2}")
            rungs, stopped, steps_spent = heal_at(batch_size // 2)
        masks.finish(model)  # a gradual method ends at its final sparsity (fixed masks: re-applied)
    if not stopped:
        if latency is None:
            with stage("profile"):
                latency = profile()
        top1_trained = evaluate(model)
        with stage("evaluate"):
            top1 = _served_accuracy(model, latency.objective, data, device, top1_trained)

    with stage("count"):
        macs = count_macs(model, data.input_size)
        params = count_params(model)
        sparsity = achieved_sparsity(model, layers, dense_weights)

    if save_dir is not None:
        with stage("save"):
            save_model(model, context.source, save_dir, recipe=latency.objective.recipe,
                       example_shape=(latency.objective.batch_size, *data.input_size))

    return TrialResult(config, top1, latency.objective, macs, params, sparsity, timings, accuracy_fp32=top1_trained,
                       latency_cached=latency.cached, extra_latency=latency.extra, latency_keys=latency.keys,
                       stopped=stopped, rungs=tuple(rungs), heal_note="; ".join(dict.fromkeys(heal_notes)),
                       steps_spent=steps_spent)


def _served_accuracy(model: torch.nn.Module, latency: LatencyProfile, data: DataBundle, device: torch.device,
                     trained: float) -> float:
    """The accuracy registered: of the model as it is served, prepared in the recipe its latency was measured in
    (bf16, channels-last, 2:4 kernels, compiled: measure/prepared.py) on the trial's device. A float32 model run
    as trained needs no second pass (`trained`, the float32 model's accuracy)."""
    recipe = latency.recipe
    if device.type == "cpu" and recipe == ExecutionRecipe(device="cpu"):
        return trained
    prepared = PreparedModel.build(model, recipe, device, (eval_batch_size(data.eval), *data.input_size))
    return served_accuracy(prepared, data.eval, data)


def _heal_in_rungs(run: TrainingRun, judge: RungJudge, budget: int, latency_ms: float, *,
                   evaluate: Callable[[torch.nn.Module], float],
                   zero_shot: Callable[[], float]) -> tuple[list[tuple[int, float]], str]:
    """Successive halving (halving.py): the heal advances to each rung (a fraction of the full `budget`, the same
    steps for every trial), is evaluated on a branch decayed briefly from there (`TrainingRun.branch`), and goes
    on from the rung's weights and optimiser state while the judge promotes it. The rung at 0 steps is the pruned
    model before training (`zero_shot`). Returns the trial's accuracy at each rung and why it stopped ('' if
    promoted through every rung)."""
    rungs: list[tuple[int, float]] = []
    for fraction, rung_steps in rungs_of(budget, judge.halving.rungs, trial_steps=run.steps):
        if rung_steps == 0:
            top1 = zero_shot()
        else:
            run.advance(rung_steps)
            top1 = run.branch(rung_decay(rung_steps), evaluate)
        rungs.append((rung_steps, top1))
        if not judge.promote(fraction, top1, latency_ms):
            at = "before healing" if rung_steps == 0 else f"after {rung_steps} of {run.steps} healing steps"
            return rungs, (f"outdone {at} (top-1 {top1:.4f}): not among the best 1/{judge.halving.eta} of the trials"
                           " at that rung")
    return rungs, ""


def _zero_shot(model: torch.nn.Module, data: DataBundle, calibration, batch_size: int, device: torch.device,
               evaluate: Callable[[torch.nn.Module], float]) -> float:
    """The pruned model's accuracy before any training, with what costs none: BatchNorm statistics re-estimated on
    the calibration images (a pruned CNN's are stale, which alone can put it at chance). On a copy."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        reestimate_batchnorm(probe, data.batches(calibration, device), batch_size)
    return evaluate(probe)


def _stop_reason(latency: LatencyProfile, context: TrialContext, method: str) -> str:
    """Why a profiled trial is not worth healing ('' when it is): healing costs minutes, profiling seconds. Decided
    on evidence: only a trial whose speedup interval lies wholly on the wrong side stops, so that noise does not
    throw away a trial that may be faster. The dense reference (`none`) is always healed: fine-tuned, it may beat
    the dense model's accuracy."""
    target = context.latency_target_ms
    fastest_ms = latency.median_ms * latency.speedup / latency.speedup_high  # the interval's fast end
    if target is not None and fastest_ms > target:
        return (f"missed the latency target ({latency.median_ms:.3f} ms, at best {fastest_ms:.3f} ms,"
                f" > {target:g} ms)")
    if context.stop_unless_faster and method != "none" and latency.confidently_slower:
        shown = latency.describe_speedup()
        return (f"not faster than the dense model (speedup {shown or '1×: the dense structure on dense kernels'}):"
                " it cannot join the front")
    return ""


def _allocate(model: torch.nn.Module, config: PruneConfig,
              cost: Callable[[tuple[LayerGroup, ...], Mapping[str, float]], float],
              ) -> tuple[tuple[LayerGroup, ...], dict[str, float]]:
    """The layer groups and each one's sparsity: the pooled group for global sparsity, the model's own groups
    otherwise, with the spectra's allocation, or the shape's scale that meets the cost target, when the config
    asks for it."""
    if config.allocation == "spectral":
        groups = layer_groups(model)
        return groups, spectral_allocation(model, groups, config.sparsity[POOLED_GROUP])
    if config.allocation == "macs":
        groups = layer_groups(model)
        shape = {group.name: config.sparsity.get(group.name, 1.0) for group in groups}
        if config.target is None or config.bounds is None:
            raise ValueError("allocation 'macs' needs a target (the reduction) and bounds (the sparsity range)")
        low, high = config.bounds
        sparsity, _ = solve(lambda candidate: cost(groups, candidate), shape, float(config.target), low=low, high=high)
        return groups, sparsity
    groups = (pooled_group(model),) if set(config.sparsity) == {POOLED_GROUP} else layer_groups(model)
    return groups, {group.name: config.sparsity.get(group.name, 0.0) for group in groups}


def _pruned_cost(model: torch.nn.Module, method: prune.PruneMethod, request: prune.PruneRequest,
                 input_size: tuple[int, int, int], layers: list[str]) -> float:
    """What the structure `request` makes of `model` costs: a copy pruned (to its final sparsity, for a gradual
    method) and counted — multiply-accumulates where the method removes structure, non-zero weights where it
    masks (dense kernels execute the zeros; a sparse kernel would not)."""
    probe = copy.deepcopy(model)
    masks = method.apply(probe, request)
    if method.gradual:
        masks.finish(probe)
    if method.structured:
        return float(count_macs(probe, input_size))
    return float(prunable_weight_count(probe, layers)[0])


def _stopwatch(timings: dict[str, float]):
    """Stages timed into `timings`, adding up when a stage runs more than once; a stage inside another (a rung's
    evaluation inside healing) counts for itself only, not for the one around it too."""
    inside: list[float] = []  # per open stage, the seconds its nested stages took

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        inside.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            timings[name] = timings.get(name, 0.0) + elapsed - inside.pop()
            if inside:
                inside[-1] += elapsed

    return stage
