"""Gradual pruning methods: the sparsity rises along a schedule while the model heals, within the healing budget.

- progressive: progressive magnitude pruning (arXiv 2606.12278; Zhu & Gupta's AGP for the cubic schedule): at each
  update, the smallest-magnitude *active* weights are masked until the group reaches the schedule's sparsity; pruned
  weights stay pruned.
- feather: Feather (arXiv 2310.02448): the forward pass sees w̃ = sign(w)·(|w|^p − T^p)^(1/p) for |w| > T, else 0
  (p = 3), with one magnitude threshold T per group recomputed every step from the cubic schedule, which reaches the
  target at half the budget; the backward pass is straight-through, scaling the gradients of pruned weights by θ
  (0.5 for targets above 95%, else 1). At the end the thresholded weights are written back.

With a healing method that takes no steps, both jump straight to their final sparsity at `finish`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from autoprune.errors import AutopruneError
from autoprune.models import LayerGroup
from autoprune.prune.base import PruneMethod, PruneRequest, register
from autoprune.prune.masks import SCHEDULES, Masks, cubic_schedule, on_device, remove_lowest

RECOMPUTE_STEP = 0.005  # progressive: recompute masks when the scheduled sparsity has moved by half a point


class ProgressiveMagnitude:
    """Monotone magnitude masks whose sparsity follows a schedule over the healing steps."""

    def __init__(self, model: nn.Module, groups: tuple[LayerGroup, ...], final: dict[str, float], *, schedule: str,
                 end: float) -> None:
        if schedule not in SCHEDULES:
            raise AutopruneError(f"progressive: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}.")
        if not 0 < end <= 1:
            raise AutopruneError(f"progressive: `0 < end <= 1` must hold, but got {end=}.")
        modules = dict(model.named_modules())
        self.groups, self.final, self.schedule, self.end = groups, final, SCHEDULES[schedule], end
        self.by_layer = {name: torch.ones_like(modules[name].weight, dtype=torch.bool)
                         for group in groups for name in group.layers}
        self.current = {group.name: 0.0 for group in groups}

    def target(self, progress: float) -> dict[str, float]:
        return {g.name: self.schedule(progress, self.final[g.name], end=self.end) for g in self.groups}

    @torch.no_grad()
    def before_step(self, model: nn.Module, progress: float) -> None:
        modules = dict(model.named_modules())
        for group in self.groups:
            target = self.schedule(progress, self.final[group.name], end=self.end)
            moved = target - self.current[group.name]
            if moved < RECOMPUTE_STEP and not (target == self.final[group.name] and moved > 0):
                continue
            # Already pruned weights score −1: always among the removed, so the mask only grows.
            scores = [modules[name].weight.detach().abs().masked_fill(
                ~on_device(self.by_layer, name, modules[name].weight), -1.0) for name in group.layers]
            self.by_layer.update(zip(group.layers, remove_lowest(scores, target)))
            self.current[group.name] = target
        self.apply(model)

    def after_step(self, model: nn.Module) -> None:
        self.apply(model)

    def apply(self, model: nn.Module) -> None:
        Masks(self.by_layer).apply(model)

    def finish(self, model: nn.Module) -> Masks:
        self.before_step(model, 1.0)
        return Masks(dict(self.by_layer))

    def __bool__(self) -> bool:
        return True


def progressive(model: nn.Module, request: PruneRequest) -> ProgressiveMagnitude:
    return ProgressiveMagnitude(model, request.groups, dict(request.sparsity),
                                schedule=request.options["schedule"], end=request.options["end"])


# ---- Feather -----------------------------------------------------------------------------------------------


class _FeatherThreshold(torch.autograd.Function):
    """Forward: Feather's p-power thresholding. Backward: straight-through, pruned gradients scaled by θ."""

    @staticmethod
    def forward(ctx, weight, threshold: float, p: float, theta: float):
        keep = weight.abs() > threshold
        shrunk = (weight.abs().pow(p) - threshold**p).clamp_min(0).pow(1.0 / p)
        ctx.save_for_backward(keep)
        ctx.theta = theta
        return torch.where(keep, weight.sign() * shrunk, torch.zeros_like(weight))

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        scale = torch.where(keep, torch.ones_like(grad), torch.full_like(grad, ctx.theta))
        return grad * scale, None, None, None


