"""What a pruned model is: top-1 accuracy, MACs (counted by torch's FLOP counter), parameters, achieved sparsity."""

from __future__ import annotations

import torch
from torch import nn

from autoprune.data import DataBundle, ImageSet

EVAL_PIXELS = 64 * 224 * 224  # images × pixels per evaluation batch: activations scale with both


def accuracy(
    model: nn.Module, images: ImageSet, data: DataBundle, *, batch_size: int | None = None, device="cpu"
) -> float:
    """Top-1 accuracy on `images`, batch by batch on `device` (the model is moved there first). The default batch
    holds EVAL_PIXELS pixels (256 small images, 64 at 224×224): a 256-image batch at ImageNet size would hold more
    than a gigabyte of activations in a small CNN's stem alone."""
    if batch_size is None:
        height, width = images.source.shape[-2:]
        batch_size = max(1, min(256, EVAL_PIXELS // (height * width)))
    model.eval().to(device)  # outside inference mode: its tensors must stay usable by autograd
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = data.normalize(images.take(slice(start, start + batch_size)).to(device))
            predicted = model(batch).argmax(dim=-1).cpu()
            correct += int((predicted == images.labels[start : start + batch_size]).sum())
    return correct / len(images)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image's forward pass, as executed (masked zeros still count)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    inputs = torch.zeros(1, *input_size, dtype=parameter.dtype, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(inputs)
    return counter.get_total_flops() // 2


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
