"""Which channels of a model can be removed together, read off Torch-Pruning's dependency graph.

Removing a layer's output channels must also remove the inputs that read them, in every layer that does (norms,
depthwise convs, concatenations, residual sums). Torch-Pruning finds those couplings by tracing the model, for any
family, and groups them; this module sorts its groups into two kinds:

- **internal**: channels written by one layer (or by the parallel projections of one module, like a gated MLP's
  two `fc1`s) and read inside one block: a ViT or Mixer MLP's hidden neurons, a ResNet / RegNet / ConvNeXt block's
  inner convs, an inverted residual's expansion (through its depthwise conv and squeeze-excitation), every conv of
  a VGG, a DenseNet layer's bottleneck. Removing them makes that block smaller and leaves every other width as it
  was.
- **stream**: channels summed from several writers (a residual stream, re-parameterisable branches) or
  concatenated (DenseNet's features). Removing one touches a whole stage; structured removal leaves them.

Several writers joined by a product stay internal (a squeeze-excitation gate, a gated MLP's two `fc1`s); joined
by a sum they are a stream.

Attention modules are single opaque nodes of the graph: a group that reaches one is not internal (their q/k/v
widths are tied to head counts; heads go whole, see structured.remove_heads). The classifier's outputs (the
classes) are never removed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoprune.errors import Unsupported
from autoprune.models import classifier_layers, is_attention


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can only be removed together, with who writes and who reads them."""

    root: str  # the layer whose output channels index the group (what `remove` takes indices of)
    producers: tuple[str, ...]  # layers that write these channels (the root first; not depthwise convs)
    consumers: tuple[str, ...]  # layers that read them (Conv2d / Linear inputs; not depthwise convs)
    width: int
    # Grouped convs among its layers split the channels into this many equal slices; a removal takes the same
    # positions out of every slice, or the convs' weights would no longer line up with their groups.
    slices: int
    internal: bool
    dependencies: Any  # Torch-Pruning's group over all channels (scored by its importance criteria)
    # a residual stream: written by several layers whose outputs are summed (a stage's blocks, re-parameterisable
    # branches), read by every block of the stage; removable as one group, which narrows the whole stage
    stream: bool = False
    # depthwise convs the channels pass through (they lose the same channels, inputs and outputs as one)
    through: tuple[str, ...] = ()


def _guard(name: str, error: type[Exception], recover) -> None:
    """Wrap Torch-Pruning's index-mapping step `name` (once per process) so that `error` inside it calls
    `recover(node, error)` instead of ending the whole trace."""
    from torch_pruning.dependency import index_mapping

    original = getattr(index_mapping, name)
    if getattr(original, "guarded", False):
        return

    def guarded(graph, node) -> None:
        try:
            original(graph, node)
        except error as raised:
            recover(node, raised)

    guarded.guarded = True
    setattr(index_mapping, name, guarded)


def _unmap_concat(cat_node, error: TypeError) -> None:
    """Torch-Pruning 1.6.1 sums a concatenation's input widths before it checks that it could infer them all
    (`update_concat_index_mapping`: `sum(chs)` with a None among them, a TypeError — a CSPDarknet's Focus stem, CoaT,
    EfficientViT-MSRA). Where one is unknown it means to leave the concatenation unmapped (its next line returns on a
    None); this does that, and forgets the partial sizes so that its concat pruner skips the node too. A group that
    would need the mapping breaks the model, which the caller sees."""
    if cat_node.module.concat_sizes is None or None not in cat_node.module.concat_sizes:
        raise error
    cat_node.module.concat_sizes = None


def _unmap_reshape(reshape_node, error: ZeroDivisionError) -> None:
    """Torch-Pruning 1.6.1 maps a reshape's indices by the ratio of the widths it infers on either side, and divides
    by zero where it infers none after it (SHViT's single-head attention, reshaping `v @ attn` back to an image).
    This leaves such a reshape unmapped and marks it `unmapped`: a group whose channels pass it is not removed
    (`channel_groups`)."""
    reshape_node.module.unmapped = True


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's dependency graph of `model`, with every attention module as one opaque node: its layers are
    not nodes of their own (their widths are tied to head counts), and a group that reaches it is not internal.
    The graph traces with autograd (through the attention's functional operations too), with gradients on."""
    import torch_pruning as tp

    _guard("update_concat_index_mapping", TypeError, _unmap_concat)
    _guard("update_reshape_index_mapping", ZeroDivisionError, _unmap_reshape)
    opaque = {type(module): _Opaque() for module in model.modules() if is_attention(module)}
    training = model.training  # Torch-Pruning traces in eval mode and leaves the model there
    with warnings.catch_warnings():  # unwrapped parameters such as pos_embed are never pruned here
        warnings.simplefilter("ignore")
        try:
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, verbose=False, customized_pruners=opaque)
        except Exception as error:  # an operation Torch-Pruning's tracer does not follow
            raise Unsupported(
                f"Torch-Pruning cannot trace {type(model).__name__}'s channels ({type(error).__name__}: {error});"
                " methods that remove channels cannot prune it, use an unstructured method (magnitude, nm)."
            ) from None
        finally:
            model.train(training)


