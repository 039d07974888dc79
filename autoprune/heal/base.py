"""The healing registry's types: what a method gets (`HealRequest`), what it declares (`HealMethod`), and the
registry every method module registers itself in. Method modules import this, never the package, so that the
package can import them all without a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet
from autoprune.prune.masks import Sparsifier
from autoprune.registry import Registry


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


HEAL_METHODS: Registry[HealMethod] = Registry("healing method")

register, get, list_methods = HEAL_METHODS.register, HEAL_METHODS.get, HEAL_METHODS.names

