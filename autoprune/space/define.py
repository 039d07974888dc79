"""The search space: a validated spec and the model's layer groups → Optuna parameters → `TrialConfig`.

The space is flat: every trial has every parameter, whether its methods use it or not (N:M's trials draw a
sparsity they ignore, `heal: none`'s a learning rate). Optuna's model-based samplers model only the parameters
every trial has — GPSampler and multivariate TPE draw any other at random — so a space whose parameters exist only
where they mean something is, to them, mostly a random search. `to_config` reads only what the trial's methods use.
Parameter names are dotted and stable (`prune.sparsity.blocks.3.mlp`), so that they read well in MLflow and a
resumed search finds the same distributions.

The healing budget (`space.heal.steps`, `calibration_images`) is not a parameter unless the spec asks for it
(`space.heal.budget: searched`): more healing never costs accuracy, so sampling it buys dominated points; it is the
search's fidelity instead (every trial heals the full budget, or stops at a rung of `search.halving`).

Per-layer sparsity comes in these parametrisations:
- global: one value, pooled over every prunable layer (one magnitude threshold for all);
- per_group: one value per layer group (a ViT block's attention or MLP, a CNN stage);
- depth: a few knots spread over depth, linearly interpolated to every group, so that deep models need not
  search a hundred dimensions;
- spectral: one value, which the trial spreads over the groups by the Marchenko–Pastur layer budget of the dense
  weights (it needs the weights, so it is resolved there, not here).
- macs: how far to prune (`prune.reduction`: 0 is the cost of every group at `low`, 1 of every group at `high`) and a
  shape over depth (`prune.shape.knotK`, relative weights); the trial solves the scale of the shape that costs
  that much (prune/target.py), so that the sampler proposes where a trial lands on the latency axis.
Which of them a method takes is declared in its registration and checked when the spec is read.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from autoprune import heal, prune
from autoprune.config import (Choice, Dimension, Fixed, HealConfig, PruneConfig, Range, SearchSpec, TrialConfig,
                              largest)
from autoprune.errors import SpecError
from autoprune.models import POOLED_GROUP, LayerGroup
from autoprune.prune.target import SHAPE_FLOOR


class SearchSpace:
    """The spec's space over one model's layer groups."""

    def __init__(self, spec: SearchSpec, groups: tuple[LayerGroup, ...]) -> None:
        sparsity = spec.prune.sparsity
        if not groups:
            raise SpecError(f"model {spec.model.name!r} has no prunable Linear/Conv2d layers.")
        if sparsity.mode in ("depth", "macs") and sparsity.knots > len(groups):
            raise SpecError(
                f"space.prune.sparsity.knots: {sparsity.knots} knots for {len(groups)} layer groups;"
                f" use at most {len(groups)} (or mode: per_group)."
            )
        self.spec = spec
        self.groups = groups

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(group.name for group in self.groups)

    def define(self, trial) -> None:
        """Optuna define-by-run: suggest every parameter of the space (the fixed ones are filled in by `to_config`)."""
        spec = self.spec
        _suggest(trial, "prune.method", Choice(spec.prune.methods))
        if any(prune.get(method).uses_sparsity for method in spec.prune.methods):
            sparsity = spec.prune.sparsity
            for name in self.sparsity_parameters():
                if name == "prune.reduction":
                    trial.suggest_float(name, 0.0, 1.0)
                elif name.startswith("prune.shape."):
                    trial.suggest_float(name, SHAPE_FLOOR, 1.0)
                else:
                    trial.suggest_float(name, sparsity.low, sparsity.high, step=sparsity.step)
        for method in spec.prune.methods:
            for option, dimension in spec.prune.options.get(method, {}).items():
                _suggest(trial, f"prune.{method}.{option}", dimension)
        _suggest(trial, "heal.method", Choice(spec.heal.methods))
        used = {key for p in spec.prune.methods for h in spec.heal.methods
                for key in _budget_keys(prune.get(p), spec.prune.options.get(p, {}), heal.get(h))}
        for key in ("calibration_images", "steps", "lr"):
            if key in used and (key == "lr" or spec.heal.budget == "searched"):
                _suggest(trial, f"heal.{key}", getattr(spec.heal, key))
        for method in spec.heal.methods:
            for option, dimension in spec.heal.options.get(method, {}).items():
                _suggest(trial, f"heal.{method}.{option}", dimension)

    def to_config(self, params: Mapping[str, Any]) -> TrialConfig:
        """The sampled parameters (plus the fixed ones) as a resolved trial configuration."""
        prune_method = _value(params, "prune.method", Choice(self.spec.prune.methods))
        heal_method = _value(params, "heal.method", Choice(self.spec.heal.methods))
        sparsity = self._resolve_sparsity(params) if prune.get(prune_method).uses_sparsity else {}
        mode = self.spec.prune.sparsity.mode if sparsity else "given"
        prune_options = _options(params, "prune", prune_method, self.spec.prune.options)
        used = _budget_keys(prune.get(prune_method), prune_options, heal.get(heal_method))
        budget = {key: _value(params, f"heal.{key}", getattr(self.spec.heal, key)) if key in used else 0
                  for key in ("calibration_images", "steps", "lr")}
        return TrialConfig(
            prune=PruneConfig(prune_method, sparsity, prune_options, mode if mode in ("spectral", "macs") else "given",
                              **({"target": float(params["prune.reduction"]),
                                  "bounds": (self.spec.prune.sparsity.low, self.spec.prune.sparsity.high)}
                                 if mode == "macs" else {})),
            heal=HealConfig(
                heal_method,
                calibration_images=int(budget["calibration_images"]),
                steps=int(budget["steps"]),
                lr=float(budget["lr"]),
                batch_size=self.spec.heal.batch_size,
                options=_options(params, "heal", heal_method, self.spec.heal.options),
            ),
            seed=self.spec.search.seed,
        )

    def coarse_start(self, trials: int) -> list[dict[str, Any]]:
        """The first points of a small-budget search: each method that takes a sparsity at a few uniform
        sparsities spread over the range up to its top (about a quarter of `trials` in all), every other method once, the
        healing method, learning rate and options left to the sampler — and, where the budget is searched, the
        largest healing budget the space allows (more healing does not cost accuracy, and healing is not an
        objective). A random start spends these trials on points that tell the sampler less."""
        sparse = [m for m in self.spec.prune.methods if prune.get(m).uses_sparsity]
        others = [m for m in self.spec.prune.methods if not prune.get(m).uses_sparsity]
        per_method = max(2, min(5, round(trials / 4 / max(1, len(sparse)))))
        sparsity = self.spec.prune.sparsity
        # spread up to the range's top, which a sampler rarely draws on every knot at once: the most pruned
        # structure is the front's fastest point, and most of its hypervolume (`autoprune bench replay`)
        fractions = [(k + 1) / per_method for k in range(per_method)]
        if sparsity.mode == "macs":  # the same points: uniform (every shape knot 1), from light to every group at `high`
            shape = dict.fromkeys(self.sparsity_parameters()[1:], 1.0)
            points = [{"prune.reduction": fraction, **shape} for fraction in fractions]
        else:
            points = [dict.fromkeys(self.sparsity_parameters(), _on_step(
                sparsity.low + (sparsity.high - sparsity.low) * fraction, sparsity.low, sparsity.step))
                for fraction in fractions]
        budget = {f"heal.{key}": largest(getattr(self.spec.heal, key)) for key in ("calibration_images", "steps")
                  if not isinstance(getattr(self.spec.heal, key), Fixed)}
        return ([{"prune.method": m, **point, **budget} for point in points for m in sparse]
                + [{"prune.method": m, **budget} for m in others])

    def sparsity_parameters(self) -> list[str]:
        """The Optuna parameters of a method that takes a sparsity (global, per group, or depth knots)."""
        mode = self.spec.prune.sparsity
        if mode.mode in ("global", "spectral"):
            return ["prune.sparsity"]
        if mode.mode == "per_group":
            return [f"prune.sparsity.{name}" for name in self.group_names]
        if mode.mode == "macs":
            return ["prune.reduction"] + [f"prune.shape.knot{index}" for index in range(mode.knots)]
        return [f"prune.sparsity.knot{index}" for index in range(mode.knots)]

    def _resolve_sparsity(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Each group's sparsity — or, in mode macs, its weight in the shape (the trial scales it)."""
        values = [float(params[name]) for name in self.sparsity_parameters() if name != "prune.reduction"]
        mode = self.spec.prune.sparsity.mode
        if mode in ("global", "spectral"):
            return {POOLED_GROUP: values[0]}
        if mode == "per_group":
            return dict(zip(self.group_names, values))
        return dict(zip(self.group_names, interpolate_knots(values, len(self.groups))))


