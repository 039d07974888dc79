"""Healing: losses fall, masks stay fixed, accuracy after healing beats no healing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_RESNET, briefly_trained

from autoprune import heal, prune
from autoprune.measure.metrics import accuracy
from autoprune.models import layer_groups
from autoprune.train.loop import Loss, cross_entropy, optimise


@pytest.fixture(scope="module")
def trained(bundle):
    """A tiny ResNet trained briefly on the reference task (a real dense model to damage and heal)."""
    return briefly_trained(TINY_RESNET, bundle)


def _pruned(trained, sparsity=0.8):
    model = copy.deepcopy(trained)
    groups = layer_groups(model)
    masks = prune.get("magnitude").apply(model, prune.PruneRequest(groups, {g.name: sparsity for g in groups}))
    return model, masks


def _request(bundle, trained, masks, steps=60, method="finetune"):
    return heal.HealRequest(
        calibration=bundle.train.subset(256, seed=0), data=bundle, steps=steps, lr=2e-3, batch_size=32, masks=masks,
        teacher=trained, options=dict(heal.get(method).options), seed=0,
    )


@pytest.mark.parametrize("method", ["finetune", "distill"])
def test_healing_recovers_accuracy_and_keeps_masks(method, bundle, trained):
    model, masks = _pruned(trained)
    before = accuracy(model, bundle.eval, bundle)
    losses = heal.get(method).apply(model, _request(bundle, trained, masks, method=method))
    after = accuracy(model, bundle.eval, bundle)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after > before + 0.05, (before, after)
    modules = dict(model.named_modules())
    for name, mask in masks.by_layer.items():
        assert not modules[name].weight[~mask].any(), f"{name}: a pruned weight came back"


def test_no_healing_changes_nothing(bundle, trained):
    model, masks = _pruned(trained)
    state = copy.deepcopy(model.state_dict())
    assert heal.get("none").apply(model, _request(bundle, trained, masks)) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_diverging_loss_fails_clearly(bundle):
    model = TINY_RESNET.create()
    with pytest.raises(FloatingPointError, match="loss became"):
        optimise(model, images=bundle.train, data=bundle, objective=Loss(lambda m, x, y: m(x).sum() * float("nan")),
                 steps=3, lr=1e-3, batch_size=8, seed=0)


@pytest.mark.parametrize("steps", range(1, 13))
def test_any_step_count_trains(steps, bundle):
    """Every small budget runs (torch's OneCycleLR divided by zero at exactly 10 steps)."""
    model = TINY_RESNET.create()
    losses = optimise(model, images=bundle.train.subset(16, seed=0), data=bundle, objective=cross_entropy(),
                      steps=steps, lr=1e-3, batch_size=8, seed=0)
    assert len(losses) == steps


def test_the_schedule_warms_up_then_decays_to_zero():
    from autoprune.train.loop import warmup_cosine

    factor = warmup_cosine(100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=0.02) and factor(99) < 0.01
