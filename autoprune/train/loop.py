"""The optimisation loop shared by dense training and healing: sampled mini-batches, AdamW, one-cycle schedule.

The pruning method's masks (or gradual sparsifier) are consulted before and after every step, so that pruned weights
stay zero and the achieved sparsity stays at its target however long the model heals.

What is minimised is an `Objective`: it is bound to the model being trained on the device it trains on, which is
where a teacher goes and where hooks are attached. A DeepSpeed worker binds its own copy (distributed.py), so an
objective never carries a model already placed on another process's GPU.

Images stay uint8 until a batch is on the device; it is normalised there.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet
from autoprune.prune.masks import Sparsifier

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, labels) → loss


class Objective(Protocol):
    """What an optimisation minimises, bound to one model on one device for the length of a run."""

    def bind(self, model: nn.Module, device: torch.device) -> LossFn:
        """Attach to `model` (hooks, a teacher moved to `device`) and return the loss function."""

    def release(self) -> None:
        """Detach what `bind` attached."""


class Loss:
    """An objective that needs nothing from the model it trains: a plain loss function."""

    def __init__(self, fn: LossFn) -> None:
        self.fn = fn

    def bind(self, model: nn.Module, device: torch.device) -> LossFn:
        return self.fn

    def release(self) -> None:
        pass


def shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (one shift per batch): cheap, label-preserving augmentation."""
    if max_shift <= 0:
        return images
    size = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + size[0], dx : dx + size[1]]


def optimise(
    model: nn.Module,
    *,
    images: ImageSet,
    data: DataBundle,
    objective: Objective,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.05,
    masks: Sparsifier | None = None,
    device: torch.device | str = "cpu",
    engine: HealingEngine | None = None,
) -> list[float]:
    """Run `steps` AdamW steps on batches sampled from `images`; returns the loss of every step.
    With a DeepSpeed `engine` the same job runs on several workers (distributed.py)."""
    if engine is not None and engine.engine == "deepspeed":
        from autoprune.prune.masks import Masks
        from autoprune.train.deepspeed import optimise_deepspeed

        losses = optimise_deepspeed(model, engine, images=images, mean=data.mean, std=data.std, objective=objective,
                                    steps=steps, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                                    masks=masks if masks is not None else Masks())
        model.to(device).eval()
        return losses
    device = torch.device(device)
    model.train().to(device)
    loss_fn = objective.bind(model, device)
    try:
        return _steps(model, images, data, loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      weight_decay=weight_decay, masks=masks, device=device)
    finally:
        objective.release()
        model.eval()


def _steps(model, images: ImageSet, data: DataBundle, loss_fn: LossFn, *, steps, lr, batch_size, seed,
           weight_decay, masks, device) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    labels = images.labels
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    max_shift = max(1, images.source.shape[-1] // 16)
    losses = []
    for step in range(steps):
        if masks is not None:
            masks.before_step(model, step / steps)  # a gradual method moves its sparsity along its schedule
        index = torch.randint(0, len(labels), (min(batch_size, len(labels)),), generator=generator)
        batch = shifted(data.normalize(images.take(index).to(device)), generator, max_shift)
        loss = loss_fn(model, batch, labels[index].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {len(losses)} (lr={lr:g}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if masks is not None:
            masks.after_step(model)
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)  # leave no gradients behind: they hold as much memory as the weights
    return losses


def warmup_cosine(steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over the first 10% of the steps (at least one), then cosine decay to zero.

    Written out because torch's OneCycleLR divides by zero for some step counts (10, for one).
    """
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)): the τ² keeps gradients on one scale across temperatures."""
    return temperature**2 * F.kl_div(F.log_softmax(student_logits / temperature, -1),
                                     F.log_softmax(teacher_logits / temperature, -1), log_target=True,
                                     reduction="batchmean")


class CrossEntropy(Loss):
    """Cross-entropy with label smoothing against the labels (a class, so that it pickles into DeepSpeed workers)."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__(self.loss)
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), labels, label_smoothing=self.label_smoothing)


def cross_entropy(label_smoothing: float = 0.1) -> Objective:
    return CrossEntropy(label_smoothing)
