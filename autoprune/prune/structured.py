"""Structured removal of hidden neurons, channels and attention heads, which physically shrinks the model.

Which channels may go is read off Torch-Pruning's dependency graph (prune/channels.py), for any timm family:
every *internal* channel group — written by one layer and read inside one block (a ViT / Mixer MLP's hidden
neurons, a ResNet, RegNet or ConvNeXt block's inner convs, an inverted residual's expansion through its depthwise
conv and squeeze-excitation, a VGG conv, a DenseNet bottleneck) — and, with option `scope`, the residual streams
(a stage's width, for families whose every conv feeds a sum: RepVGG, MobileOne, HGNet); the graph removes the
coupled inputs, norms and depthwise convs with them. How many go is solved per layer group (`channel_ratios`): the
group loses the share of its *weights* asked, taken from the layers that can lose any.

Attention heads (option `heads`, on by default) go whole wherever a probe confirms where a head's rows sit
(prune/heads.py: ViT, Swin, SAM, Hiera, TinyViT, Twins' local attention, VOLO, … — their q, k and v rows, `proj`
columns and per-head biases are sliced out inside the one module). Other attentions (DaViT's and PVT's reshape their
output to their input's width) keep their heads; the rest of their layer group loses more instead.

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
from autoprune.prune.heads import head_layouts, projections, prune_heads
from autoprune.prune.masks import Masks


def remove_channels(model: nn.Module, request: PruneRequest) -> Masks:
    import torch_pruning as tp

    if request.example_inputs is None:
        raise AutopruneError("structured pruning needs example inputs to trace the model.")
    round_to = int(request.options["round_to"])
    asked = {layer: request.sparsity[group.name] for group in request.groups for layer in group.layers}
    kind = request.options["importance"]
    if kind == "taylor":
        _loss_gradients(model, request.calibration)
    layouts = head_layouts(model, request.example_inputs) if request.options["heads"] else {}
    gated = {name: mlp for name, mlp in gated_mlps(model) if asked.get(f"{name}.fc1")}
    scope = request.options["scope"]
    graph = dependency_graph(model, request.example_inputs)
    found = [group for group in channel_groups(model, graph, streams=scope != "internal")
             # written by a layer that stays whole (the stem), even if an SE gate also writes it: left whole
             if all(name in asked for name in group.producers)]
    modules = dict(model.named_modules())
    if scope == "auto":
        scope = _auto_scope(Removable([group for group in found if group.internal], layouts, gated), asked, modules)
    groups = [group for group in found
              if (group.internal and scope != "stream") or (group.stream and scope != "internal")]
    if not groups and not gated and not layouts:
        raise Unsupported(_nothing_in_scope(model, scope))
    ratios = channel_ratios(request, Removable(groups, layouts, gated), modules)
    importance = (tp.importance.GroupTaylorImportance() if kind == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2))
    for group in groups:
        # a stream's writers may sit in several layer groups (blocks of a stage at different depths): their mean
        ratio = sum(ratios[name] for name in group.producers) / len(group.producers)
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
    # inside one module, where the graph does not look (its attention is opaque, a GLU's split halves it cannot
    # follow); their input and output widths stay, so the graph's removals above are not disturbed
    prune_heads(model, layouts, ratios, WEIGHT_SCORES[kind])
    for name, mlp in gated.items():
        remove_gated_hidden(mlp, ratios[f"{name}.fc1"], round_to, WEIGHT_SCORES[kind])
    fix_width_metadata(model)
    model.zero_grad(set_to_none=True)
    _must_still_run(model, request.example_inputs)
    return Masks()


class Removable:
    """Which layers lose output channels and which lose input channels, when `groups` are removed along with the
    heads of the attentions in `layouts` and the hidden channels of the gated MLPs in `gated`."""

    def __init__(self, groups, layouts: dict, gated: dict) -> None:
        self.outputs = {name for group in groups for name in (*group.producers, *group.through)}
        self.inputs = {name for group in groups for name in group.consumers}
        for name, slicing in layouts.items():
            outputs, inputs = projections(name, slicing)
            self.outputs.update(outputs)
            self.inputs.update(inputs)
        self.outputs.update(f"{name}.fc1" for name in gated)
        self.inputs.update(f"{name}.fc2" for name in gated)

    def share_lost(self, layer: str, ratio: float) -> float:
        """The share of `layer`'s weights gone when `ratio` of its output and of its input channels go."""
        kept_out = 1 - ratio if layer in self.outputs else 1.0
        kept_in = 1 - ratio if layer in self.inputs else 1.0
        return 1 - kept_out * kept_in


