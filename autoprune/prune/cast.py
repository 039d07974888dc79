"""CAST (arXiv 2606.02608, ESM 2 §CAST): N:M keep patterns chosen by their effect on the layer's output.

Magnitude N:M keeps the N largest |w| of each group. CAST instead measures, on calibration images, the n×n
covariance C_g = E[h_g h_gᵀ] of the inputs h_g that each group of M weights multiplies, and for every output row i
and group g keeps the pattern m that minimises the removed part's output energy

    c(m) = rᵀ C_g r,   r = (1 − m) ⊙ w_{i,g}        (= E[(removed part of the row's output)²])

over all C(M, N) patterns (1024 sampled when there are 5000 or more). The pattern is chosen per row, not shared.
The dense weights are the source (the paper's α_ser = 0 case: no SER mask to stay close to).

Option `permute` first reorders a layer's input channels so that every group of M spans the range of importance
(score s_j = Σ_i |W_ij| · E|h_j|, quartile-interleaved). The paper applies the permutation with forward hooks, which
are lost when the model is saved; here it is folded into the layer that produces those channels (fc1 → fc2 in a
ViT MLP; conv → BatchNorm → 1×1 conv inside a ResNet block), so the model computes exactly the same function, saves
as plain weights, and N:M holds in the stored layout. Layers whose producer is the residual stream are not permuted.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError
from autoprune.models import HiddenChannels, hidden_channels, observe_inputs
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks
from autoprune.prune.nm import check_pattern

MAX_PATTERNS = 5000  # from this many C(M, N) patterns on, sample …
SAMPLED_PATTERNS = 1024  # … this many (the paper's setting)


def keep_patterns(n: int, m: int, *, seed: int = 0) -> torch.Tensor:
    """The candidate keep patterns, P × m booleans with n True each."""
    if math.comb(m, n) < MAX_PATTERNS:
        combos = list(itertools.combinations(range(m), n))
    else:
        generator = torch.Generator().manual_seed(seed)
        combos = [tuple(torch.randperm(m, generator=generator)[:n].tolist()) for _ in range(SAMPLED_PATTERNS)]
    patterns = torch.zeros(len(combos), m, dtype=torch.bool)
    for index, combo in enumerate(combos):
        patterns[index, list(combo)] = True
    return patterns


def removed_energy(weight: torch.Tensor, covariance: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """rᵀ C_g r per row and group for the given keep mask (rows × groups); the quantity CAST minimises."""
    m = covariance.shape[-1]
    removed = weight.detach().reshape(weight.shape[0], -1, m) * ~keep.reshape(weight.shape[0], -1, m)
    return torch.einsum("ogi,gij,ogj->og", removed.double(), covariance.double(), removed.double())


@torch.no_grad()
def cast_mask(weight: torch.Tensor, covariance: torch.Tensor, patterns: torch.Tensor, rows_per_chunk: int = 256):
    """Per row and group, the keep pattern of least removed energy (weight: rows × groups·m; covariance: G × m × m)."""
    m = patterns.shape[1]
    patterns = patterns.to(weight.device)
    rows = weight.detach().reshape(weight.shape[0], -1, m).double()
    removed = (~patterns).double()  # P × m
    covariance = covariance.double()
    best = []
    for chunk in rows.split(rows_per_chunk):
        r = chunk[:, :, None, :] * removed[None, None]  # rows × G × P × m
        cost = torch.einsum("ogpi,gij,ogpj->ogp", r, covariance, r)
        best.append(cost.argmin(-1))
    return patterns[torch.cat(best)].reshape(weight.shape)


def _input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its flattened weight multiplies: (samples × C_in·k·k) for a conv."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    padding = module.padding
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1)
        padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in
                                                          zip(module.dilation, module.kernel_size))
    patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # unfold's order is (C, kh, kw), as the weight's


def _gather(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, reduce) -> dict[str, torch.Tensor]:
    """The mean of `reduce(module, rows)` per input row, over the calibration images, for every layer."""
    totals: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def record(name, module, inputs):
        rows = _input_rows(module, inputs).double()
        value = reduce(module, rows)
        totals[name] = totals[name] + value if name in totals else value
        counts[name] += rows.shape[0]

    observe_inputs(model, layers, images, record, batch_size=16)
    return {name: totals[name] / max(counts[name], 1) for name in totals}


def group_covariances(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, m: int):
    """C_g = E[h_g h_gᵀ] for every group of m consecutive inputs of every layer (G × m × m)."""
    def second_moment(module, rows):
        grouped = rows.reshape(rows.shape[0], -1, m)
        return torch.einsum("ngi,ngj->gij", grouped, grouped)

    return _gather(model, layers, images, second_moment)


# ---- the optional input-channel permutation, folded into the producing layer ---------------------------------


def interleave(scores: torch.Tensor, m: int) -> torch.Tensor:
    """A permutation that puts one channel of each importance band (of m bands) into every group of m."""
    order = torch.argsort(scores, descending=True)
    return order.reshape(m, -1).T.reshape(-1)


@torch.no_grad()
def permute_channels(model: nn.Module, hidden: HiddenChannels, perm: torch.Tensor) -> None:
    """Reorder hidden channels in their producer, its norm and their consumer: the block's function is unchanged."""
    modules = dict(model.named_modules())
    for name in (hidden.producer, hidden.producer_norm):
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(modules[name], attribute, None) if name else None
            if tensor is not None:
                tensor.copy_(tensor[perm])
    consumer = modules[hidden.consumer].weight
    consumer.copy_(consumer[:, perm])