class _Thresholded(nn.Module):
    """The parametrisation: the layer's forward sees the thresholded weight; the dense latent weight trains."""

    def __init__(self, p: float, theta: float) -> None:
        super().__init__()
        self.p, self.theta, self.threshold = p, theta, 0.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.threshold <= 0:
            return weight
        return _FeatherThreshold.apply(weight, self.threshold, self.p, self.theta)


class Feather:
    """Feather's sparsifier: per-group global thresholds on a cubic schedule, thresholded weights written back."""

    def __init__(self, model: nn.Module, groups: tuple[LayerGroup, ...], final: dict[str, float], *, p: float,
                 end: float, theta_extreme: float) -> None:
        modules = dict(model.named_modules())
        self.groups, self.final, self.end = groups, final, end
        self.operators: dict[str, _Thresholded] = {}
        for group in groups:
            theta = theta_extreme if final[group.name] > 0.95 else 1.0  # Feather's get_theta
            for name in group.layers:
                operator = _Thresholded(p, theta)
                parametrize.register_parametrization(modules[name], "weight", operator)
                self.operators[name] = operator
        self.finished: Masks | None = None

    @torch.no_grad()
    def _set_thresholds(self, model: nn.Module, progress: float) -> None:
        modules = dict(model.named_modules())
        for group in self.groups:
            target = cubic_schedule(progress, self.final[group.name], end=self.end)
            latent = torch.cat([modules[n].parametrizations.weight.original.detach().abs().flatten()
                                for n in group.layers])
            remove = int(round(target * latent.numel()))
            threshold = float(torch.kthvalue(latent, remove).values) if remove else 0.0
            for name in group.layers:
                self.operators[name].threshold = threshold

    def before_step(self, model: nn.Module, progress: float) -> None:
        self._set_thresholds(model, progress)

    def after_step(self, model: nn.Module) -> None:
        """The latent weights stay dense while training; the operator does the pruning."""

    @property
    def by_layer(self) -> dict[str, torch.Tensor]:
        return dict(self.finished.by_layer) if self.finished else {}

    def finish(self, model: nn.Module) -> Masks:
        """Threshold at the final sparsity and write the thresholded weights back into plain layers."""
        if self.finished is not None:
            return self.finished
        self._set_thresholds(model, 1.0)
        modules = dict(model.named_modules())
        for name in self.operators:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
        self.finished = Masks({name: modules[name].weight.detach() != 0 for name in self.operators})
        return self.finished

    def __bool__(self) -> bool:
        return True


def feather(model: nn.Module, request: PruneRequest) -> Feather:
    options = request.options
    return Feather(model, request.groups, dict(request.sparsity), p=options["p"], end=options["end"],
                   theta_extreme=options["theta_extreme"])


def check_end(options) -> str | None:
    """The schedule reaches its target at this fraction of the healing steps."""
    return None if 0 < options["end"] <= 1 else f"`0 < end <= 1` must hold, but got end={options['end']}"


register(
    PruneMethod(
        "progressive",
        progressive,
        "Progressive magnitude pruning while healing: sparsity rises on a linear (or cubic) schedule, masks from the"
        " magnitudes of still-active weights.",
        gradual=True,
        options={"schedule": "linear", "end": 0.75},
        choices={"schedule": tuple(SCHEDULES)},
        check=check_end,
    )
)
register(
    PruneMethod(
        "feather",
        feather,
        "Feather: p=3 threshold operator in the forward pass, straight-through gradients (θ-scaled above 95%),"
        " cubic schedule to the target at half the healing budget.",
        gradual=True,
        options={"p": 3.0, "end": 0.5, "theta_extreme": 0.5},
        check=check_end,
        # The threshold operator is a parametrisation: torch builds a class for each parametrised layer at run
        # time, which no pickle can carry to a worker, and DeepSpeed's ZeRO would partition the latent weight
        # under it.
        distributable=False,
        distributable_why="its threshold operator is a torch parametrisation, which cannot be sent to DeepSpeed"
                          " workers",
    )
)
