"""Recalibration: re-estimate what pruning shifted, from unlabelled calibration images, without optimising.

Two corrections, each exact for what it corrects:
- BatchNorm running statistics are re-estimated on the pruned network's own activations.
- Bias mean-shift: for a masked layer y = Wx + b, the removed part (W_dense − W_pruned)x has mean
  (W_dense − W_pruned)·E[x]; adding it to b makes the layer's mean output equal the dense layer's on the same inputs
  (the VBP mean-shift applied to weights). Layers are corrected in forward order, each from input means
  measured after the corrections upstream (one pass over the calibration images per corrected layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.heal.base import HealMethod, HealRequest, register


@torch.no_grad()
def recalibrate(model: nn.Module, request: HealRequest) -> list[float]:
    device = torch.device(request.device)
    model.to(device)
    images = request.data.batches(request.calibration, device)  # normalised one batch at a time, on the device
    if request.options["batchnorm"]:
        reestimate_batchnorm(model, images, request.batch_size)
    if request.options["bias_shift"]:
        _shift_biases(model, request.teacher, request.masks, images, request.batch_size)
    model.eval()
    return []


def reestimate_batchnorm(model: nn.Module, images, batch_size: int) -> None:
    """BatchNorm's running statistics, re-estimated (a cumulative average) on `images` (normalised, on the model's
    device), in batches of `batch_size`; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every calibration batch
    model.train()
    for batch in images.split(batch_size):
        model(batch)
    model.eval()


def _shift_biases(model: nn.Module, dense: nn.Module, masks, images, batch_size: int) -> None:
    """Layer by layer in forward order, so that each layer's input means already include the shifts upstream."""
    modules = dict(model.named_modules())
    dense_modules = dict(dense.named_modules())
    model.eval()
    for name in masks.by_layer:  # masks are recorded in forward (module) order
        layer = modules[name]
        if getattr(layer, "bias", None) is None:
            continue  # a conv followed by BatchNorm: the re-estimated statistics take the shift
        mean = _input_mean(model, layer, images, batch_size)
        # the dense weight in this model's channel order (CAST's permutation may have reordered it)
        reference = masks.dense_weight(name, dense_modules[name].weight.to(layer.weight.device))
        removed = (reference - layer.weight).double()
        if isinstance(layer, nn.Linear):
            shift = removed @ mean
        else:  # a constant input map through the removed kernel: every tap sees the same channel mean
            shift = F.conv2d(mean.view(1, -1, 1, 1), removed.sum((2, 3), keepdim=True)).flatten()
        layer.bias.add_(shift.to(layer.bias.dtype))


def _input_mean(model: nn.Module, layer: nn.Module, images, batch_size: int) -> torch.Tensor:
    """The per-input-feature mean of `layer`'s input over the calibration images: every token, or every pixel."""
    total, count = 0, 0

    def hook(module, inputs, output):
        nonlocal total, count
        x = inputs[0]
        flat = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
        total = total + flat.double().sum(0)
        count += flat.shape[0]

    handle = layer.register_forward_hook(hook)
    try:
        for batch in images.split(batch_size):
            model(batch)
    finally:
        handle.remove()
    return total / count


register(
    HealMethod(
        "recalibrate",
        recalibrate,
        "Re-estimate BatchNorm statistics and shift biases by the removed weights' mean contribution (no training).",
        trains=False,
        options={"batchnorm": True, "bias_shift": True},
    )
)
