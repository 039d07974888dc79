"""Whole attention heads, removed from any timm attention whose layout a probe confirms.

timm has dozens of attention modules (ViT's, Swin's, SAM's, Hiera's, TinyViT's, DaViT's, Twins', PVT's, …). Most
share a shape: input projections (`qkv`, or `q` with `kv`, or `q`, `k`, `v`) whose rows hold each head's part, an
output projection `proj` whose columns hold each head's output, and a head count `num_heads`; some add per-head
parameters (a relative-position bias table with a column per head, TinyViT's `attention_biases`, XCiT's
`temperature`). What differs is where a head's rows sit: `qkv` rows ordered (q|k|v, head, dim) in most, (head,
q|k|v, dim) in others (TinyViT, EfficientFormer, with q, k and v of different widths).

Rather than a table of classes, each candidate is probed: the module, on the inputs it received in one forward of
the model, is run twice — once with the removed heads' `proj` columns zeroed (the heads contribute nothing, so the
output is what the smaller module must compute) and once physically without those heads under a layout guess. A
layout is used only where the two agree; where neither guess does (talking heads mixing heads, a layout of its
own), the module keeps its heads and its MLP is still pruned. A guess cannot pass by accident: the kept heads'
outputs would be computed from the wrong rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from autoprune.models import HEAD_WIDTHS, is_attention

# input projections and how many parts (q, k, v) each holds, in the order timm names them
INPUT_PROJECTIONS = {"qkv": 3, "q": 1, "k": 1, "v": 1, "kv": 2}
LAYOUTS = ("parts_first", "heads_first")  # (q|k|v, head, dim) or (head, q|k|v, dim)

Score = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeadSlicing:
    """Where each head sits in an attention's projections under one layout guess."""

    heads: int
    inputs: dict[str, int]  # projection name → parts
    layout: str

    def rows(self, module: nn.Module, name: str, heads: list[int]) -> torch.Tensor:
        """The rows of input projection `name` that belong to `heads`."""
        out, parts = getattr(module, name).out_features, self.inputs[name]
        device = getattr(module, name).weight.device  # indices where the weights are (a GPU worker's)
        if self.layout == "heads_first":
            width = out // self.heads
            return torch.cat([torch.arange(h * width, (h + 1) * width, device=device) for h in heads])
        width = out // (parts * self.heads)
        return torch.cat([torch.arange(p * out // parts + h * width, p * out // parts + (h + 1) * width, device=device)
                          for p in range(parts) for h in heads])

    def columns(self, module: nn.Module, heads: list[int]) -> torch.Tensor:
        width, device = module.proj.in_features // self.heads, module.proj.weight.device
        return torch.cat([torch.arange(h * width, (h + 1) * width, device=device) for h in heads])


def head_count(module: nn.Module) -> int | None:
    heads = getattr(module, "num_heads", None)
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None


def input_projections(module: nn.Module) -> dict[str, int]:
    """The module's linear input projections (of INPUT_PROJECTIONS), each with its number of parts."""
    return {name: parts for name, parts in INPUT_PROJECTIONS.items()
            if isinstance(getattr(module, name, None), nn.Linear)}


def candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules with linear input projections, a linear `proj` and a head count that divides them."""
    found = []
    for name, module in model.named_modules():
        heads = head_count(module)
        if not heads or not is_attention(module) or not isinstance(getattr(module, "proj", None), nn.Linear):
            continue
        inputs = input_projections(module)
        if inputs and all(getattr(module, n).out_features % (p * heads) == 0 for n, p in inputs.items()) \
                and module.proj.in_features % heads == 0 and ("qkv" in inputs or "q" in inputs):
            found.append((name, module))
    return found


@torch.no_grad()
def remove_heads(module: nn.Module, drop: list[int], slicing: HeadSlicing) -> None:
    """Remove heads `drop` from `module` in place: their input-projection rows, `proj` columns, per-head parameters
    and their share of the width attributes."""
    keep = [h for h in range(slicing.heads) if h not in set(drop)]
    widths = {module.proj.in_features} | {getattr(module, name).out_features // parts * share
                                          for name, parts in slicing.inputs.items() for share in range(1, parts + 1)}
    for name in slicing.inputs:
        layer = getattr(module, name)
        rows = slicing.rows(module, name, keep)
        layer.weight = nn.Parameter(layer.weight[rows].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows].clone())
        layer.out_features = len(rows)
    columns = slicing.columns(module, keep)
    module.proj.weight = nn.Parameter(module.proj.weight[:, columns].clone())
    module.proj.in_features = len(columns)
    index = torch.tensor(keep)
    for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        dims = [d for d, size in enumerate(tensor.shape) if size == slicing.heads]
        if len(dims) != 1 or (tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1]):
            continue  # not a per-head tensor (or ambiguous: an index table)
        sliced = tensor.detach().index_select(dims[0], index.to(tensor.device)).clone()
        setattr(module, key, nn.Parameter(sliced, requires_grad=tensor.requires_grad)
                if isinstance(tensor, nn.Parameter) else sliced)
    for attribute in HEAD_WIDTHS:  # a width of all heads: one of the projections' (before the removal)
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value in widths:
            setattr(module, attribute, value // slicing.heads * len(keep))
    for key, value in vars(module).items():
        if "cache" in key and isinstance(value, dict):
            value.clear()  # tensors computed from the per-head parameters (TinyViT's attention-bias cache)
    module.num_heads = len(keep)


def head_scores(module: nn.Module, slicing: HeadSlicing, score: Score) -> torch.Tensor:
    """Each head's summed `score` over its input-projection rows and `proj` columns."""
    inputs = {name: score(getattr(module, name).weight) for name in slicing.inputs}  # each scored once
    output = score(module.proj.weight)
    totals = torch.zeros(slicing.heads)
    for h in range(slicing.heads):
        for name, scores in inputs.items():
            totals[h] += scores[slicing.rows(module, name, [h])].sum().cpu()
        totals[h] += output[:, slicing.columns(module, [h])].sum().cpu()
    return totals


@torch.no_grad()
def _agrees(module: nn.Module, call: tuple[tuple, dict], drop: list[int], slicing: HeadSlicing) -> bool:
    """Whether removing `drop` under `slicing` computes what the module computes with those heads silenced."""
    args, kwargs = call
    silenced, smaller = copy.deepcopy(module), copy.deepcopy(module)
    silenced.eval(), smaller.eval()  # not chained: some attentions' train() returns None (TinyViT's)
    silenced.proj.weight[:, slicing.columns(module, drop)] = 0
    try:
        remove_heads(smaller, drop, slicing)
        expected, got = silenced(*args, **kwargs), smaller(*args, **kwargs)
    except Exception:  # a guess that does not even fit the module's reshapes
        return False
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)) or expected.shape != got.shape:
        return False
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp_min(1.0)))


