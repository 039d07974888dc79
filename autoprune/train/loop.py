"""The optimisation loop shared by dense training and healing: sampled mini-batches, AdamW, a learning-rate schedule
(warm-up and cosine for the dense model; warm-up, stable, decay for healing, which can stop part-way and go on).

`run_steps` is the one step loop: every step consults the pruning method's masks (or gradual sparsifier) before
and after the update, samples a batch, computes the loss, refuses a non-finite one and records it. What updates
the weights is pluggable: `TrainingRun` here runs it in this process with AdamW, in segments that continue;
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

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet, normalize
from autoprune.prune.masks import Masks, Sparsifier

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, labels) → loss
Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised inputs, labels), on the training device
T = TypeVar("T")


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


class TrainingRun:
    """One optimisation in this process that can be advanced in segments and evaluated part-way: AdamW with the
    learning rate set from `schedule` (a multiplier of `lr` per step) before every step, on batches sampled from
    `images` in `precision`, the masks held after every step.

    `advance(to)` trains the main line up to step `to`. `branch(length, then)` leaves it: `length` steps on which
    the learning rate falls from where the main line is to zero, on batches of a generator of its own, then
    `then(model)` (an evaluation), and the model, its optimiser and its scaler are put back as they were: a rung
    of successive halving sees what a shorter heal would have given, and the trial that goes on is exactly the one
    that would have healed without rungs (the main line never sees the branch's batches). The objective is bound
    for the whole run; `close()` releases it and leaves the model in eval mode."""

    def __init__(self, model: nn.Module, *, images: ImageSet, data: DataBundle, objective: Objective, steps: int,
                 lr: float, batch_size: int, seed: int, weight_decay: float = 0.05, masks: Sparsifier | None = None,
                 device: torch.device | str = "cpu", precision: Precision = Precision(),
                 schedule: Callable[[int], float] | None = None) -> None:
        self.model, self.steps, self.lr, self.seed = model, steps, lr, seed
        self.device, self.precision = torch.device(device), precision
        self.images, self.data, self.batch_size = images, data, min(batch_size, len(images.labels))
        self.schedule = schedule if schedule is not None else warmup_cosine(steps)
        self.held = masks if masks is not None else Masks()  # none: nothing to hold
        self.objective = objective
        model.train().to(self.device)
        self.loss_fn = objective.bind(model, self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        # float16's narrow range underflows small gradients: the loss is scaled up for backward, the step unscaled
        self.scaler = torch.amp.GradScaler(self.device.type) if precision.autocast == torch.float16 else None
        self.next_batch = self._sampler(seed)
        self.step = 0  # the main line's steps so far
        self.spent = 0  # every optimiser step taken, branches' included: what the run cost
        self.losses: list[float] = []

    def advance(self, to: int) -> list[float]:
        """Train the main line from where it is up to step `to` (at most `steps`); the losses of those steps."""
        to = min(to, self.steps)
        if to <= self.step:
            return []
        start = self.step
        losses = self._run(to - start, lambda index: self.schedule(start + index), self.next_batch,
                           progress=lambda index: (start + index) / self.steps)
        self.step = to
        self.losses += losses
        return losses

    def branch(self, length: int, then: Callable[[nn.Module], T]) -> T:
        """`length` steps decaying the learning rate from the main line's to zero, `then(model)`, and everything
        put back as it was (see the class)."""
        saved_model = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        saved_scaler = self.scaler.state_dict() if self.scaler is not None else None
        peak, at = self.schedule(self.step), self.step
        try:
            if length > 0:
                self._run(length, lambda index: peak * 0.5 * (1 + math.cos(math.pi * index / length)),
                          self._sampler(self.seed * 1_000_003 + at + 1),  # its own batches: the main line's stay
                          progress=lambda index: at / self.steps)
            return then(self.model)
        finally:
            self.model.load_state_dict(saved_model)
            self.optimizer.load_state_dict(saved_optimizer)
            if saved_scaler is not None:
                self.scaler.load_state_dict(saved_scaler)
            self.model.train()

    def close(self) -> None:
        """Leave no gradients behind (they hold as much memory as the weights), release the objective, and leave
        the model in eval mode."""
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.release()
        self.model.eval()

    def _sampler(self, seed: int) -> Callable[[], Batch]:
        return batch_sampler(self.images, self.data.mean, self.data.std, batch_size=self.batch_size, seed=seed,
                             device=self.device)

    def _run(self, count: int, factor: Callable[[int], float], next_batch: Callable[[], Batch], *,
             progress: Callable[[int], float]) -> list[float]:
        model, optimizer, scaler, index = self.model, self.optimizer, self.scaler, 0

        def update(loss: torch.Tensor) -> None:
            nonlocal index
            for group in optimizer.param_groups:
                group["lr"] = self.lr * factor(index)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            index += 1
            self.spent += 1

        def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with self.precision.autocasting(self.device):
                return self.loss_fn(model, inputs, labels).float()

        model.train()
        with self.precision.backend(self.device):
            return run_steps(count, lr=self.lr, step=update, loss_of=loss_of, next_batch=next_batch,
                             before_step=lambda _: self.held.before_step(model, progress(index)),
                             after_step=lambda: self.held.after_step(model))


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
    schedule: Callable[[int], float] | None = None,
) -> list[float]:
    """Run `steps` AdamW steps in this process on batches sampled from `images`, in `precision`, the learning rate
    following `schedule` (default: warm-up and cosine decay); returns the loss of every step. (`autoprune.train.
    optimise` takes a healing engine, and runs the same job on DeepSpeed workers when asked.)"""
    run = TrainingRun(model, images=images, data=data, objective=objective, steps=steps, lr=lr,
                      batch_size=batch_size, seed=seed, weight_decay=weight_decay, masks=masks, device=device,
                      precision=precision, schedule=schedule)
    try:
        return run.advance(steps)
    finally:
        run.close()


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


@dataclass(frozen=True)
class WarmupStableDecay:
    """LR multiplier for healing: linear warm-up over the first `warmup` of the steps (at least one), flat at the
    peak, then a cosine decay to zero over the last `decay` of them. Unlike a cosine over the whole budget, the
    flat middle does not depend on where the run will end, so a heal can be evaluated part-way (a branch decays
    from there: `TrainingRun.branch`) and continued (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
    Training beyond Fixed Training Durations", find such a schedule on par with cosine). A class, so that it
    pickles into DeepSpeed workers."""

    steps: int
    warmup: float = 0.1
    decay: float = 0.2

    def __call__(self, step: int) -> float:
        warmup = max(1, round(self.warmup * self.steps))
        decay = max(1, round(self.decay * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        stable_end = max(warmup, self.steps - decay)
        if step < stable_end:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - stable_end) / max(1, self.steps - stable_end)))


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