def _budget_keys(pruning: prune.PruneMethod, options: Mapping[str, Any], healing: heal.HealMethod) -> tuple[str, ...]:
    """The parts of the budget a trial uses: calibration images (for its pruning statistics or its healing), and
    steps and lr if its healing trains."""
    images = pruning.needs_images(options) or healing.uses_calibration
    return (("calibration_images",) if images else ()) + (("steps", "lr") if healing.trains else ())


def _on_step(value: float, low: float, step: float | None) -> float:
    return round(low + round((value - low) / step) * step, 6) if step else value


def full_budget(spec: SearchSpec) -> int:
    """The healing steps of a trial healed to the end: the budget (`space.heal.steps`), or where it is searched, the
    most it may be. The rungs of successive halving are fractions of it."""
    return int(largest(spec.heal.steps))


def interpolate_knots(knots: list[float], groups: int) -> list[float]:
    """Knots evenly spread from the first to the last group, linearly interpolated in between."""
    if groups == 1:
        return [knots[0]]
    depth = np.linspace(0.0, 1.0, groups)
    return [float(v) for v in np.interp(depth, np.linspace(0.0, 1.0, len(knots)), knots)]


def _options(params: Mapping[str, Any], stage: str, method: str, options: Mapping[str, Mapping[str, Dimension]]):
    """The chosen method's options, each fixed or sampled (parameter `prune.structured.round_to`, …)."""
    return {option: _value(params, f"{stage}.{method}.{option}", dimension)
            for option, dimension in options.get(method, {}).items()}


def _suggest(trial, name: str, dimension: Dimension) -> Any:
    if isinstance(dimension, Fixed):
        return dimension.value
    if isinstance(dimension, Choice):
        if len(dimension.values) == 1:
            return dimension.values[0]
        return trial.suggest_categorical(name, list(dimension.values))
    if isinstance(dimension, Range) and isinstance(dimension.low, int):
        return trial.suggest_int(name, dimension.low, dimension.high, log=dimension.log, step=int(dimension.step or 1))
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log, step=dimension.step)


def _value(params: Mapping[str, Any], name: str, dimension: Dimension) -> Any:
    if isinstance(dimension, Fixed):
        return dimension.value
    if isinstance(dimension, Choice) and len(dimension.values) == 1:
        return dimension.values[0]
    return params[name]
