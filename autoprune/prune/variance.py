"""Variance-Based Pruning (VBP, arXiv 2507.12988): remove the MLP hidden neurons whose post-activation varies least
on calibration images, and fold their mean activation into the next layer's bias.

A removed neuron j contributes W2[:, j]·a_j to the MLP output; replacing a_j by its mean μ_j keeps the output's
expectation exactly (b2 += W2[:, P] μ_P), and costs only the variance that a_j had. Statistics are gathered in one
pass with Welford/Chan's streaming update (numerically stable), over every token of every image.
The removal itself is physical (Torch-Pruning's dependency graph), so the model gets smaller and faster.

This implements the ViT MLP (timm `Mlp`: fc1 → act → fc2) case; the CNN channel version is not written yet.
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import fix_attention_metadata
from autoprune.prune import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks
from autoprune.prune.structured import dependency_graph


class Welford:
    """Streaming per-feature mean and variance (Chan et al.'s parallel update of Welford's algorithm)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, samples: torch.Tensor) -> None:
        """Add a batch of samples (N × features)."""
        samples = samples.double()
        n = samples.shape[0]
        batch_mean = samples.mean(0)
        batch_m2 = ((samples - batch_mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)


def _mlps(model: nn.Module, layers: set[str]) -> list[tuple[str, nn.Module]]:
    """The Linear → activation → Linear MLPs whose fc1 is among `layers`."""
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(getattr(module, "fc2", None), nn.Linear)
        and f"{name}.fc1" in layers
    ]


@torch.no_grad()
def post_activation_statistics(model: nn.Module, mlps: list[tuple[str, nn.Module]], images: torch.Tensor,
                               batch_size: int = 64) -> dict[str, Welford]:
    """Per-neuron statistics of each MLP's hidden activation (fc2's input), over every token."""
    stats = {name: Welford() for name, _ in mlps}
    handles = [
        mlp.fc2.register_forward_pre_hook(
            lambda module, inputs, name=name: stats[name].update(inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        for name, mlp in mlps
    ]
    try:
        model.eval()
        for batch in images.split(batch_size):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def variance_prune(model: nn.Module, request: PruneRequest) -> Masks:
    import torch_pruning as tp

    if request.calibration is None or len(request.calibration) == 0:
        raise AutopruneError("vbp needs calibration images for its activation statistics (calibration_images > 0).")
    ratios = {layer: request.sparsity[group.name] for group in request.groups for layer in group.layers}
    mlps = _mlps(model, set(ratios))
    if not mlps:
        raise AutopruneError("vbp found no Linear → activation → Linear MLPs to prune in this model.")
    stats = post_activation_statistics(model, mlps, request.calibration)
    graph = dependency_graph(model, request.example_inputs)
    for name, mlp in mlps:
        width = mlp.fc1.out_features
        keep = max(1, int(round(width * (1 - ratios[f"{name}.fc1"]))))
        if keep >= width:
            continue
        removed = torch.argsort(stats[name].variance)[: width - keep]
        with torch.no_grad():
            mean = stats[name].mean[removed].to(mlp.fc2.weight.dtype)
            if mlp.fc2.bias is None:
                mlp.fc2.bias = nn.Parameter(torch.zeros(mlp.fc2.out_features, dtype=mlp.fc2.weight.dtype))
            mlp.fc2.bias += mlp.fc2.weight[:, removed] @ mean  # the removed neurons' expected contribution
            graph.get_pruning_group(mlp.fc1, tp.prune_linear_out_channels, idxs=removed.tolist()).prune()
    fix_attention_metadata(model)
    return Masks()


register(
    PruneMethod(
        "vbp",
        variance_prune,
        "Variance-Based Pruning: remove the lowest-variance MLP neurons, fold their means into the next bias.",
        structured=True,
        needs_calibration=True,
    )
)
