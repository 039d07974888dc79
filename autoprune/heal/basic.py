"""The first healing methods: none, fine-tuning with labels, and logit distillation from the dense model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.heal.base import HealMethod, HealRequest, register, trained
from autoprune.train import LossFn, cross_entropy, logit_kl


def _no_healing(model, request: HealRequest) -> list[float]:
    return []


def _finetune(model, request: HealRequest):
    return cross_entropy(request.options["label_smoothing"])


class Distillation:
    """α·τ²·KL(teacher ‖ student) + (1−α)·CE with label smoothing (METHODS.md §2d; α=0.5, τ=2, ε=0.1).
    The teacher goes to the training device when bound, and back to the CPU when released."""

    def __init__(self, teacher: nn.Module, *, alpha: float, temperature: float, label_smoothing: float) -> None:
        self.teacher, self.alpha, self.tau, self.smoothing = teacher, alpha, temperature, label_smoothing

    def bind(self, model: nn.Module, device: torch.device) -> LossFn:
        teacher = self.teacher.eval().to(device)

        def loss(student, inputs, labels):
            logits = student(inputs)
            with torch.no_grad():
                target = teacher(inputs)
            return self.alpha * logit_kl(logits, target, self.tau) + (1 - self.alpha) * F.cross_entropy(
                logits, labels, label_smoothing=self.smoothing)

        return loss

    def release(self) -> None:
        self.teacher.cpu()  # the device's memory is for what comes next (evaluation, timing)


def _distill(model, request: HealRequest) -> Distillation:
    options = request.options
    return Distillation(request.teacher, alpha=options["alpha"], temperature=options["temperature"],
                        label_smoothing=options["label_smoothing"])


register(HealMethod("none", _no_healing, "No recovery: measure the pruned model as it is.", uses_calibration=False,
                    trains=False))
register(
    HealMethod(
        "finetune",
        trained(_finetune),
        "Fine-tune on the labelled calibration images (cross-entropy with label smoothing).",
        needs_labels=True,
        options={"label_smoothing": 0.1},
        objective=_finetune,
    )
)
register(
    HealMethod(
        "distill",
        trained(_distill),
        "Distil the dense model's logits: α·τ²·KL + (1−α)·CE with label smoothing.",
        needs_labels=True,
        needs_teacher=True,
        options={"alpha": 0.5, "temperature": 2.0, "label_smoothing": 0.1},
        objective=_distill,
    )
)
