"""The healing registry's types: what a method gets (`HealRequest`), what it declares (`HealMethod`), and the
registry every method module registers itself in. Method modules import this, never the package, so that the
package can import them all without a cycle.

A method that trains declares its `objective` (what it minimises), and the optimisation is this module's: every
such method heals on a warm-up–stable–decay schedule (`train.WarmupStableDecay`), which is what lets a trial's heal
stop at a rung of successive halving, be evaluated, and go on (`start`) instead of starting again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet
from autoprune.prune.masks import Sparsifier
from autoprune.registry import Registry
from autoprune.train import Objective, TrainingRun, WarmupStableDecay, optimise
from autoprune.train.loop import Precision


@dataclass(frozen=True)
class HealRequest:
    """The healing budget and everything a method may use."""

    calibration: ImageSet  # drawn from the training pool; never the eval split
    data: DataBundle  # for normalisation statistics
    steps: int
    lr: float
    batch_size: int
    masks: Sparsifier  # fixed masks, or a gradual method's sparsifier (see prune/masks.py)
    teacher: nn.Module  # the dense model, frozen
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: torch.device | str = "cpu"
    engine: HealingEngine | None = None  # None or local: train in this process; deepspeed: a multi-worker job


@dataclass(frozen=True)
class HealMethod:
    """A registered healing method and what it needs."""

    name: str
    apply: Callable[[nn.Module, HealRequest], list[float]]  # returns the loss per step (empty if it trains none)
    description: str
    needs_labels: bool = False
    needs_teacher: bool = False
    uses_calibration: bool = True  # False: no calibration images, the search samples no image budget
    trains: bool = True  # False: no optimiser steps, the search samples no steps or learning rate
    options: Mapping[str, Any] = field(default_factory=dict)  # option name → default
    choices: Mapping[str, tuple] = field(default_factory=dict)  # option name → its valid values, where they are few
    max_zero_stage: int = 3  # the highest DeepSpeed ZeRO stage its loss works under (heal_runtime.engine: deepspeed)
    # What a training method minimises, bound to the model it heals (`trained` makes `apply` from it). A method
    # registered with an `apply` of its own and no objective heals in one go: its trials are never judged at rungs.
    objective: Optional[Callable[[nn.Module, HealRequest], Objective]] = None

    @property
    def continues(self) -> bool:
        """Whether its heal can stop part-way and go on (`start`): it trains, and declares its objective."""
        return self.trains and self.objective is not None


def schedule(steps: int) -> WarmupStableDecay:
    """Every healing method's learning-rate schedule over a budget of `steps`."""
    return WarmupStableDecay(steps)


def trained(objective: Callable[[nn.Module, HealRequest], Objective]) -> Callable[[nn.Module, HealRequest], list[float]]:
    """The `apply` of a method that minimises `objective`: the whole budget in one go, in this process or on the
    request's DeepSpeed workers."""

    def apply(model: nn.Module, request: HealRequest) -> list[float]:
        return optimise(model, images=request.calibration, data=request.data, objective=objective(model, request),
                        steps=request.steps, lr=request.lr, batch_size=request.batch_size, seed=request.seed,
                        masks=request.masks, device=request.device, engine=request.engine,
                        schedule=schedule(request.steps))

    return apply


def start(method: HealMethod, model: nn.Module, request: HealRequest) -> TrainingRun:
    """A heal of `model` that advances in segments and can be evaluated part-way (a method that `continues`, in this
    process: `request.engine` local or None). What `method.apply` would do, had it been run to the end in one go."""
    if not method.continues:
        raise ValueError(f"healing method {method.name!r} cannot continue a heal: it declares no objective")
    if request.engine is not None and request.engine.engine != "local":
        raise ValueError("a heal that continues runs in the trial's process (heal_runtime.engine: local)")
    return TrainingRun(model, images=request.calibration, data=request.data, objective=method.objective(model, request),
                       steps=request.steps, lr=request.lr, batch_size=request.batch_size, seed=request.seed,
                       masks=request.masks, device=request.device,
                       precision=Precision.of(request.engine, request.device), schedule=schedule(request.steps))


HEAL_METHODS: Registry[HealMethod] = Registry("healing method")

register, get, list_methods = HEAL_METHODS.register, HEAL_METHODS.get, HEAL_METHODS.names

