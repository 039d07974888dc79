"""Residual-stream pruning in real searches (local Ray with 2 CPUs, Optuna, MLflow on sqlite), on two architectures
whose blocks have no channel of their own, which structured removal refused before: RepVGG (ByobNet: every conv
of a stage writes its residual sum) and HGNetV2 (its stages' convs feed concatenations and residual sums). With
`scope: auto` the pre-flight finds their streams, every trial narrows whole stages, heals, is timed against the
dense model, and the front's models are registered and load back as they were measured."""

from __future__ import annotations

import pytest
import torch

from autoprune.driver.search import search
from autoprune.measure.metrics import count_macs
from autoprune.space.load import parse_spec
from autoprune.tracking.select import load_model, registered_versions

pytestmark = pytest.mark.e2e


def _spec(model: str) -> dict:
    return {
        "name": f"stream-{model}",
        "model": {"name": model, "num_classes": 10, "train_steps": 30},
        "data": {"source": "reference", "eval_images": 100},
        "profile": {"batch_size": 8, "warmup": 2, "repeats": 6, "max_seconds": 5},
        # what is under test is the stream's removal through a whole search, not which model is faster here
        "search": {"trials": 2, "concurrency": 2, "sampler": "random", "seed": 0, "resources": {"cpu": 1},
                   "stop_unless_faster": False},
        "mlflow": {"experiment": f"stream-{model}", "registered_model": f"stream-{model}"},
        "space": {
            "prune": {"methods": ["structured"], "sparsity": {"mode": "global", "low": 0.4, "high": 0.6}},
            "heal": {"methods": ["finetune", "align"], "calibration_images": 16, "steps": 2, "lr": 1e-3,
                     "batch_size": 8},
        },
    }


@pytest.mark.parametrize("model", ["repvgg_a0", "hgnetv2_b0"])
def test_a_search_prunes_the_residual_streams_of_a_model_without_internal_channels(local_ray, tmp_path, model):
    said: list[str] = []
    outcome = search(parse_spec(_spec(model)), workdir=tmp_path, echo=said.append)
    assert len(outcome.records) == 2 and not outcome.failed, [r.error for r in outcome.failed][:1]
    dense_macs = outcome.dense.macs
    for record in outcome.records:
        result = record.result
        assert result.config.prune.method == "structured"
        assert 0.25 < result.sparsity < 0.75, result.sparsity  # asked 0.4–0.6 of the weights
        assert result.macs < dense_macs / 1.3  # whole stages narrower
    versions = registered_versions(f"stream-{model}", tracking_uri=outcome.tracking_uri)
    assert versions, "\n".join(said)
    for version in versions:
        loaded = load_model(version.model_uri, tracking_uri=outcome.tracking_uri, recipe=False)
        assert count_macs(loaded, (3, 32, 32)) == version.macs < dense_macs / 1.3  # the narrowed model, reloaded
        with torch.no_grad():
            assert torch.isfinite(loaded(torch.randn(2, 3, 32, 32))).all()
