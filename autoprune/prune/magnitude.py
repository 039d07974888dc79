"""Unstructured magnitude pruning: in each group, the weights of smallest |w| are zeroed under one threshold.

With the pooled group (global sparsity) this is global magnitude pruning; with one group per block part it is
group-wise, each group at its own sparsity.
"""

from __future__ import annotations

import torch

from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks, remove_lowest


@torch.no_grad()
def magnitude_masks(model, request: PruneRequest) -> Masks:
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for group in request.groups:
        scores = [modules[name].weight.detach().abs() for name in group.layers]
        masks.update(zip(group.layers, remove_lowest(scores, request.sparsity[group.name])))
    result = Masks(masks)
    result.apply(model)
    return result


register(
    PruneMethod(
        "magnitude",
        magnitude_masks,
        "Zero the smallest-magnitude weights (global with one sparsity, group-wise with several).",
    )
)
