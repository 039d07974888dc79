"""Structured removal of MLP hidden neurons and conv channels, which physically shrinks the model.

Torch-Pruning's dependency graph does the surgery: removing a layer's output channels also removes the coupled
inputs of the layers that consume them (and the norms in between). Only *block-internal* channels are removed
(a ViT block's MLP hidden neurons, a ResNet/ConvNeXt block's inner convs); channels that feed the residual
stream are coupled across the whole network and stay.

Attention heads (option `heads`, on by default) go whole: a head's q, k and v rows of `qkv` and its columns of
`proj` are sliced out inside the one attention module, which needs no dependency graph (Torch-Pruning 1.6.1's head
pruner removed no heads of timm 1.0.31's Attention in our trials).

What to remove is kept separate from how (the dependency graph). Option `importance` scores a channel group or a
head by its weights' squared L2 norm (`l2`), L1 norm (`l1`), or first-order Taylor estimate of the loss change,
Σ|w·∂L/∂w| (`taylor`, Molchanov et al. 2019, Torch-Pruning's GroupTaylorImportance). Taylor's gradient is taken at
the dense weights on the calibration images; as those carry no labels here, L is the cross-entropy against the
model's own predictions. `round_to` keeps every pruned width a multiple of it (8 suits tensor cores).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.models import attention_modules, block_of, fix_attention_metadata, is_attention_layer
from autoprune.prune.base import PruneMethod, PruneRequest, register
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
    graph = dependency_graph(model, request.example_inputs)
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    kind = request.options["importance"]
    if kind == "taylor":
        _loss_gradients(model, request.calibration)
    importance = (tp.importance.GroupTaylorImportance() if kind == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2))
    for group in request.groups:
        ratio = request.sparsity[group.name]
        if request.options["heads"]:
            for name, attention in attention_modules(model):
                if f"{name}.qkv" in group.layers and isinstance(getattr(attention, "proj", None), nn.Linear):
                    remove_heads(attention, ratio, WEIGHT_SCORES[kind])
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
    model.zero_grad(set_to_none=True)
    return Masks()


# Per-weight scores whose sum over a head is its importance (the same criteria as the channel groups').
WEIGHT_SCORES = {
    "l2": lambda weight: weight.detach() ** 2,
    "l1": lambda weight: weight.detach().abs(),
    "taylor": lambda weight: (weight.detach() * weight.grad).abs(),
}


def _loss_gradients(model: nn.Module, images: torch.Tensor | None, batch_size: int = 32) -> None:
    """∂L/∂w at the current weights, accumulated over the images; L: cross-entropy against the model's own labels."""
    if images is None or len(images) == 0:
        raise AutopruneError("structured with importance: taylor needs calibration images (calibration_images > 0).")
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in images.split(batch_size):
        logits = model(batch)
        nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum").div(len(images)).backward()


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's dependency graph of `model`. It traces with autograd, so it is built with gradients on."""
    import torch_pruning as tp

    with warnings.catch_warnings():  # unwrapped parameters such as pos_embed are never pruned here
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


@torch.no_grad()
def remove_heads(attention: nn.Module, ratio: float, score=WEIGHT_SCORES["l2"]) -> None:
    """Remove round(ratio × heads) heads (at least one stays) of least summed `score` over their qkv rows and proj
    columns."""
    heads, qkv, proj = attention.num_heads, attention.qkv, attention.proj
    head_dim = qkv.out_features // (3 * heads)
    keep_count = max(1, heads - int(round(ratio * heads)))
    if keep_count >= heads:
        return
    qkv_by_head = qkv.weight.view(3, heads, head_dim, -1)
    proj_by_head = proj.weight.view(proj.out_features, heads, head_dim)
    importance = (score(qkv.weight).view(3, heads, head_dim, -1).sum((0, 2, 3))
                  + score(proj.weight).view(proj.out_features, heads, head_dim).sum((0, 2)))
    keep = torch.sort(torch.argsort(importance, descending=True)[:keep_count]).values
    qkv.weight = nn.Parameter(qkv_by_head[:, keep].reshape(3 * keep_count * head_dim, -1).clone())
    if qkv.bias is not None:
        qkv.bias = nn.Parameter(qkv.bias.view(3, heads, head_dim)[:, keep].reshape(-1).clone())
    qkv.out_features = qkv.weight.shape[0]
    proj.weight = nn.Parameter(proj_by_head[:, keep].reshape(proj.out_features, -1).clone())
    proj.in_features = proj.weight.shape[1]
    attention.num_heads = keep_count
    attention.head_dim = head_dim
    if hasattr(attention, "attn_dim"):
        attention.attn_dim = keep_count * head_dim


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
        "Remove block-internal MLP neurons / conv channels and ViT attention heads of least importance (L2, L1 or"
        " Taylor): a physically smaller model.",
        structured=True,
        options={"round_to": 1, "heads": True, "importance": "l2"},
        choices={"importance": ("l2", "l1", "taylor")},
        calibration_when={"importance": ("taylor",)},
    )
)