class _Opaque:
    """The graph's handler for an attention module: its channel counts, and a refusal to remove any (a group that
    reaches an attention is never internal, so this is never called by structured removal)."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} channels are not removed through the dependency graph")

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} channels are not removed through the dependency graph")

    def get_out_channels(self, layer: nn.Module) -> int:
        return _io_widths(layer)[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return _io_widths(layer)[0]

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1


def _io_widths(layer: nn.Module) -> tuple[int, int]:
    """An attention's input width (its first projection's) and output width (its last's)."""
    projections = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, last = projections[0], projections[-1]
    return (first.in_features if isinstance(first, nn.Linear) else first.in_channels,
            last.out_features if isinstance(last, nn.Linear) else last.out_channels)


def channel_groups(model: nn.Module, graph, *, streams: bool = False) -> list[ChannelGroup]:
    """The groups of `model`'s Conv2d / Linear output channels that may be internal, in model order, each with
    what the graph says of it; with `streams`, the residual streams too. Roots whose channels reach an attention
    are never expanded into groups (and, without `streams`, neither are those that reach a residual sum):
    Torch-Pruning's index bookkeeping through every reshape of a token sequence can take minutes, and an
    attention's widths are tied to its heads."""
    import torch_pruning as tp

    names = {module: name for name, module in model.named_modules()}
    classifier = classifier_layers(model)
    found, visited = [], set()
    for module, node in list(graph.module2node.items()):
        if (not isinstance(module, (nn.Conv2d, nn.Linear)) or module in classifier or module in visited
                or module not in names or _depthwise(module)):
            continue
        reaches = _reaches(node, look_past_sums=streams)
        if reaches == "attention" or (reaches == "sum" and not streams):
            continue
        group = _bounded_group(graph, module)
        if group is None:  # a walk that runs away (see _bounded_group): the root's channels are left whole
            continue
        writers, readers, through, slices = [], [], [], set()
        joined, split, summed, attends = False, False, False, False
        misread = False  # the graph's indices would not line up with some layer's channels
        for dependency, _ in group:
            target, kind = dependency.target.module, dependency.target.type
            joined |= kind == tp.ops.OPTYPE.CONCAT
            # a layer's outputs split into parts that meet again (a GLU's value and gate halves): Torch-Pruning
            # would remove a channel from one half only
            split |= kind in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND)
            summed |= _is_sum(dependency.target)
            attends |= isinstance(target, nn.Module) and is_attention(target)
            if _depthwise(target) and target in names:
                through.append(names[target])
            # a reshape the graph could not map, or a functional conv whose weight is no layer's (a blur pool's
            # per-channel filter buffer): nothing would remove their channels
            misread |= getattr(target, "unmapped", False) or getattr(target, "_grad_fn", None) == "ConvolutionBackward0"
            if not isinstance(target, (nn.Conv2d, nn.Linear)) or target not in names or _depthwise(target):
                continue
            if isinstance(target, nn.Conv2d) and target.groups > 1:
                slices.add(target.groups)
            if graph.is_out_channel_pruning_fn(dependency.handler):
                writers.append(names[target])
                visited.add(target)
                # a writer of another width: the channels went through a reshape that regroups them (a split
                # attention's radix × channels viewed as radix, channels), which Torch-Pruning maps as a flatten
                misread |= _width(target) != _width(module)
            elif graph.is_in_channel_pruning_fn(dependency.handler):
                readers.append(names[target])
                misread |= _in_width(target) % _width(module) != 0  # (a flatten reads a multiple of them)
        parts = next(iter(slices)) if len(slices) == 1 else 1
        divisible = len(slices) <= 1 and _width(module) // parts > 1
        # concatenated features (DenseNet's growth channels) are left: Torch-Pruning's scores over a concatenation
        # do not line up with its indices (an IndexError in 1.6.1)
        usable = divisible and not (split or joined or attends or misread) and bool(writers) and bool(readers)
        found.append(ChannelGroup(names[module], _unique(writers), _unique(readers), _width(module), parts,
                                  usable and not summed, group, stream=usable and summed, through=_unique(through)))
    return found


# A group's walk that grows past these has run away: a residual sum over a slice of the channels (ReXNet's
# `x[:, :c] + shortcut`, concatenated back) revisits its nodes with ever new index lists, and reshapes between
# channels and tokens (EfficientViM, iFormer, FocalNet's modulation) multiply them; Torch-Pruning 1.6.1 follows
# either for minutes to hours. The groups that do end stay inside (InceptionNeXt's streams: 2,616 entries, 64,000
# indices; ResNeSt's split attention past layer1 goes: up to 2.2M indices, seconds each, and unusable anyway).
GROUP_ENTRIES = 4000
GROUP_INDICES = 200_000


