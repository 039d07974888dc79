"""Tiny real timm models (random init, seconds to build and train on a CPU) and the reference data they are tested on.

The same architectures a search runs, scaled down: a ViT (attention heads, MLPs, a residual stream) and two ResNets
(basic blocks, bottleneck blocks) — so a pruning or healing method meets every layer kind it will meet at full size.
Importable without pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autoprune.data import reference_task
from autoprune.models import ModelSource

if TYPE_CHECKING:
    from autoprune.data import DataBundle

TINY_VIT = ModelSource(
    "vit_tiny_patch16_224",
    10,
    {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg",
     "class_token": False},
)
TINY_RESNET = ModelSource("resnet18", 10, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)})
TINY_BOTTLENECK = ModelSource("resnet50", 10, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)})

# The two families every method is held to — a transformer and a CNN — by the ids tests name them with.
FAMILIES: dict[str, ModelSource] = {"vit": TINY_VIT, "resnet": TINY_RESNET}


def reference_bundle(seed: int = 0) -> DataBundle:
    """The built-in reference task (scikit-learn's digits as 32×32 RGB, 10 classes): what the tiny models take."""
    return reference_task(seed=seed)


def example_inputs(data: DataBundle, n: int = 4) -> torch.Tensor:
    """A small normalised batch from the eval split: the example a method traces and a forward pass is checked on."""
    return data.normalize(data.eval.images[:n])


def briefly_trained(source: ModelSource, data: DataBundle, steps: int = 150) -> torch.nn.Module:
    """A real dense model for healing tests, in eval mode: `steps` AdamW steps on the reference task, seeded."""
    from autoprune.train import cross_entropy, optimise

    torch.manual_seed(0)
    model = source.create()
    optimise(model, images=data.train, data=data, objective=cross_entropy(), steps=steps, lr=3e-3, batch_size=64,
             seed=0)
    return model.eval()
