"""Optimisation for healing and for the dense model: one step loop (`loop.run_steps`), run in the trial's process
(`loop.optimise`) or by DeepSpeed workers in the trial's placement group (`deepspeed.optimise_deepspeed`).

`optimise` below is where the two meet: it takes the healing engine and picks one. loop.py knows nothing of
DeepSpeed; deepspeed.py uses loop.py's step loop, batches and schedule.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from autoprune.config import HealingEngine
from autoprune.data import DataBundle, ImageSet
from autoprune.prune.masks import Masks, Sparsifier
from autoprune.train import loop
from autoprune.train.deepspeed import optimise_deepspeed
from autoprune.train.loop import LossFn, Objective, TrainingRun, WarmupStableDecay, cross_entropy, logit_kl


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
    schedule: Callable[[int], float] | None = None,
) -> list[float]:
    """Run `steps` AdamW steps on batches sampled from `images`, the learning rate following `schedule` (a multiplier
    per step; default: warm-up and cosine); returns the loss of every step. In this process
    (`loop.optimise`, in the engine's precision: autocast, TF32) unless `engine` is DeepSpeed's: then on its workers, and the trained `model` is left on
    `device` in eval mode, as the local run leaves it."""
    if engine is None or engine.engine != "deepspeed":
        return loop.optimise(model, images=images, data=data, objective=objective, steps=steps, lr=lr,
                             batch_size=batch_size, seed=seed, weight_decay=weight_decay, masks=masks, device=device,
                             precision=loop.Precision.of(engine, device), schedule=schedule)
    losses = optimise_deepspeed(model, engine, images=images, mean=data.mean, std=data.std, objective=objective,
                                steps=steps, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                                masks=masks if masks is not None else Masks(), schedule=schedule)
    model.to(device).eval()
    return losses


__all__ = ["LossFn", "Objective", "TrainingRun", "WarmupStableDecay", "cross_entropy", "logit_kl", "optimise"]
