"""Weight masks for unstructured and N:M pruning, held fixed while a model heals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Masks:
    """Layer name → boolean keep-mask of that layer's weight. Empty for structured removal (nothing to hold)."""

    by_layer: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights; called after pruning and after every optimiser step while healing."""
        modules = dict(model.named_modules())
        for name, mask in self.by_layer.items():
            weight = modules[name].weight
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))

    def __bool__(self) -> bool:
        return bool(self.by_layer)