MAX_CHANNEL_RATIO = 0.9  # no layer loses more of its channels than this, whatever its group asks


def channel_ratios(request: PruneRequest, removable: Removable, modules: dict[str, nn.Module]) -> dict[str, float]:
    """The share of channels (and heads) to remove in each layer so that each layer group loses the share of its
    weights it asks for, taken from the layers that can lose any: a group whose attention keeps its heads (their
    layout is unknown) loses more of its MLP; a layer that loses inputs and outputs (a VGG conv, a RepVGG stream)
    loses 1 - (1 - r)² of its weights. At most MAX_CHANNEL_RATIO; an unreachable ask is met as far as it can be."""
    ratios = {}
    for group in request.groups:
        weights = {name: modules[name].weight.numel() for name in group.layers if name in modules}
        target = request.sparsity[group.name] * sum(weights.values())

        def lost(ratio: float) -> float:
            return sum(count * removable.share_lost(name, ratio) for name, count in weights.items())

        low, high = 0.0, MAX_CHANNEL_RATIO
        if target <= 0:
            high = 0.0
        elif lost(high) > target:
            for _ in range(40):  # lost() is increasing: bisect, keeping the ratio that reaches the target
                middle = (low + high) / 2
                low, high = (middle, high) if lost(middle) < target else (low, middle)
        ratios.update(dict.fromkeys(group.layers, high))
    return ratios


AUTO_COVERAGE = 0.5  # auto: internal channels alone, when they reach at least this share of the prunable weights


def _auto_scope(internal: Removable, asked: dict[str, float], modules: dict[str, nn.Module]) -> str:
    """What `scope: auto` removes: a block's own channels (the stages keep their widths) where they, with the
    attention heads and gated MLPs, touch at least AUTO_COVERAGE of the prunable weights; residual streams where
    the model has none of these (RepVGG, MobileOne); both where they are too few to reach the sparsity asked
    (ConvMixer: a pointwise conv per block, writing the stream)."""
    touched = internal.outputs | internal.inputs
    if not touched:
        return "stream"
    weight = {name: modules[name].weight.numel() for name in asked if name in modules}
    covered = sum(count for name, count in weight.items() if name in touched) / max(1, sum(weight.values()))
    return "internal" if covered >= AUTO_COVERAGE else "both"


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


# timm MLPs whose fc1 output is split into two halves that meet again, channel j with channel hidden + j: GluMlp's
# value and gate, GatedMlp's (gMLP) spatial gating unit's u and v (v through its norm and a token-mixing proj)
GATED_MLPS = {("timm.layers.mlp", "GluMlp"), ("timm.layers.mlp", "GatedMlp")}


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's gated MLPs (EVA-02's GluMlp, gMLP's GatedMlp): one fc1 whose output is split into halves, which the
    dependency graph cannot follow (it would remove a channel from one half only)."""
    return [(name, module) for name, module in model.named_modules()
            if (type(module).__module__, type(module).__name__) in GATED_MLPS
            and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear)
            and module.fc1.out_features == 2 * module.fc2.in_features]


@torch.no_grad()
def remove_gated_hidden(mlp: nn.Module, ratio: float, round_to: int = 1, score=WEIGHT_SCORES["l2"]) -> None:
    """Remove a gated MLP's hidden channels of least summed `score` over their two rows of fc1 and their fc2
    column."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    hidden = fc2.in_features
    keep_count = max(round_to, int(round(hidden * (1 - ratio) / round_to)) * round_to)
    if keep_count >= hidden:
        return
    halves = score(fc1.weight).sum(1).view(2, hidden).sum(0)
    keep_gated_hidden(mlp, torch.argsort(halves + score(fc2.weight).sum(0), descending=True)[:keep_count])


@torch.no_grad()
def keep_gated_hidden(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the hidden channels `keep` of a gated MLP: row j and row hidden + j of fc1 go together."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    hidden, keep = fc2.in_features, torch.sort(keep).values
    rows = torch.cat([keep, keep + hidden])
    fc1.weight = nn.Parameter(fc1.weight[rows].clone())
    if fc1.bias is not None:
        fc1.bias = nn.Parameter(fc1.bias[rows].clone())
    fc1.out_features = len(rows)
    for norm in (getattr(mlp, "norm", None), getattr(getattr(mlp, "gate", None), "norm", None)):  # over one half
        if isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (hidden,):
            norm.weight = nn.Parameter(norm.weight[keep].clone()) if norm.weight is not None else None
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
