"""timm models: building the dense model and the per-family adapter.

Everything that knows about a model family's layout lives here (layer groups, which layers a method may touch,
attention metadata after removal), so that pruning methods stay family-agnostic. Saving and loading a pruned
model is saved.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from autoprune.errors import AutopruneError


@dataclass(frozen=True)
class ModelSource:
    """How to build the dense architecture; the weights travel separately (a state dict in Ray's object store)."""

    name: str  # timm model name
    num_classes: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth…)

    def create(self, *, pretrained: bool = False) -> nn.Module:
        import timm

        if not timm.is_model(self.name):
            hint = _closest_names(self.name, timm.list_models())
            hint = f" Did you mean {', '.join(hint)}?" if hint else " (`timm.list_models()` lists them.)"
            raise AutopruneError(f"model.name: {self.name!r} is not a timm model.{hint}")
        try:
            return timm.create_model(self.name, pretrained=pretrained, num_classes=self.num_classes, **self.kwargs)
        except Exception as error:  # noqa: BLE001 — timm's constructors reject values with any exception
            weights = " with its pretrained weights (they need the hub, or timm's local cache)" if pretrained else ""
            raise AutopruneError(f"{'model.kwargs' if self.kwargs else 'model.name'}: timm cannot build"
                                 f" {self.name!r}{weights} from num_classes {self.num_classes} and kwargs"
                                 f" {dict(self.kwargs)} ({type(error).__name__}: {_first_line(error)})") from None


def native_image_size(name: str, kwargs: Mapping[str, Any]) -> int | None:
    """The square image size a timm model is built for, without building it: its `img_size` kwarg, else its default
    pretrained config's input size (224 for most; 384 for a `…_384`). None for an unknown name or a non-square size."""
    size = kwargs.get("img_size")
    if size is None:
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(name) if isinstance(name, str) else None
        size = config.input_size[1:] if config is not None and config.input_size else None
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _closest_names(name: str, known: list[str], n: int = 5) -> list[str]:
    """The known names nearest to a misspelt one (a letter off, a dash for an underscore, another case), nearest
    first; then, if fewer, the family's names (sharing the part before the first underscore)."""
    import difflib

    wanted = name.lower().replace("-", "_")
    lowered = {candidate.lower(): candidate for candidate in known}
    close = [lowered[c] for c in difflib.get_close_matches(wanted, list(lowered), n=n, cutoff=0.75)]
    family = wanted.split("_")[0]
    close += [c for c in known if c.lower().split("_")[0] == family and c not in close]
    return close[:n]


@dataclass(frozen=True)
class LayerGroup:
    """A named set of prunable layers (module names, in forward order): one per-layer sparsity dimension."""

    name: str
    layers: tuple[str, ...]


