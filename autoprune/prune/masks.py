"""What a pruning method leaves behind for healing: fixed masks, or a sparsifier that keeps pruning while it heals.

The training loop talks to both through three calls: `before_step(model, progress)` (progress in [0, 1) of the
healing budget), `after_step(model)` and `finish(model)` (the final, exact sparsity). A one-shot method's masks only
re-apply themselves after each step; a gradual method (progressive magnitude, Feather) moves its sparsity along a
schedule, so "gradual" costs healing steps rather than a separate training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch
from torch import nn


class Sparsifier(Protocol):
    """What healing holds while it trains: fixed `Masks`, or a gradual method's sparsifier."""

    @property
    def by_layer(self) -> Mapping[str, torch.Tensor]: ...

    def before_step(self, model: nn.Module, progress: float) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...

    def finish(self, model: nn.Module) -> "Masks": ...


@dataclass(frozen=True)
class Masks:
    """Layer name → boolean keep-mask of that layer's weight. Empty for structured removal (nothing to hold).

    `layouts`: where a method reordered a layer's channels (CAST folds a permutation into the layers around a
    block's hidden channels), the (output, input) order of its weight relative to the dense model's, each None
    when unchanged; what recalibration needs to compare a pruned weight with its dense original."""

    by_layer: Mapping[str, torch.Tensor] = field(default_factory=dict)
    layouts: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights; called after pruning and after every optimiser step while healing."""
        modules = dict(model.named_modules())
        for name in self.by_layer:
            weight = modules[name].weight
            weight.masked_fill_(~on_device(self.by_layer, name, weight), 0)

    def dense_weight(self, name: str, dense: torch.Tensor) -> torch.Tensor:
        """The dense model's weight of layer `name` in this model's channel order."""
        rows, columns = self.layouts.get(name, (None, None))
        if rows is not None:
            dense = dense[rows.to(dense.device)]
        if columns is not None:
            dense = dense[:, columns.to(dense.device)]
        return dense

    def before_step(self, model: nn.Module, progress: float) -> None:
        """Fixed masks do not move."""

    def after_step(self, model: nn.Module) -> None:
        self.apply(model)

    def finish(self, model: nn.Module) -> "Masks":
        self.apply(model)
        return self

    def __bool__(self) -> bool:
        return bool(self.by_layer)


def on_device(masks: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The mask of layer `name`, moved once to its weight's device (healing may have moved the model since the
    mask was made; moving it at every step would cost a copy per layer per step)."""
    mask = masks[name]
    if mask.device != weight.device:
        mask = masks[name] = mask.to(weight.device)
    return mask


def remove_lowest(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Keep-masks (one per tensor, same shapes) that remove exactly round(fraction·N) of the lowest scores, pooled
    over all the tensors: one threshold for the group, the remove-th smallest score; of the scores tied with it, the
    first ones go, so that the count is exact. (kthvalue selects in linear time: topk over a 400M-weight model's
    scores took 40 s of a 2-minute check on one core.)"""
    flat = torch.cat([score.flatten() for score in scores])
    keep = torch.ones_like(flat, dtype=torch.bool)
    remove = int(round(fraction * flat.numel()))
    if remove:
        threshold = torch.kthvalue(flat, remove).values
        tied = flat == threshold
        below = (flat < threshold).sum()
        keep = (flat > threshold) | (tied & (tied.cumsum(0) > remove - below))  # (no host sync: meta tensors too)
    return [chunk.view_as(score) for chunk, score in zip(keep.split([s.numel() for s in scores]), scores)]


def cubic_schedule(progress: float, final: float, *, start: float = 0.0, end: float = 0.5) -> float:
    """Zhu & Gupta's cubic ramp (s_i = 0): final − final·(1 − (t − start)/(end − start))³, clipped to [start, end]."""
    fraction = min(max((progress - start) / (end - start), 0.0), 1.0)
    return final - final * (1.0 - fraction) ** 3


def linear_schedule(progress: float, final: float, *, start: float = 0.0, end: float = 0.5) -> float:
    fraction = min(max((progress - start) / (end - start), 0.0), 1.0)
    return final * fraction


SCHEDULES = {"cubic": cubic_schedule, "linear": linear_schedule}
