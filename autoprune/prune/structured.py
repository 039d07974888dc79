"""Structured removal of hidden neurons, channels and attention heads, which physically shrinks the model.

Which channels may go is read off Torch-Pruning's dependency graph (prune/channels.py), for any timm family:
every *internal* channel group — written by one layer and read inside one block (a ViT / Mixer MLP's hidden
neurons, a ResNet, RegNet or ConvNeXt block's inner convs, an inverted residual's expansion through its depthwise
conv and squeeze-excitation, a VGG conv, a DenseNet bottleneck) — loses the share of its channels that its
writer's layer group asks for; the graph removes the coupled inputs, norms and depthwise convs with them.
Channels that feed a residual stream are coupled across a whole stage and stay. A model with no internal channel
at all (RepVGG: every conv feeds a residual sum) is refused, with that reason.

Attention heads (option `heads`, on by default) go whole where timm's attention layout is known (ViT's
`Attention`, Swin's `WindowAttention`): a head's q, k and v rows of `qkv`, its columns of `proj` and its column of
a relative-position bias table are sliced out inside the one module. Other attentions keep their heads; their
MLPs are still pruned.

What to remove is kept separate from how (the dependency graph). Option `importance` scores a channel group or a
head by its weights' squared L2 norm (`l2`), L1 norm (`l1`), or first-order Taylor estimate of the loss change,
Σ|w·∂L/∂w| (`taylor`, Molchanov et al. 2019, Torch-Pruning's GroupTaylorImportance). Taylor's gradient is taken at
the dense weights on the calibration images; as those carry no labels here, L is the cross-entropy against the
model's own predictions. `round_to` keeps every pruned width a multiple of it (8 suits tensor cores).
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.errors import AutopruneError, Unsupported
from autoprune.models import fix_width_metadata
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.channels import channel_groups, dependency_graph, remove, slice_positions
from autoprune.prune.masks import Masks


def remove_channels(model: nn.Module, request: PruneRequest) -> Masks:
    import torch_pruning as tp

    if request.example_inputs is None:
        raise AutopruneError("structured pruning needs example inputs to trace the model.")
    round_to = int(request.options["round_to"])
    ratios = {layer: request.sparsity[group.name] for group in request.groups for layer in group.layers}
    kind = request.options["importance"]
    if kind == "taylor":
        _loss_gradients(model, request.calibration)
    if request.options["heads"]:
        for name, attention in head_prunable_attention(model):
            ratio = ratios.get(f"{name}.qkv")
            if ratio:
                remove_heads(attention, ratio, WEIGHT_SCORES[kind])
    gated = [(name, mlp) for name, mlp in gated_mlps(model) if ratios.get(f"{name}.fc1")]
    for name, mlp in gated:
        remove_gated_hidden(mlp, ratios[f"{name}.fc1"], round_to, WEIGHT_SCORES[kind])
    scope = request.options["scope"]
    graph = dependency_graph(model, request.example_inputs)
    found = [group for group in channel_groups(model, graph, streams=scope != "internal")
             # written by a layer that stays whole (the stem), even if an SE gate also writes it: left whole
             if all(name in ratios for name in group.producers)]
    if scope == "auto":
        scope = _auto_scope(model, found, bool(gated), ratios)
    groups = [group for group in found
              if (group.internal and scope != "stream") or (group.stream and scope != "internal")]
    if not groups and not gated:
        raise Unsupported(_nothing_in_scope(model, scope))
    modules = dict(model.named_modules())
    importance = (tp.importance.GroupTaylorImportance() if kind == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2))
    for group in groups:
        # a stream's writers may sit in several layer groups (blocks of a stage at different depths): their mean
        ratio = sum(ratios[name] for name in group.producers) / len(group.producers)
        if group.stream:
            ratio = stream_channel_ratio(ratio, group, modules)
        per_slice = group.width // group.slices
        keep = max(round_to, int(round(per_slice * (1 - ratio) / round_to)) * round_to)
        if keep >= per_slice:
            continue
        with torch.no_grad():
            try:
                scores = importance(group.dependencies)
                remove(graph, model, group, slice_positions(scores, group.slices, keep))
            except Exception as error:  # an operation the graph does not model (GhostNet's channel slicing, …)
                raise AutopruneError(
                    f"structured: removing channels of {group.root} in {type(model).__name__} failed"
                    f" ({type(error).__name__}: {error}); this model's layout is not supported by structured removal."
                ) from None
    fix_width_metadata(model)
    model.zero_grad(set_to_none=True)
    _must_still_run(model, request.example_inputs)
    return Masks()


AUTO_COVERAGE = 0.5  # auto: internal channels alone, when they reach at least this share of the prunable weights


def _auto_scope(model: nn.Module, found, gated: bool, ratios: dict[str, float]) -> str:
    """What `scope: auto` removes: a block's own channels (the stages keep their widths) where they, with the
    attention heads, touch at least AUTO_COVERAGE of the prunable weights; residual streams where the model has no
    such channel (RepVGG, MobileOne); both where the internal ones are too few to reach the sparsity asked
    (ConvMixer: a pointwise conv per block, writing the stream)."""
    internal = [group for group in found if group.internal]
    if not internal and not gated:
        return "stream"
    modules = dict(model.named_modules())
    touched = {name for group in internal for name in (*group.producers, *group.consumers)}
    touched |= {name for name in ratios if name.rsplit(".", 1)[0] in {n for n, _ in head_prunable_attention(model)}}
    touched |= {f"{name}.{layer}" for name, _ in gated_mlps(model) for layer in ("fc1", "fc2")}
    weight = {name: modules[name].weight.numel() for name in ratios if name in modules}
    covered = sum(count for name, count in weight.items() if name in touched) / max(1, sum(weight.values()))
    return "internal" if covered >= AUTO_COVERAGE else "both"


def stream_channel_ratio(sparsity: float, group, modules: dict[str, nn.Module]) -> float:
    """The share of a stream's channels to remove so that its layers lose `sparsity` of their weights: a layer that
    reads and writes the stream (a RepVGG conv) loses 1 - (1 - r)² of them, one that only reads or only writes it
    loses r. Solves b·(2r - r²) + o·r = s·(b + o) for r, b and o the weights of the two kinds."""
    both = set(group.producers) & set(group.consumers)
    weights = {name: modules[name].weight.numel() for name in {*group.producers, *group.consumers}}
    b = sum(weights[name] for name in both)
    o = sum(weights.values()) - b
    if b == 0:
        return sparsity
    a = 2 * b + o
    return (a - (a * a - 4 * b * sparsity * (b + o)) ** 0.5) / (2 * b)


def _nothing_in_scope(model: nn.Module, scope: str) -> str:
    name = type(model).__name__
    if scope == "internal":
        return (f"structured: {name} has no block-internal channels to remove (every conv/linear output feeds a"
                " residual sum or an attention); scope: stream removes a residual stream's channels across its"
                " stage, or use an unstructured method (magnitude, nm).")
    what = "residual streams" if scope == "stream" else "block-internal channels or residual streams"
    return (f"structured: {name} has no {what} it can remove (streams that reach an attention, concatenations and"
            " split channels stay); use an unstructured method (magnitude, nm).")


def _must_still_run(model: nn.Module, example_inputs: torch.Tensor) -> None:
    """A layout the graph misread shows at the first forward; say so here, not in the middle of healing. (In eval
    mode: a training-mode forward would move BatchNorm's running statistics.)"""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    except Exception as error:
        raise AutopruneError(
            f"structured: {type(model).__name__} no longer runs after its channels were removed"
            f" ({type(error).__name__}: {error}); this model's layout is not supported by structured removal."
        ) from None
    finally:
        model.train(training)


# What `scope` lets structured removal take: block-internal channels (today's default: every block keeps its
# input and output widths), residual streams (a whole stage's width, for families whose blocks have no internal
# channel: RepVGG / MobileOne, PoolFormer, …), or both.
SCOPES = ("auto", "internal", "stream", "both")  # auto: see _auto_scope

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


# timm attention layouts whose heads remove_heads knows how to slice (module path, class name).
HEAD_PRUNABLE = {("timm.layers.attention", "Attention"), ("timm.models.swin_transformer", "WindowAttention")}


def head_prunable_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if (type(module).__module__, type(module).__name__) in HEAD_PRUNABLE
            and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear)]


