"""One trial, start to end: dense model → prune → profile → heal → evaluate → count → save.

`run_trial` needs no Ray: the search calls it inside a Tune trial, tests and notebooks call it directly.
Latency depends only on the structure, so it is measured right after pruning: with a latency target, a trial
that misses it stops there and costs seconds instead of a healing run. A gradual method's structure is final only
after healing, so it is profiled then.

Everything runs on the trial's device: the model goes there before pruning, so that pruning statistics (VBP, CAST,
Taylor) are gathered where the trial's accelerator is, and calibration images are normalised there batch by batch.
The profile times a copy prepared for timing; the model saved is the one that healed, with the recipe it was
timed in, so that it loads and serves as it was measured.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from autoprune import heal, prune
from autoprune.data import DataBundle
from autoprune.measure import accuracy, achieved_sparsity, count_macs, count_params, prunable_weight_count
from autoprune.models import POOLED_GROUP, LayerGroup, ModelSource, layer_groups, pooled_group, prunable_layers, save_model
from autoprune.latency import Latencies, measure_latency
from autoprune.latency_cache import LatencyCache
from autoprune.profile import LatencyProfile
from autoprune.prune.spectral import spectral_allocation
from autoprune.spec import HealingEngine, ProfileSpec, PruneConfig, TrialConfig

STAGES = ("load", "prune", "profile", "heal", "evaluate", "count", "save")  # the keys of TrialResult.timings


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares (in Ray's object store, so workers need no files or hub access)."""

    source: ModelSource
    dense_state: Mapping[str, torch.Tensor]
    data: DataBundle
    profile: ProfileSpec = field(default_factory=ProfileSpec)
    latency_target_ms: float | None = None
    latency_cache: LatencyCache | None = None  # identical structures are timed once (see latency_cache.py)
    healing_engine: HealingEngine | None = None  # None: heal in the trial's process

    def dense_model(self) -> torch.nn.Module:
        model = self.source.create(pretrained=False)
        model.load_state_dict(self.dense_state)
        return model.eval()


