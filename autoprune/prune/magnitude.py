"""Unstructured magnitude pruning: in each group, the weights of smallest |w| are zeroed under one threshold.

With the pooled group (global sparsity) this is global magnitude pruning; with one group per block part it is
group-wise, each group at its own sparsity.
"""

from __future__ import annotations

import torch

from autoprune.prune import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks


@torch.no_grad()
def magnitude_masks(model, request: PruneRequest) -> Masks:
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    for group in request.groups:
        weights = [modules[name].weight for name in group.layers]
        scores = torch.cat([w.detach().abs().flatten() for w in weights])
        remove = int(round(request.sparsity[group.name] * scores.numel()))
        keep = torch.ones_like(scores, dtype=torch.bool)
        if remove:
            # topk on the smallest gives exactly `remove` weights even when magnitudes tie.
            keep[torch.topk(scores, remove, largest=False).indices] = False
        for name, chunk in zip(group.layers, keep.split([w.numel() for w in weights])):
            masks[name] = chunk.view_as(modules[name].weight)
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