def fold_permutations(model: nn.Module, layers: dict[str, nn.Module], images, m: int) -> dict[str, tuple]:
    """Permute the input channels of every pruned 1×1 layer that reads hidden channels. Returns each permuted
    layer's (output, input) order relative to the dense weights (`Masks.layouts`)."""
    chosen = [hidden for hidden in hidden_channels(model) if hidden.consumer in layers
              and layers[hidden.consumer].weight[0].numel() == layers[hidden.consumer].weight.shape[1]
              and layers[hidden.consumer].weight.shape[1] % m == 0]
    mean_abs = _gather(model, {hidden.consumer: layers[hidden.consumer] for hidden in chosen}, images,
                       lambda module, rows: rows.abs().sum(0))
    layouts: dict[str, list] = {}
    for hidden in chosen:
        weight = layers[hidden.consumer].weight.detach().reshape(layers[hidden.consumer].weight.shape[0], -1)
        perm = interleave(weight.double().abs().sum(0) * mean_abs[hidden.consumer], m)
        permute_channels(model, hidden, perm)
        rows = layouts.setdefault(hidden.producer, [None, None])
        rows[0] = perm if rows[0] is None else rows[0][perm]
        columns = layouts.setdefault(hidden.consumer, [None, None])
        columns[1] = perm if columns[1] is None else columns[1][perm]
    return {name: (rows, columns) for name, (rows, columns) in layouts.items()}


# ---- the method --------------------------------------------------------------------------------------------


@torch.no_grad()
def cast_masks(model: nn.Module, request: PruneRequest) -> Masks:
    n, m = int(request.options["n"]), int(request.options["m"])
    if problem := check_pattern(request.options):
        raise AutopruneError(f"cast: {problem}.")
    if request.calibration is None or len(request.calibration) == 0:
        raise AutopruneError("cast needs calibration images for its input covariances (calibration_images > 0).")
    modules = dict(model.named_modules())
    layers = {name: modules[name] for group in request.groups for name in group.layers
              if modules[name].weight[0].numel() % m == 0 and getattr(modules[name], "groups", 1) == 1}
    layouts = fold_permutations(model, layers, request.calibration, m) if request.options["permute"] else {}
    covariances = group_covariances(model, layers, request.calibration, m)
    for name, layer in layers.items():
        # A layer its model applies with F.linear on its weight (BEiT's and EVA's qkv, with their own bias) is never
        # entered as a module, so no input was seen: the identity covariance makes its pattern the magnitude one.
        if name not in covariances:
            identity = torch.eye(m, dtype=torch.float64, device=layer.weight.device)
            covariances[name] = identity.expand(layer.weight[0].numel() // m, m, m)
    patterns = keep_patterns(n, m, seed=request.seed)
    result = Masks({name: cast_mask(layer.weight, covariances[name], patterns) for name, layer in layers.items()},
                   layouts=layouts)
    result.apply(model)
    return result


register(
    PruneMethod(
        "cast",
        cast_masks,
        "CAST N:M: per row and group, the keep pattern of least covariance-weighted removed energy on calibration"
        " images; optional input-channel permutation folded into the producing layer.",
        uses_sparsity=False,
        semi_structured=True,
        needs_calibration=True,
        options={"n": 2, "m": 4, "permute": False},
        check=check_pattern,
    )
)
