"""N:M semi-structured pruning: in every run of M consecutive input weights of a row, keep the N largest.

2:4 is the pattern that NVIDIA's sparse tensor cores execute. Layers whose input width is not a multiple of M
are left dense (and so lower the achieved sparsity below 1 − N/M).
"""

from __future__ import annotations

import torch

from autoprune.errors import AutopruneError
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with at most n non-zeros in each group of m along the flattened input dimension."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def check_pattern(options) -> str | None:
    """The N:M options' rule (shared with CAST), checked when the spec is read and again before pruning."""
    n, m = options["n"], options["m"]
    return None if 0 < n < m else f"`0 < n < m` must hold, but got n={n}, m={m}"


@torch.no_grad()
def nm_masks(model, request: PruneRequest) -> Masks:
    n, m = int(request.options["n"]), int(request.options["m"])
    if problem := check_pattern(request.options):
        raise AutopruneError(f"nm: {problem}.")
    modules = dict(model.named_modules())
    masks = {}
    for group in request.groups:
        for name in group.layers:
            weight = modules[name].weight
            if weight[0].numel() % m == 0:
                masks[name] = nm_mask(weight, n, m)
    result = Masks(masks)
    result.apply(model)
    return result


register(
    PruneMethod(
        "nm",
        nm_masks,
        "N:M semi-structured sparsity (2:4 by default): N kept in every M consecutive input weights.",
        uses_sparsity=False,
        semi_structured=True,
        options={"n": 2, "m": 4},
        check=check_pattern,
    )
)
