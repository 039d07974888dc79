"""Shared fixtures: the tiny real timm models and the reference task (from `autoprune.testing.models`), and one
local Ray for the session."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing outside is reachable in tests
os.environ.pop("MLFLOW_TRACKING_URI", None)  # every test names its store: none may write to the caller's server

import pytest
import torch

from autoprune.models import ModelSource
from autoprune.testing.models import (  # noqa: F401 (test modules import these from here)
    FAMILIES,
    TINY_BOTTLENECK,
    TINY_RESNET,
    TINY_VIT,
    briefly_trained,
    example_inputs,
    reference_bundle,
)

TEST_ACCELERATOR = "autoprune-test"


@pytest.fixture(scope="session")
def bundle():
    return reference_bundle(seed=0)


@pytest.fixture(params=list(FAMILIES.values()), ids=list(FAMILIES))
def source(request) -> ModelSource:
    return request.param


@pytest.fixture
def example(bundle) -> torch.Tensor:
    return example_inputs(bundle)


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