@dataclass(frozen=True)
class TrialResult:
    """What a trial measured. `accuracy` is None when the trial missed the latency target and stopped early."""

    config: TrialConfig
    accuracy: float | None
    latency: LatencyProfile
    macs: int
    params: int
    sparsity: float  # fraction of the dense model's prunable weights that are gone
    timings: Mapping[str, float]  # seconds per stage (STAGES)
    latency_cached: bool = False  # the latency was measured earlier, on an identical structure
    extra_latency: Mapping[int, LatencyProfile] = field(default_factory=dict)  # the spec's other batch sizes
    node: str = ""  # the Ray node the trial ran on (set by the search; empty outside Ray)
    latency_keys: Mapping[int, str] = field(default_factory=dict)  # batch size → its latency-cache key

    @property
    def feasible(self) -> bool:
        return self.accuracy is not None

    def cost(self, metric: str) -> float:
        """The objective traded against accuracy (`spec.LATENCY_METRICS`)."""
        return {"latency_ms": self.latency.median_ms, "latency_p90_ms": self.latency.p90_ms,
                "macs": self.macs, "params": self.params}[metric]

    def metrics(self) -> dict[str, Any]:
        """Flat values for `tune.report`; `from_metrics` reads them back on the driver."""
        metrics: dict[str, Any] = {
            # An infeasible trial reports accuracy 0 so that the sampler sees it as a bad point.
            "accuracy": self.accuracy if self.feasible else 0.0,
            "feasible": int(self.feasible),
            "latency_ms": self.latency.median_ms,
            "latency_p90_ms": self.latency.p90_ms,
            "latency_spread": self.latency.spread,
            "macs": self.macs,
            "params": self.params,
            "sparsity": self.sparsity,
            "config_json": self.config.to_json(),
            "latency_json": json.dumps(self.latency.as_dict()),
            "latency_cached": int(self.latency_cached),
            "node": self.node,
            "extra_latency_json": json.dumps({batch: p.as_dict() for batch, p in self.extra_latency.items()}),
            "latency_keys_json": json.dumps(self.latency_keys),
        }
        metrics.update({f"latency_ms_batch{batch}": p.median_ms for batch, p in self.extra_latency.items()})
        metrics.update({f"time_{stage}_s": seconds for stage, seconds in self.timings.items()})
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> "TrialResult":
        def profile(fields: dict) -> LatencyProfile:
            return LatencyProfile(**{**fields, "input_size": tuple(fields["input_size"])})

        extra = json.loads(metrics.get("extra_latency_json", "{}"))
        return cls(
            config=TrialConfig.from_json(metrics["config_json"]),
            accuracy=metrics["accuracy"] if metrics["feasible"] else None,
            latency=profile(json.loads(metrics["latency_json"])),
            macs=int(metrics["macs"]),
            params=int(metrics["params"]),
            sparsity=float(metrics["sparsity"]),
            timings={stage: metrics[f"time_{stage}_s"] for stage in STAGES if f"time_{stage}_s" in metrics},
            latency_cached=bool(metrics.get("latency_cached", 0)),
            extra_latency={int(batch): profile(fields) for batch, fields in extra.items()},
            node=str(metrics.get("node", "")),
            latency_keys={int(batch): key for batch, key in json.loads(metrics.get("latency_keys_json", "{}")).items()},
        )

    def latency_entries(self) -> dict[str, LatencyProfile]:
        """The latency-cache entries this trial's measurements were stored under (to seed a resumed search's
        cache, so that a structure measured before the driver stopped is not measured a second time)."""
        profiles = {self.latency.batch_size: self.latency, **self.extra_latency}
        return {key: profiles[batch] for batch, key in self.latency_keys.items() if batch in profiles}


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
        groups, sparsity = _allocate(model, config.prune)
        masks = method.apply(
            model,
            prune.PruneRequest(
                groups=groups,
                sparsity=sparsity,
                options=options,
                example_inputs=data.normalize(data.train.take(slice(0, 2)).to(device)),
                calibration=data.batches(calibration, device) if method.needs_images(options) else None,
                seed=config.seed,
            ),
        )

    healing = heal.get(config.heal.method)
    if method.gradual and not healing.trains:
        masks = masks.finish(model)  # no steps to spread the pruning over: straight to the final sparsity

    latency: Latencies | None = None
    fmt = method.execution_format(options)

    def profile() -> Latencies:
        return measure_latency(model, fmt, context.profile, data.input_size, device=device, threads=threads,
                               cache=context.latency_cache)

    if not method.gradual:  # the structure is final already: measure now, and skip healing if it is too slow
        with stage("profile"):
            latency = profile()

    top1 = None
    target = context.latency_target_ms
    if latency is None or target is None or latency.objective.median_ms <= target:
        with stage("heal"):
            healing.apply(
                model,
                heal.HealRequest(
                    calibration=calibration,
                    data=data,
                    steps=config.heal.steps,
                    lr=config.heal.lr,
                    batch_size=config.heal.batch_size,
                    masks=masks,
                    teacher=dense,
                    options={**healing.options, **config.heal.options},
                    seed=config.seed,
                    device=device,
                    engine=context.healing_engine,
                ),
            )
            masks.finish(model)  # a gradual method ends at its final sparsity (fixed masks: re-applied)
        if latency is None:
            with stage("profile"):
                latency = profile()
        with stage("evaluate"):
            top1 = accuracy(model, data.eval, data, device=device)

    with stage("count"):
        macs = count_macs(model, data.input_size)
        params = count_params(model)
        sparsity = achieved_sparsity(model, layers, dense_weights)

    if save_dir is not None:
        with stage("save"):
            save_model(model, context.source, save_dir, recipe=latency.objective.recipe)

    return TrialResult(config, top1, latency.objective, macs, params, sparsity, timings,
                       latency_cached=latency.cached, extra_latency=latency.extra, latency_keys=latency.keys)


def _allocate(model: torch.nn.Module, config: PruneConfig) -> tuple[tuple[LayerGroup, ...], dict[str, float]]:
    """The layer groups and each one's sparsity: the pooled group for global sparsity, the model's own groups
    otherwise, with the spectra's allocation when the config asks for it."""
    if config.allocation == "spectral":
        groups = layer_groups(model)
        return groups, spectral_allocation(model, groups, config.sparsity[POOLED_GROUP])
    groups = (pooled_group(model),) if set(config.sparsity) == {POOLED_GROUP} else layer_groups(model)
    return groups, {group.name: config.sparsity.get(group.name, 0.0) for group in groups}


def _stopwatch(timings: dict[str, float]):
    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = time.perf_counter() - start

    return stage
