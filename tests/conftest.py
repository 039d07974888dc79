"""Shared fixtures: tiny real timm models (random init), the reference task, and one local Ray for the session."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing outside is reachable in tests

import pytest
import torch

from autoprune.data import reference_task
from autoprune.models import ModelSource

TINY_VIT = ModelSource(
    "vit_tiny_patch16_224",
    10,
    {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg",
     "class_token": False},
)
TINY_RESNET = ModelSource("resnet18", 10, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)})
TEST_ACCELERATOR = "autoprune-test"
TINY_BOTTLENECK = ModelSource("resnet50", 10, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)})


def briefly_trained(source: ModelSource, data) -> torch.nn.Module:
    """A real dense model for healing tests: 150 steps on the reference task."""
    from autoprune.train.loop import cross_entropy, optimise

    torch.manual_seed(0)
    model = source.create()
    optimise(model, images=data.train, data=data, objective=cross_entropy(), steps=150, lr=3e-3, batch_size=64, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def bundle():
    return reference_task(seed=0)


@pytest.fixture(params=[TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def source(request) -> ModelSource:
    return request.param


@pytest.fixture
def example(bundle) -> torch.Tensor:
    return bundle.normalize(bundle.eval.images[:4])


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with 2 CPUs, shared by the tests that need one. Its node also says it has an accelerator of
    type TEST_ACCELERATOR (a custom resource, no device), for the target-hardware tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={f"accelerator_type:{TEST_ACCELERATOR}": 1})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_repository():
    """No test (nor what it runs) may write into the working tree: a store that defaults to ./mlruns did."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def untracked() -> set[str]:
        try:
            done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return {line[3:] for line in done.stdout.splitlines() if line.startswith("??")} if done.returncode == 0 else set()

    before = untracked()
    yield
    written = sorted(untracked() - before)
    assert not written, f"tests wrote into the repository: {written[:10]}"