@torch.no_grad()
def remove_heads(attention: nn.Module, ratio: float, score=WEIGHT_SCORES["l2"]) -> None:
    """Remove round(ratio × heads) heads (at least one stays) of least summed `score` over their qkv rows and proj
    columns (and their relative-position bias, where the attention has one)."""
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
    table = getattr(attention, "relative_position_bias_table", None)  # Swin: one bias column per head
    if isinstance(table, nn.Parameter) and table.shape[-1] == heads:
        attention.relative_position_bias_table = nn.Parameter(table[:, keep].clone())
    attention.num_heads = keep_count
    attention.head_dim = head_dim
    if hasattr(attention, "attn_dim"):
        attention.attn_dim = keep_count * head_dim


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's GluMlp (EVA-02, …): one fc1 whose output is split into a value half and a gate half, which the
    dependency graph cannot follow (it would remove a channel from one half only)."""
    return [(name, module) for name, module in model.named_modules()
            if (type(module).__module__, type(module).__name__) == ("timm.layers.mlp", "GluMlp")
            and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear)]


@torch.no_grad()
def remove_gated_hidden(mlp: nn.Module, ratio: float, round_to: int = 1, score=WEIGHT_SCORES["l2"]) -> None:
    """Remove a GluMlp's hidden channels of least summed `score` over their value row, gate row (of fc1), norm and
    fc2 column."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    hidden = fc2.in_features
    keep_count = max(round_to, int(round(hidden * (1 - ratio) / round_to)) * round_to)
    if keep_count >= hidden:
        return
    halves = score(fc1.weight).sum(1).view(2, hidden).sum(0)
    keep_gated_hidden(mlp, torch.argsort(halves + score(fc2.weight).sum(0), descending=True)[:keep_count])


@torch.no_grad()
def keep_gated_hidden(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the hidden channels `keep` of a GluMlp: row j and row hidden + j of fc1 go together."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    hidden, keep = fc2.in_features, torch.sort(keep).values
    rows = torch.cat([keep, keep + hidden])
    fc1.weight = nn.Parameter(fc1.weight[rows].clone())
    if fc1.bias is not None:
        fc1.bias = nn.Parameter(fc1.bias[rows].clone())
    fc1.out_features = len(rows)
    norm = mlp.norm
    if isinstance(norm, nn.LayerNorm):
        norm.weight = nn.Parameter(norm.weight[keep].clone())
        norm.bias = nn.Parameter(norm.bias[keep].clone()) if norm.bias is not None else None
        norm.normalized_shape = (len(keep),)
    fc2.weight = nn.Parameter(fc2.weight[:, keep].clone())
    fc2.in_features = len(keep)


register(
    PruneMethod(
        "structured",
        remove_channels,
        "Remove block-internal channels (MLP neurons, inner / expansion convs, found by the dependency graph) and"
        " attention heads of least importance (L2, L1 or Taylor): a physically smaller model.",
        structured=True,
        options={"round_to": 1, "heads": True, "importance": "l2", "scope": "auto"},
        choices={"importance": ("l2", "l1", "taylor"), "scope": SCOPES},
        calibration_when={"importance": ("taylor",)},
    )
)
