"""`run_trial` without Ray: the whole pipeline on a tiny model, and the early stop on a missed latency target."""

from __future__ import annotations

import pytest
import torch

from autoprune.models import load_model_dir
from autoprune.spec import HealConfig, PruneConfig, ProfileSpec, TrialConfig
from autoprune.trial import STAGES, TrialContext, TrialResult, run_trial
from conftest import TINY_VIT

PROFILE = ProfileSpec(batch_size=2, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def context(bundle):
    torch.manual_seed(0)
    return TrialContext(TINY_VIT, TINY_VIT.create().state_dict(), bundle, PROFILE)


CONFIG = TrialConfig(
    PruneConfig("structured", {"blocks.0.mlp": 0.5, "blocks.1.mlp": 0.75, "blocks.0.attn": 0.5, "blocks.1.attn": 0.5},
                {"round_to": 1, "heads": True}),
    HealConfig("finetune", calibration_images=32, steps=3, lr=1e-3, batch_size=8, options={"label_smoothing": 0.1}),
)


def test_a_trial_measures_everything_and_saves_its_model(context, tmp_path, example):
    result = run_trial(CONFIG, context, save_dir=tmp_path, threads=1)
    assert 0 <= result.accuracy <= 1
    assert result.latency.batch_size == 2 and result.latency.threads == 1
    assert result.macs > 0 and result.params < sum(v.numel() for v in context.dense_state.values())
    assert 0.2 < result.sparsity < 0.8
    assert set(result.timings) == set(STAGES)
    assert TrialResult.from_metrics(result.metrics()) == result  # what Tune carries back is the whole result
    model = load_model_dir(tmp_path)
    assert model.blocks[1].mlp.fc1.out_features == context.dense_model().blocks[1].mlp.fc1.out_features // 4


def test_a_missed_latency_target_stops_before_healing(context):
    from dataclasses import replace

    result = run_trial(CONFIG, replace(context, latency_target_ms=1e-6), threads=1)
    assert result.accuracy is None and not result.feasible
    assert "heal" not in result.timings and "evaluate" not in result.timings
    assert result.metrics()["accuracy"] == 0.0 and result.metrics()["feasible"] == 0


def test_dense_training_is_reproducible(bundle, tmp_path):
    """Two cache misses train to identical weights, whatever consumed the global RNG before and however many threads
    the process has."""
    from autoprune.dense import dense_weights
    from autoprune.spec import DataSpec, ModelSpec

    model = ModelSpec(TINY_VIT.name, 10, train_steps=3, kwargs=TINY_VIT.kwargs)
    first = dense_weights(model, DataSpec(), bundle, cache_dir=tmp_path / "a")
    torch.randn(100)  # disturb the global generator
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        second = dense_weights(model, DataSpec(), bundle, cache_dir=tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len(list((tmp_path / "a").glob("dense-*.safetensors"))) == 1  # cached for the next search


def test_spectral_allocation_drives_a_structured_method(context):
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}, allocation="spectral"), HealConfig("none"))
    result = run_trial(config, context, threads=1)
    assert 0.2 < result.sparsity < 0.6 and result.params < sum(v.numel() for v in context.dense_state.values())
    assert TrialConfig.from_json(config.to_json()) == config
