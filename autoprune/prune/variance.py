"""Variance-Based Pruning (VBP, arXiv 2507.12988): remove the hidden units whose post-activation varies least on
calibration images, and fold their mean activation into what follows, so that the model is physically smaller.

A removed neuron j contributes W2[:, j]·a_j to the MLP output; replacing a_j by its mean μ_j keeps the output's
expectation exactly (b2 += W2[:, P] μ_P), and costs only the variance that a_j had. Statistics are gathered in one
pass with Welford/Chan's streaming update (numerically stable), over every token of every image.
The removal itself is physical (Torch-Pruning's dependency graph), so the model gets smaller and faster.

The paper prunes ViT MLP neurons (timm `Mlp`: fc1 → act → fc2). The CNN version here is the analogue on a ResNet
block's inner channels (conv_k → bn_k → act → conv_k+1), with statistics over every position: a removed channel
becomes the constant map μ_c, whose effect on conv_k+1's output is folded into that conv's bias or, as ResNet
convs have none, into the following BatchNorm's running mean. With zero padding a constant map's effect differs
where the kernel overhangs the border, so the fold uses its average over the output positions: each output
channel's mean is kept (exactly, for a constant channel); single positions move a little.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError
from autoprune.models import HiddenChannels, fix_attention_metadata, hidden_channels, observe_inputs
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks
from autoprune.prune.structured import dependency_graph


class Welford:
    """Streaming per-feature mean and variance (Chan et al.'s parallel update of Welford's algorithm)."""

    def __init__(self) -> None:
        self.spatial: tuple[int, ...] = ()  # the positions each sample came from (H, W for a conv's input)
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


def post_activation_statistics(model: nn.Module, units: list[HiddenChannels], images: torch.Tensor,
                               batch_size: int = 64) -> dict[str, Welford]:
    """Per-channel statistics of each unit's hidden activation (its consumer's input), over every token / position."""
    modules = dict(model.named_modules())
    stats = {unit.consumer: Welford() for unit in units}

    def record(name, module, hidden):
        if hidden.dim() == 4:  # N × C × H × W: every position is a sample of each channel
            stats[name].spatial = tuple(hidden.shape[2:])
            hidden = hidden.movedim(1, -1)
        stats[name].update(hidden.reshape(-1, hidden.shape[-1]))

    observe_inputs(model, {unit.consumer: modules[unit.consumer] for unit in units}, images, record, batch_size)
    return stats


@torch.no_grad()
def mean_shift(consumer: nn.Module, removed: torch.Tensor, mean: torch.Tensor, spatial: tuple[int, ...]):
    """What the removed channels, held at their means, add to each of the consumer's outputs (its average over
    output positions for a conv)."""
    weight = consumer.weight[:, removed]
    if isinstance(consumer, nn.Linear):
        return weight @ mean
    probe = mean.reshape(1, -1, 1, 1).expand(1, len(removed), *spatial)
    return F.conv2d(probe, weight, None, consumer.stride, consumer.padding, consumer.dilation).mean((0, 2, 3))


def variance_prune(model: nn.Module, request: PruneRequest) -> Masks:
    import torch_pruning as tp

    if request.calibration is None or len(request.calibration) == 0:
        raise AutopruneError("vbp needs calibration images for its activation statistics (calibration_images > 0).")
    ratios = {layer: request.sparsity[group.name] for group in request.groups for layer in group.layers}
    modules = dict(model.named_modules())
    units = [unit for unit in hidden_channels(model) if unit.producer in ratios and _can_fold(modules, unit)]
    if not units:
        raise AutopruneError("vbp found no hidden units to prune in this model (ViT MLPs or ResNet block convs).")
    stats = post_activation_statistics(model, units, request.calibration)
    graph = dependency_graph(model, request.example_inputs)
    for unit in units:
        producer, consumer = modules[unit.producer], modules[unit.consumer]
        width = consumer.weight.shape[1]
        keep = max(1, int(round(width * (1 - ratios[unit.producer]))))
        if keep >= width:
            continue
        removed = torch.argsort(stats[unit.consumer].variance)[: width - keep]
        shift = mean_shift(consumer, removed, stats[unit.consumer].mean[removed].to(consumer.weight.dtype),
                           stats[unit.consumer].spatial)
        with torch.no_grad():
            if consumer.bias is not None:
                consumer.bias += shift  # the removed units' expected contribution
            else:  # BN(x + shift) in eval mode = BN with running_mean − shift
                modules[unit.consumer_norm].running_mean -= shift
        prune_out = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(producer, prune_out, idxs=removed.tolist()).prune()
    fix_attention_metadata(model)
    return Masks()


def _can_fold(modules: dict[str, nn.Module], unit: HiddenChannels) -> bool:
    return modules[unit.consumer].bias is not None or unit.consumer_norm is not None


register(
    PruneMethod(
        "vbp",
        variance_prune,
        "Variance-Based Pruning: remove the lowest-variance MLP neurons (ViT) or block-internal channels (CNN), fold"
        " their means into what follows.",
        structured=True,
        needs_calibration=True,
    )
)
