"""The optimisation loop shared by dense training and healing: sampled mini-batches, AdamW, one-cycle schedule.

`run_steps` is the one step loop: every step consults the pruning method's masks (or gradual sparsifier) before
and after the update, samples a batch, computes the loss, refuses a non-finite one and records it. What updates
the weights is pluggable: `optimise` here runs it in this process with AdamW and a warm-up/cosine schedule;
deepspeed.py runs it in each DeepSpeed worker with the engine's backward and step (and holds the masks in the
optimiser's fp32 master weights too). Masks are held after every step, so pruned weights stay zero and the
achieved sparsity stays at its target however long the model heals. This module knows nothing of DeepSpeed: the
choice between the two is `autoprune.train.optimise`'s.

What is minimised is an `Objective`: it is bound to the model being trained on the device it trains on, which is
where a teacher goes and where hooks are attached. A DeepSpeed worker binds its own copy (deepspeed.py), so an
objective never carries a model already placed on another process's GPU.

Images stay uint8 until a batch is on the device; it is normalised there.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet, normalize
from autoprune.prune.masks import Masks, Sparsifier

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, labels) → loss
Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised inputs, labels), on the training device


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


@dataclass(frozen=True)
class Precision:
    """How a local training run computes: the forward pass under autocast in `autocast` (None: float32), float32
    matmuls and convolutions on TF32 tensor cores (`tf32`, CUDA only). float16 scales the loss (GradScaler)."""

    autocast: torch.dtype | None = None
    tf32: bool = False

    @classmethod
    def of(cls, engine: HealingEngine | None, device: torch.device | str) -> "Precision":
        """What `heal_runtime` asks for, on `device`: `auto` is bfloat16 on a CUDA GPU that has it (float16 on
        one that has not) and float32 on a CPU, where bfloat16 autocast is slower than float32 on most CPUs."""
        device = torch.device(device)
        if engine is None:
            return cls()
        tf32 = engine.tf32 and device.type == "cuda"
        if engine.autocast == "off":
            return cls(None, tf32)
        if engine.autocast == "auto":
            if device.type != "cuda":
                return cls(None, False)
            native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on: of this very GPU
            return cls(torch.bfloat16 if native_bf16 else torch.float16, tf32)
        return cls(getattr(torch, engine.autocast), tf32)

    def autocasting(self, device: torch.device):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @contextmanager
    def backend(self, device: torch.device) -> Iterator[None]:
        """TF32 for the run, and the process's settings as they were afterwards (timing sets its own)."""
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (one shift per batch): cheap, label-preserving augmentation."""
    if max_shift <= 0:
        return images
    size = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + size[0], dx : dx + size[1]]


def batch_sampler(images: ImageSet, mean: Sequence[float], std: Sequence[float], *, batch_size: int, seed: int,
                  device: torch.device, share: slice = slice(None)) -> Callable[[], Batch]:
    """Batches of `batch_size` images drawn with replacement from one generator seeded with `seed`, normalised on
    `device` and shifted. `share`: the rows of each batch this process trains on (a DeepSpeed worker's part of the
    global batch; all of it by default), so that every worker draws the same batches as a single process would."""
    generator = torch.Generator().manual_seed(seed)
    labels = images.labels
    max_shift = max(1, images.source.shape[-1] // 16)

    def next_batch() -> Batch:
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        batch = shifted(normalize(images.take(index).to(device), mean, std), generator, max_shift)
        return batch[share], labels[index][share].to(device)

    return next_batch


def run_steps(
    steps: int,
    *,
    next_batch: Callable[[], Batch],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (inputs, labels) → loss
    step: Callable[[torch.Tensor], None],
    before_step: Callable[[float], None] = lambda progress: None,
    after_step: Callable[[], None] = lambda: None,
    record: Callable[[torch.Tensor], float] = lambda loss: float(loss.detach()),
    lr: float,
) -> list[float]:
    """The step loop, `steps` times: `before_step(progress)` (a gradual method moves its sparsity along its
    schedule), a batch, its loss (a non-finite one stops the run), `step(loss)` (backward and the optimiser's
    update), `after_step()` (the masks are held). Returns what `record` makes of every step's loss (by default
    its value; a DeepSpeed worker averages it over the workers). `lr` is named when the loss diverges."""
    losses = []
    for index in range(steps):
        before_step(index / steps)
        inputs, labels = next_batch()
        loss = loss_of(inputs, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {index} (lr={lr:g}).")
        step(loss)
        after_step()
        losses.append(record(loss))
    return losses


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
    precision: Precision = Precision(),
) -> list[float]:
    """Run `steps` AdamW steps in this process on batches sampled from `images`, in `precision`; returns the loss of
    every step. (`autoprune.train.optimise` takes a healing engine, and runs the same job on DeepSpeed workers
    when asked.)"""
    device = torch.device(device)
    held = masks if masks is not None else Masks()  # none: nothing to hold
    model.train().to(device)
    loss_fn = objective.bind(model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    # float16's narrow range underflows small gradients: the loss is scaled up for backward, the step unscaled
    scaler = torch.amp.GradScaler(device.type) if precision.autocast == torch.float16 else None

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        schedule.step()

    def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with precision.autocasting(device):
            return loss_fn(model, inputs, labels).float()

    try:
        with precision.backend(device):
            return run_steps(
                steps, lr=lr, step=update, loss_of=loss_of,
                next_batch=batch_sampler(images, data.mean, data.std, batch_size=min(batch_size, len(images.labels)),
                                         seed=seed, device=device),
                before_step=lambda progress: held.before_step(model, progress),
                after_step=lambda: held.after_step(model),
            )
    finally:
        optimizer.zero_grad(set_to_none=True)  # leave no gradients behind: they hold as much memory as the weights
        objective.release()
        model.eval()


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