def _calls(model: nn.Module, modules: list[nn.Module], example_inputs: torch.Tensor) -> dict[int, tuple]:
    """What each of `modules` is called with in one eval forward of `model` on one example (the first call)."""
    calls: dict[int, tuple] = {}

    def keep(module, args, kwargs):
        calls.setdefault(id(module), (args, kwargs))

    handles = [module.register_forward_pre_hook(keep, with_kwargs=True) for module in modules]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return calls


def drop_weakest(module: nn.Module, slicing: HeadSlicing, ratio: float, score: Score) -> list[int]:
    """The round(ratio × heads) heads of least `score` (at least one head stays)."""
    keep_count = max(1, slicing.heads - int(round(ratio * slicing.heads)))
    return sorted(torch.argsort(head_scores(module, slicing, score))[: slicing.heads - keep_count].tolist())


def head_layouts(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, HeadSlicing]:
    """The attentions (of more than one head) whose layout a probe confirms, each with where its heads sit: the
    probe removes half the heads, on what the module received in one forward of `model`."""
    wanted = [(name, module) for name, module in candidates(model) if head_count(module) > 1]
    calls = _calls(model, [module for _, module in wanted], example_inputs)
    layouts = {}
    for name, module in wanted:
        if id(module) not in calls:
            continue  # never called (a block the model skips at this input size)
        inputs = input_projections(module)
        for layout in LAYOUTS:
            slicing = HeadSlicing(head_count(module), inputs, layout)
            if _agrees(module, calls[id(module)], list(range(slicing.heads // 2)), slicing):
                layouts[name] = slicing
                break
    return layouts


def projections(name: str, slicing: HeadSlicing) -> tuple[list[str], list[str]]:
    """The layers of attention `name` that lose outputs (its input projections) and inputs (`proj`) with heads."""
    return [f"{name}.{layer}" for layer in slicing.inputs], [f"{name}.proj"]


def prune_heads(model: nn.Module, layouts: dict[str, HeadSlicing], ratios: dict[str, float], score: Score) -> None:
    """Remove round(ratio × heads) heads (at least one stays) of least `score` from each attention of `layouts`,
    `ratio` being its first input projection's."""
    modules = dict(model.named_modules())
    for name, slicing in layouts.items():
        module = modules[name]
        ratio = ratios.get(projections(name, slicing)[0][0], 0.0)
        drop = drop_weakest(module, slicing, ratio, score)
        if drop:
            remove_heads(module, drop, slicing)
