"""What a pruned model is: top-1 accuracy, MACs (priced by torch's FLOP formulas), parameters, achieved sparsity."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from autoprune.data import DataBundle, ImageSet
from autoprune.measure.prepared import PreparedModel

EVAL_PIXELS = 64 * 224 * 224  # images × pixels per evaluation batch: activations scale with both


def accuracy(
    model: nn.Module, images: ImageSet, data: DataBundle, *, batch_size: int | None = None, device="cpu"
) -> float:
    """Top-1 accuracy on `images`, batch by batch on `device` (the model is moved there first). The default batch
    holds EVAL_PIXELS pixels (256 small images, 64 at 224×224): a 256-image batch at ImageNet size would hold more
    than a gigabyte of activations in a small CNN's stem alone."""
    batch_size = batch_size or eval_batch_size(images)
    model.eval().to(device)  # outside inference mode: its tensors must stay usable by autograd
    return _top1(model, images, data, batch_size, torch.device(device))


def served_accuracy(prepared: PreparedModel, images: ImageSet, data: DataBundle) -> float:
    """Top-1 accuracy of a model as it is served (measure/prepared.py: its dtype, layout, kernels, compilation),
    in batches of the size it was prepared on."""
    return _top1(prepared.logits, images, data, prepared.batch_size, prepared.device)


def eval_batch_size(images: ImageSet) -> int:
    """EVAL_PIXELS pixels' worth of images, at most 256."""
    height, width = images.source.shape[-2:]
    return max(1, min(256, EVAL_PIXELS // (height * width)))


def _top1(forward, images: ImageSet, data: DataBundle, batch_size: int, device: torch.device) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        # normalised outside inference mode, as a prepared model's first call was: a compiled graph is reused
        batch = data.normalize(images.take(slice(start, start + batch_size)).to(device))
        with torch.inference_mode():
            predicted = forward(batch).argmax(dim=-1).cpu()
        correct += int((predicted == images.labels[start : start + batch_size]).sum())
    return correct / len(images)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image's forward pass, as executed (masked zeros still count).

    The count is torch's own: every op that runs is priced by `torch.utils.flop_counter`'s formulas exactly as
    `FlopCounterMode` prices it (FLOPs // 2 here), but without its module tracker, whose autograd hooks break on
    some models (PiT passes a parameter straight into a submodule: `'NoneType' object has no attribute
    'next_functions'` under inference mode) — and with the CPU's fused attention priced like the other devices',
    which torch's table leaves out, so that a model counts the same on every device."""
    parameter = next(model.parameters())
    inputs = torch.zeros(1, *input_size, dtype=parameter.dtype, device=parameter.device)
    counter = _FlopCounter()
    with torch.inference_mode(), counter:
        model.eval()(inputs)
    return counter.total // 2


# Ops that only read a tensor's metadata: FlopCounterMode lets them through uncounted and undecomposed.
_METADATA_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "sym_is_contiguous", "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size",
    "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim",
)) | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default}


class _FlopCounter(TorchDispatchMode):
    """FlopCounterMode's dispatch rule without module attribution: an op without a formula is decomposed (its
    parts come back through this mode) when it can be; otherwise it runs and its formula, if any, is applied to
    its arguments and output (`out_val`). Ops with neither add nothing. Of the higher-order ops, `cond` counts
    the larger branch op by op, as FlopCounterMode documents (its own tally, through a shallow copy, adds both
    branches once any op ran before the cond); Triton kernels (compiled code only) and the others are refused."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        from torch.utils import flop_counter

        self.registry = dict(flop_counter.flop_registry)  # a snapshot, as FlopCounterMode takes one
        # torch's table prices the fused attention of CUDA and of the meta device, not the CPU's: without this a
        # ViT's attention would count on a GPU and vanish on a CPU (PiT-Ti: 0.70 G MACs, or 0.50 G)
        self.registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, _fused_attention_flops)
        self.counts: dict[object, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            if func is not torch.ops.higher_order.cond:
                return NotImplemented
            _, true_branch, false_branch, operands = args
            outer, branch_counts = self.counts, []
            for branch in (true_branch, false_branch):
                self.counts = defaultdict(int)
                with self:
                    out = branch(*operands)
                branch_counts.append(self.counts)
            self.counts = outer
            for op in branch_counts[0].keys() | branch_counts[1].keys():
                self.counts[op] += max(branch_counts[0][op], branch_counts[1][op])
            return out
        # Like FlopCounterMode, this asks the registry (keyed by overload packet) about the overload itself, so
        # every op that has a composite-implicit decomposition is decomposed, priced or not.
        if func not in self.registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.counts[func._overloadpacket] += formula(*args, **kwargs, out_val=out)
        return out


def _fused_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """The CPU's fused attention, priced as torch prices the other fused attentions (two batched matmuls)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_weight_count(model: nn.Module, layer_names: list[str]) -> tuple[int, int]:
    """(non-zero, total) weights of the named layers; layers removed by structured pruning count as zero."""
    modules = dict(model.named_modules())
    nonzero = total = 0
    for name in layer_names:
        if name in modules:
            weight = modules[name].weight
            nonzero += int(torch.count_nonzero(weight))
            total += weight.numel()
    return nonzero, total


def achieved_sparsity(model: nn.Module, layer_names: list[str], dense_total: int) -> float:
    """Fraction of the dense model's prunable weights that are gone (zeroed or physically removed)."""
    nonzero, _ = prunable_weight_count(model, layer_names)
    return 1.0 - nonzero / dense_total
