"""The pruning registry's types: what a method gets (`PruneRequest`), what it declares (`PruneMethod`), and the
registry every method module registers itself in. Method modules import this, never the package, so that the
package can import them all without a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autoprune.data import Batches
from autoprune.models import LayerGroup
from autoprune.prune.masks import Sparsifier
from autoprune.registry import Registry


@dataclass(frozen=True)
class PruneRequest:
    """What to prune: the layer groups, each group's target sparsity, and the method's options."""

    groups: tuple[LayerGroup, ...]
    sparsity: Mapping[str, float]  # group name → fraction of its weights (or units) to remove
    options: Mapping[str, Any] = field(default_factory=dict)
    example_inputs: torch.Tensor | None = None  # a batch of inputs on the model's device, for methods that trace it
    # Calibration images for methods that gather statistics: anything with len() and split(batch_size) into
    # normalised batches on the model's device (`data.Batches`, or a tensor).
    calibration: Batches | torch.Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class PruneMethod:
    """A registered pruning method and what the search space needs to know about it."""

    name: str
    apply: Callable[[nn.Module, PruneRequest], Sparsifier]
    description: str
    uses_sparsity: bool = True  # False when the method fixes its own sparsity (N:M)
    structured: bool = False  # physically removes units: latency can drop on dense kernels
    needs_calibration: bool = False  # gathers statistics on calibration images (the search then samples a budget)
    calibration_when: Mapping[str, tuple] = field(default_factory=dict)  # … or only with these option values
    gradual: bool = False  # keeps pruning while the model heals (returns a sparsifier, final only at `finish`)
    semi_structured: bool = False  # leaves N:M patterns: with n=2, m=4 it is timed on 2:4 kernels where they exist
    sparsity_modes: tuple[str, ...] = ("global", "per_group", "depth", "spectral", "macs")  # parametrisations it takes
    options: Mapping[str, Any] = field(default_factory=dict)  # option name → default
    choices: Mapping[str, tuple] = field(default_factory=dict)  # option name → its valid values, where they are few
    check: Callable[[Mapping[str, Any]], str | None] | None = None  # a problem with a set of options, or None
    # Whether its healing can run as a multi-worker DeepSpeed job (heal_runtime.engine: deepspeed), and if not, why.
    distributable: bool = True
    distributable_why: str = ""


    def execution_format(self, options: Mapping[str, Any]) -> str:
        """How the pruned model runs when timed (see measure/formats.py)."""
        two_four = self.semi_structured and (options.get("n"), options.get("m")) == (2, 4)
        return "2:4" if two_four else "dense"

    def needs_images(self, options: Mapping[str, Any]) -> bool:
        """Whether pruning with these options reads calibration images."""
        return self.needs_calibration or any(options.get(key) in values for key, values in self.calibration_when.items())


PRUNE_METHODS: Registry[PruneMethod] = Registry("pruning method")

register, get, list_methods = PRUNE_METHODS.register, PRUNE_METHODS.get, PRUNE_METHODS.names