POOLED_GROUP = "all"  # the single group that global sparsity uses: every prunable layer, one threshold


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read with `weights_only=True` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise AutopruneError(f"model.checkpoint: {str(path)!r} {what}; give a .safetensors or .pt file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign files fail in many ways; the user's fix is the same
        raise AutopruneError(
            f"model.checkpoint: cannot read {str(path)!r} ({type(error).__name__}: {_first_line(error)});"
            " it must be a safetensors file or a torch state dict saved with torch.save."
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):  # common training-script layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise AutopruneError(f"model.checkpoint: {str(path)!r} holds a {type(state).__name__}, not a state dict.")
    return state


def _first_line(error: Exception) -> str:
    """An exception's first line: torch's and timm's go on for paragraphs, and an error here is one line."""
    return (str(error).strip().splitlines() or [""])[0][:300]


def load_dense(
    source: ModelSource, *, pretrained: bool = False, checkpoint: str | Path | None = None
) -> nn.Module:
    """The dense model: timm's pretrained weights, a local checkpoint file, or random init (then train it)."""
    model = source.create(pretrained=pretrained)
    if checkpoint is not None:
        try:
            missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
        except RuntimeError as error:  # tensors of other shapes: another variant, or another num_classes
            shapes = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            raise AutopruneError(f"model.checkpoint: {str(checkpoint)!r} does not fit {source.name!r} with"
                                 f" num_classes {source.num_classes} and model.kwargs {dict(source.kwargs)}"
                                 f" ({'; '.join(shapes[:2]) or str(error).splitlines()[0]})") from None
        if missing or unexpected:
            raise AutopruneError(
                f"model.checkpoint: {str(checkpoint)!r} does not fit {source.name!r}"
                f" (missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]})."
            )
    return model.eval()


def classifier_layers(model: nn.Module) -> set[nn.Module]:
    """The classifier's modules (timm's `get_classifier()`: one head, or several such as a distillation head)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return {module for head in heads if isinstance(head, nn.Module) for module in head.modules()}


# a "stem" holding more of the weights, or of the layers, than this is the network (VGG's `features`)
STEM_SHARE, STEM_LAYERS = 0.1, 0.25


def stem_layers(model: nn.Module) -> set[str]:
    """The image stem's Conv2d / Linear layers: everything inside the top-level module that holds timm's
    `first_conv` (a deep stem's three convs, a ViT's patch embedding, LeViT's and HGNet's conv stacks) — unless that
    module is most of the network, then the first conv(s) alone. Models without `first_conv`: their first conv
    that reads the 3 image channels."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    firsts = [first] if isinstance(first, str) else list(first or ())
    firsts = [name for name in firsts if name in layers]
    if not firsts:
        reading_pixels = [name for name, module in layers.items()
                          if isinstance(module, nn.Conv2d) and module.in_channels == 3]
        return set(reading_pixels[:1])
    tops = {name.split(".")[0] for name in firsts}
    stem = {name for name in layers if name.split(".")[0] in tops}
    total = sum(module.weight.numel() for module in layers.values())
    weights = sum(layers[name].weight.numel() for name in stem)
    if weights > STEM_SHARE * total or len(stem) > STEM_LAYERS * len(layers):
        return set(firsts)
    return stem


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv2d layers a method may prune: all but the classifier and the image stem (`stem_layers`):
    the stem sees raw pixels, and pruning it costs much accuracy for little speed."""
    classifier, stem = classifier_layers(model), stem_layers(model)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module not in classifier and name not in stem]


def layer_groups(model: nn.Module) -> tuple[LayerGroup, ...]:
    """The model's prunable layers grouped by stage, in depth order: the unit that per-layer sparsity searches over.

    Stages are the ones timm exposes (`feature_info`: the module at the end of each stage). A layer belongs to the
    first stage that ends at or after it; the layers after the last stage (a head's convs) form their own group. A
    stage that is a single transformer block is split into its direct children (a ViT block's `attn` and `mlp`),
    since attention and MLP take sparsity very differently. Models without `feature_info` get one group per
    top-level module."""
    layers = [name for name, _ in prunable_layers(model)]
    ends = _stage_ends(model)
    if not ends:
        return _grouped(layers, lambda name: name.split(".")[0])
    groups: list[LayerGroup] = []
    remaining = list(layers)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for stage, last in ends:
        members = [name for name in remaining if order[name] <= last]
        remaining = remaining[len(members):]
        if members:
            groups.extend(_split_block(model, stage, members))
    if remaining:
        groups.extend(_grouped(remaining, lambda name: name.split(".")[0]))
    return tuple(groups)


def _stage_ends(model: nn.Module) -> list[tuple[str, int]]:
    """timm's stage modules, each with the position (in `named_modules` order) of its last submodule."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not all(isinstance(entry, dict) for entry in info):
        return []
    names = [name for name, _ in model.named_modules()]
    ends = []
    for entry in info:
        stage = entry.get("module")
        if stage not in names:
            continue
        inside = [index for index, name in enumerate(names) if name == stage or name.startswith(f"{stage}.")]
        ends.append((stage, max(inside)))
    return sorted(ends, key=lambda end: end[1])


def _split_block(model: nn.Module, stage: str, members: list[str]) -> list[LayerGroup]:
    """One group for a stage; a transformer block (one stage holding an attention module as a direct child) is
    split by its children."""
    inside = all(name.startswith(f"{stage}.") for name in members)
    children = dict(model.get_submodule(stage).named_children()) if inside else {}
    if any(is_attention(child) for child in children.values()):
        return _grouped(members, lambda name: ".".join(name.split(".")[: stage.count(".") + 2]))
    return [LayerGroup(stage if inside else _span_name(members), tuple(members))]


def _grouped(layers: list[str], key) -> list[LayerGroup]:
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(key(name), []).append(name)
    return [LayerGroup(name, tuple(members)) for name, members in groups.items()]


def _span_name(layers: list[str]) -> str:
    """A name for layers that span several modules: their common prefix and the range they cover (`blocks.3-4`,
    `stem-stages.0`)."""
    first, last = layers[0].split("."), layers[-1].split(".")
    common = 0
    while common < min(len(first), len(last)) - 1 and first[common] == last[common]:
        common += 1

    def part(path: list[str]) -> str:  # a container and its index (`stages.0`), or one module name
        indexed = common + 1 < len(path) and path[common + 1].isdigit() and not path[common].isdigit()
        return ".".join(path[common: common + 2]) if indexed else path[common]

    span = part(first) if part(first) == part(last) else f"{part(first)}-{part(last)}"
    return ".".join(first[:common] + [span])


def pooled_group(model: nn.Module) -> LayerGroup:
    return LayerGroup(POOLED_GROUP, tuple(name for name, _ in prunable_layers(model)))


def internal_states(model: nn.Module) -> list[str]:
    """The modules whose outputs are the network's internal state, in depth order: timm's stage outputs (each ViT
    block's residual-stream output, each CNN stage's output). What alignment healing matches against the dense
    model; where pruning changed a state's width (a plain CNN without residuals) alignment skips it."""
    return [stage for stage, _ in _stage_ends(model)]


def is_attention(module: nn.Module) -> bool:
    """A multi-head attention module: the innermost module that holds a head count or, for timm's attentions
    without one (EfficientViT's LiteMLA), is one by its kind. Innermost, because blocks that wrap an attention
    (MaxViT's PartitionAttention, Swin's blocks) hold MLPs too."""
    return _looks_like_attention(module) and not any(
        _looks_like_attention(inner) for inner in module.modules() if inner is not module)


def _looks_like_attention(module: nn.Module) -> bool:
    heads = getattr(module, "num_heads", getattr(module, "heads", None))
    kind = type(module).__name__
    return isinstance(heads, int) or "Attention" in kind or kind.endswith("MLA")


def attention_layers(model: nn.Module) -> set[str]:
    """The prunable layers inside attention modules (their q/k/v and output projections)."""
    inside = {f"{name}." for name, module in model.named_modules() if name and is_attention(module)}
    return {name for name, _ in prunable_layers(model) if any(name.startswith(prefix) for prefix in inside)}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm attention modules (a `qkv` Linear and a head count), with their names."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "num_heads") and isinstance(getattr(module, "qkv", None), nn.Linear)]


# attention attributes that are widths of all heads together (timm's names), which head removal scales
HEAD_WIDTHS = ("attn_dim", "val_attn_dim", "out_dim", "dh", "nh_kd", "all_head_dim", "inner_dim")


def attention_settings(model: nn.Module) -> dict[str, dict[str, int]]:
    """Each attention's head count and the widths that follow it: what a saved model must restore (fewer heads and
    narrower heads have the same tensor shapes) and what tells two structures apart."""
    settings = {}
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        if is_attention(module) and isinstance(heads, int) and not isinstance(heads, bool):
            found = {key: getattr(module, key, None) for key in ("num_heads", "head_dim", *HEAD_WIDTHS)}
            settings[name] = {key: value for key, value in found.items()
                              if isinstance(value, int) and not isinstance(value, bool)}
    return settings


def restore_attention_settings(model: nn.Module, settings: dict[str, dict[str, int] | int]) -> None:
    """Set what `attention_settings` read (a bare int: a head count, as models saved before these were kept)."""
    modules = dict(model.named_modules())
    for name, values in settings.items():
        for key, value in ({"num_heads": values} if isinstance(values, int) else values).items():
            setattr(modules[name], key, value)


def fix_width_metadata(model: nn.Module) -> None:
    """After channels are removed, the modules that keep a width as a plain attribute must learn the new one, or
    their reshapes fail: timm's Attention (head_dim, attn_dim), MetaFormer's Scale (the shape its per-channel
    scale is viewed as, which a residual stream's removal narrows)."""
    for _, module in attention_modules(model):
        if not hasattr(module, "head_dim") or module.qkv.out_features % (3 * module.num_heads):
            continue  # not timm's (q|k|v, head, dim) layout
        width = module.qkv.out_features // 3
        module.head_dim = width // module.num_heads
        if hasattr(module, "attn_dim"):
            module.attn_dim = width
    for module in model.modules():
        scale, shape = getattr(module, "scale", None), getattr(module, "shape", None)
        if isinstance(scale, nn.Parameter) and isinstance(shape, tuple) and shape and shape[0] != scale.numel():
            module.shape = (scale.numel(), *shape[1:])


@dataclass(frozen=True)
class HiddenChannels:
    """Channels private to one block: made by `producer` (then its norm, then an activation) and read only by
    `consumer`, whose output goes on through `consumer_norm` (if any). Such channels can be removed or reordered
    without touching the rest of the network: a ViT MLP's hidden neurons (fc1 → act → fc2), a ResNet block's inner
    convs (conv_k → bn_k → act → conv_k+1)."""

    producer: str
    consumer: str
    producer_norm: str | None = None
    consumer_norm: str | None = None


def hidden_channels(model: nn.Module) -> list[HiddenChannels]:
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        linear = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)  # timm Mlp: fc1 → act → (norm) → fc2
        pointwise = (isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d)  # timm ConvMlp (small ConvNeXts)
                     and fc1.groups == 1 and fc2.groups == 1 and fc2.kernel_size == (1, 1))
        if linear or pointwise:
            norm = f"{prefix}norm" if getattr(getattr(module, "norm", None), "weight", None) is not None else None
            found.append(HiddenChannels(f"{prefix}fc1", f"{prefix}fc2", producer_norm=norm))
        for k in (1, 2):  # timm ResNet BasicBlock / Bottleneck
            conv, bn, after = (getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None),
                               getattr(module, f"conv{k + 1}", None))
            if (isinstance(conv, nn.Conv2d) and isinstance(after, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and conv.groups == 1 and after.groups == 1):
                next_bn = getattr(module, f"bn{k + 1}", None)
                found.append(HiddenChannels(f"{prefix}conv{k}", f"{prefix}conv{k + 1}", f"{prefix}bn{k}",
                                            f"{prefix}bn{k + 1}" if isinstance(next_bn, nn.BatchNorm2d) else None))
    return found


@torch.no_grad()
def observe_inputs(model: nn.Module, watched: Mapping[str, nn.Module], images: torch.Tensor, on_input,
                   batch_size: int = 32) -> None:
    """Run `images` through the model in eval mode, calling `on_input(name, module, input)` whenever a watched
    module is entered: the one pass that calibration statistics (VBP, CAST) are gathered in."""
    handles = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: on_input(name, module, inputs[0])) for name, module in watched.items()]
    try:
        model.eval()
        for batch in images.split(batch_size):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
