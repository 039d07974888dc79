"""Variance-Based Pruning (VBP, arXiv 2507.12988): remove the hidden units whose post-activation varies least on
calibration images, and fold their mean activation into what follows, so that the model is physically smaller.

A removed neuron j contributes W2[:, j]·a_j to the MLP output; replacing a_j by its mean μ_j keeps the output's
expectation exactly (b2 += W2[:, P] μ_P), and costs only the variance that a_j had. Statistics are gathered in one
pass with Welford/Chan's streaming update (numerically stable), over every token of every image.
The removal itself is physical (Torch-Pruning's dependency graph), so the model gets smaller and faster.

The paper prunes ViT MLP neurons (timm `Mlp`: fc1 → act → fc2). Here the units are every internal channel group
that the dependency graph finds (prune/channels.py) — a ViT / Mixer MLP's hidden neurons, a ResNet / RegNet /
ConvNeXt block's inner channels, an inverted residual's expansion channels (conv_pw → bn → act → depthwise conv →
bn → act → SE → conv_pwl) — with statistics at the input of each layer that reads them, over every position. A
removed channel becomes the constant map μ_c; its effect on each reader's output is folded into that reader's bias
or, for convs without one, into the BatchNorm right after it (its running mean). A squeeze-excitation's reducing
conv reads the channels pooled, and gets its own fold. Channels are ranked by the variance their main reader (the
one reading every position) sees. With zero padding a constant map's effect differs where the kernel overhangs
the border, so the fold uses its average over the output positions: each output channel's mean is kept (exactly,
for a constant channel); single positions move a little. A unit whose readers have neither a bias nor a
BatchNorm after them, or are grouped convs, is left as it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.errors import AutopruneError, Unsupported
from autoprune.models import fix_width_metadata, observe_inputs
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.channels import channel_groups, dependency_graph, remove, slice_positions
from autoprune.prune.masks import Masks
from autoprune.prune.structured import gated_mlps, keep_gated_hidden


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


def input_statistics(model: nn.Module, readers: list[str], images: torch.Tensor,
                     batch_size: int = 64) -> dict[str, Welford]:
    """Per-channel statistics of each reader's input, over every token / position."""
    modules = dict(model.named_modules())
    stats = {name: Welford() for name in readers}

    def record(name, module, hidden):
        if isinstance(module, nn.Conv2d):  # N × C × H × W: every position is a sample of each channel
            stats[name].spatial = tuple(hidden.shape[2:])
            hidden = hidden.movedim(1, -1)  # a Linear reads the last dim, whatever comes before (N × H × W × C too)
        stats[name].update(hidden.reshape(-1, hidden.shape[-1]))

    observe_inputs(model, {name: modules[name] for name in readers}, images, record, batch_size)
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
    if request.calibration is None or len(request.calibration) == 0:
        raise AutopruneError("vbp needs calibration images for its activation statistics (calibration_images > 0).")
    if request.example_inputs is None:
        raise AutopruneError("vbp needs example inputs to trace the model.")
    ratios = {layer: request.sparsity[group.name] for group in request.groups for layer in group.layers}
    graph = dependency_graph(model, request.example_inputs)
    modules = dict(model.named_modules())
    units = [(unit, folds) for unit in channel_groups(model, graph)
             if unit.internal and all(name in ratios for name in unit.producers)
             for folds in [_fold_targets(modules, graph, unit)] if folds is not None]
    gated = [(name, mlp) for name, mlp in gated_mlps(model) if f"{name}.fc1" in ratios and mlp.fc2.bias is not None]
    if not units and not gated:
        raise Unsupported(
            f"vbp: {type(model).__name__} has no hidden channels whose mean can be folded into what reads them"
            " (an MLP's hidden neurons, a block's inner or expansion channels read by a layer with a bias or a"
            " BatchNorm after it).")
    readers = [reader for unit, _ in units for reader in unit.consumers] + [f"{name}.fc2" for name, _ in gated]
    stats = input_statistics(model, readers, request.calibration)
    for name, mlp in gated:  # a gated MLP's hidden channel is value × gate; the graph cannot follow its halves
        width = mlp.fc2.in_features
        keep = max(1, int(round(width * (1 - ratios[f"{name}.fc1"]))))
        if keep < width:
            order = torch.argsort(stats[f"{name}.fc2"].variance)
            removed, kept = order[: width - keep], order[width - keep:]
            with torch.no_grad():
                mlp.fc2.bias += mlp.fc2.weight[:, removed] @ stats[f"{name}.fc2"].mean[removed].to(mlp.fc2.weight.dtype)
            keep_gated_hidden(mlp, kept)
    for unit, folds in units:
        per_slice = unit.width // unit.slices
        keep = max(1, int(round(per_slice * (1 - ratios[unit.producers[0]]))))
        if keep >= per_slice:
            continue
        # Rank by the variance the main reader sees (the one reading every position, not a pooled summary).
        main = max(unit.consumers, key=lambda reader: math.prod(stats[reader].spatial))
        removed = torch.tensor(slice_positions(stats[main].variance, unit.slices, keep), dtype=torch.long,
                               device=stats[main].mean.device)  # indexes the statistics and weights, on the device
        with torch.no_grad():
            for reader, (layer, norm) in folds.items():
                shift = mean_shift(layer, removed, stats[reader].mean[removed].to(layer.weight.dtype),
                                   stats[reader].spatial)
                if layer.bias is not None:
                    layer.bias += shift  # the removed channels' expected contribution
                else:  # BN(x + shift) in eval mode = BN with running_mean − shift
                    norm.running_mean -= shift
        remove(graph, model, unit, removed.tolist())
    fix_width_metadata(model)
    return Masks()


def _fold_targets(modules: dict[str, nn.Module], graph, unit) -> dict[str, tuple[nn.Module, nn.Module | None]] | None:
    """Each reader of the unit with where its removed inputs' mean goes (its bias, or the BatchNorm right after
    it); None when a reader has neither, or is a grouped conv (its weights do not index the channels one to one)."""
    folds = {}
    for reader in unit.consumers:
        layer = modules[reader]
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            return None
        after = [node.module for node in graph.module2node[layer].outputs]
        norm = after[0] if len(after) == 1 and isinstance(after[0], nn.modules.batchnorm._BatchNorm) else None
        if layer.bias is None and norm is None:
            return None
        folds[reader] = (layer, norm)
    return folds


register(
    PruneMethod(
        "vbp",
        variance_prune,
        "Variance-Based Pruning: remove the lowest-variance hidden channels (MLP neurons, inner / expansion convs),"
        " fold their means into what reads them.",
        structured=True,
        needs_calibration=True,
    )
)
