"""Structured removal of MLP hidden neurons and conv channels, which physically shrinks the model.

Torch-Pruning's dependency graph does the surgery: removing a layer's output channels also removes the coupled
inputs of the layers that consume them (and the norms in between). Only *block-internal* channels are removed
(a ViT block's MLP hidden neurons, a ResNet/ConvNeXt block's inner convs); channels that feed the residual
stream are coupled across the whole network and stay. Attention heads are not removed yet.

What to remove (importance: group L2 magnitude) is kept separate from how (the dependency graph).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import block_of, fix_attention_metadata, is_attention_layer
from autoprune.prune import PruneMethod, PruneRequest, register
from autoprune.prune.masks import Masks


def _out_channels_fn(module: nn.Module):
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def remove_channels(model: nn.Module, request: PruneRequest) -> Masks:
    import torch_pruning as tp

    if request.example_inputs is None:
        raise AutopruneError("structured pruning needs example inputs to trace the model.")
    round_to = int(request.options["round_to"])
    # The dependency graph traces with autograd, so this runs with gradients on; the surgery below does not.
    with warnings.catch_warnings():  # unwrapped parameters such as pos_embed are never pruned here
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=request.example_inputs, verbose=False)
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for group in request.groups:
        ratio = request.sparsity[group.name]
        for name in group.layers:
            root = modules[name]
            if is_attention_layer(name) or not _is_block_internal(graph, root, name, names):
                continue
            width = _width(root)
            keep = max(round_to, int(round(width * (1 - ratio) / round_to)) * round_to)
            if keep >= width:
                continue
            with torch.no_grad():
                everything = graph.get_pruning_group(root, _out_channels_fn(root), idxs=list(range(width)))
                scores = importance(everything)
                drop = torch.argsort(scores)[: width - keep].tolist()
                graph.get_pruning_group(root, _out_channels_fn(root), idxs=drop).prune()
    fix_attention_metadata(model)
    return Masks()


def _is_block_internal(graph, root: nn.Module, name: str, names: dict[nn.Module, str]) -> bool:
    """True when removing `root`'s output channels touches only layers of its own block."""
    block = block_of(name)
    if block is None:
        return False
    probe = graph.get_pruning_group(root, _out_channels_fn(root), idxs=[0])
    touched = {names.get(dep.target.module) for dep, _ in probe} | {names.get(dep.source.module) for dep, _ in probe}
    touched.discard(None)  # Torch-Pruning's own op nodes (reshape, add, …) have no module name
    return all(block_of(other) == block for other in touched)


register(
    PruneMethod(
        "structured",
        remove_channels,
        "Remove block-internal MLP neurons / conv channels of lowest L2 group norm (physically smaller model).",
        structured=True,
        options={"round_to": 1},
    )
)