class _RunawayGroup(Exception):
    pass


def _bounded_group(graph, module: nn.Module):
    """Torch-Pruning's group of all of `module`'s output channels, or None where its walk runs away: more than
    GROUP_ENTRIES entries before merging, or more than GROUP_INDICES channel indices made (an index list passed on
    unchanged counts once)."""
    from torch_pruning.dependency import graph as tp_graph

    plain = tp_graph.Group

    class Bounded(plain):
        def add_dep(self, dep, idxs):
            seen = self.__dict__.setdefault("_seen", set())
            if id(idxs) not in seen:  # (the lists stay alive in the group: an id is not reused)
                seen.add(id(idxs))
                self._made = getattr(self, "_made", 0) + len(idxs)
            if len(self._group) >= GROUP_ENTRIES or self._made > GROUP_INDICES:
                raise _RunawayGroup
            super().add_dep(dep, idxs)

    tp_graph.Group = Bounded  # get_pruning_group builds its groups with this name
    try:
        group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels,
                                        list(range(_width(module))))
    except _RunawayGroup:
        return None
    finally:
        tp_graph.Group = plain
    group.__class__ = plain
    return group


def _reaches(root, *, look_past_sums: bool = False, limit: int = 4000) -> str | None:
    """Whether the channels of `root` (a graph node) plainly meet a residual sum ("sum") or an attention
    ("attention"; also when the walk grows past `limit` nodes): a walk over the nodes they pass through unchanged
    (norms, activations, depthwise convs, products, reshapes, and with `look_past_sums` sums), stopping at the
    layers that write or read them. Cheap: no index bookkeeping."""
    seen, frontier, summed = {root}, [root], False
    while frontier:
        node = frontier.pop()
        for neighbour in node.outputs if node is root else node.inputs + node.outputs:  # not the root's inputs
            if neighbour in seen:
                continue
            seen.add(neighbour)
            module = neighbour.module
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not _depthwise(module):
                continue  # a writer or a reader: the channels end here
            if (isinstance(module, nn.Module) and is_attention(module)) or len(seen) > limit:
                return "attention"
            if _is_sum(neighbour):
                if not look_past_sums:
                    return "sum"
                summed = True
            frontier.append(neighbour)
    return "sum" if summed else None


def _is_sum(node) -> bool:
    """A residual sum (or summed branches): the channels are a stream, written in several places. Adding a constant
    or a parameter that is no node of the graph (StarReLU's `+ bias`, a scalar) has one input: it is no stream."""
    return str(getattr(node.module, "_grad_fn", "")) in _SUMS and len(node.inputs) >= 2


_SUMS = {"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1"}  # autograd's names for + and −


def remove(graph, model: nn.Module, group: ChannelGroup, channels: list[int]) -> None:
    """Remove `channels` (indices of the root's outputs) and everything coupled to them."""
    root = dict(model.named_modules())[group.root]
    prune_out = graph.get_pruner_of_module(root).prune_out_channels
    pruning = graph.get_pruning_group(root, prune_out, idxs=sorted(channels))
    # Torch-Pruning slices a conv's or linear's weight and bias; a subclass's own per-output-channel parameters (a
    # scaled weight-standardised conv's gain) must lose the same rows
    own = [(dependency.target.module, idxs) for dependency, idxs in pruning
           if isinstance(dependency.target.module, (nn.Conv2d, nn.Linear))
           and graph.is_out_channel_pruning_fn(dependency.handler)]
    own = [(layer, idxs, _width(layer)) for layer, idxs in own]
    pruning.prune()
    for layer, idxs, width in own:
        _prune_own_parameters(layer, idxs, width)


def _prune_own_parameters(layer: nn.Module, idxs, width: int) -> None:
    """Remove rows `idxs` from the parameters of `layer` other than weight and bias that have `width` rows."""
    removed = {int(getattr(index, "idx", index)) for index in idxs}  # (Torch-Pruning's (idx, root_idx) pairs)
    keep = [index for index in range(width) if index not in removed]
    for key, parameter in list(layer.named_parameters(recurse=False)):
        if key not in ("weight", "bias") and parameter.dim() > 0 and parameter.shape[0] == width:
            setattr(layer, key, nn.Parameter(parameter.data[keep].clone(), requires_grad=parameter.requires_grad))


def slice_positions(scores: torch.Tensor, slices: int, keep: int) -> list[int]:
    """The channels to remove so that `keep` positions of each of `slices` equal slices stay: the positions of least
    score summed over the slices, taken out of every slice."""
    per_slice = scores.reshape(slices, -1)
    width = per_slice.shape[1]
    drop = torch.argsort(per_slice.sum(0))[: width - keep].tolist()
    return [s * width + position for s in range(slices) for position in drop]


def _depthwise(module: nn.Module) -> bool:
    """A depthwise conv couples its inputs to its outputs one to one: it neither writes nor reads a group."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.out_channels == module.in_channels


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
