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


def test_healing_warms_up_holds_the_peak_then_decays_to_zero():
    from autoprune.train.loop import WarmupStableDecay

    factor = WarmupStableDecay(100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == factor(50) == factor(79) == 1.0  # flat: independent of where the heal will end
    assert factor(90) == pytest.approx(0.5, abs=0.05) and factor(99) < 0.01


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_a_heal_continued_past_a_branch_is_the_heal_without_it(model_name, bundle, trained):
    """A rung's evaluation branch (steps decayed from the main line, then put back, BatchNorm statistics and the
    optimiser's moments included) leaves no trace: advancing 4 steps, branching, then going on to 12 gives the
    same weights, bit for bit, as 12 steps in one go; and the branch itself trained (its model differed)."""
    from conftest import TINY_VIT

    from autoprune.train.loop import TrainingRun, WarmupStableDecay

    dense = trained if model_name == "cnn" else TINY_VIT.create()
    images = bundle.train.subset(64, seed=0)

    def run(model):
        return TrainingRun(model, images=images, data=bundle, objective=cross_entropy(), steps=12, lr=1e-3,
                           batch_size=8, seed=0, schedule=WarmupStableDecay(12))

    straight, branched = copy.deepcopy(dense), copy.deepcopy(dense)
    one = run(straight)
    one.advance(12)
    one.close()
    two = run(branched)
    two.advance(4)
    at_branch = {k: v.clone() for k, v in branched.state_dict().items()}
    seen = two.branch(3, lambda model: {k: v.clone() for k, v in model.state_dict().items()})
    assert any(not torch.equal(seen[k], at_branch[k]) for k in at_branch)  # the branch trained
    assert all(torch.equal(branched.state_dict()[k], at_branch[k]) for k in at_branch)  # …and was put back
    two.advance(12)
    two.close()
    assert all(torch.equal(straight.state_dict()[k], branched.state_dict()[k]) for k in at_branch)
    assert (one.spent, two.spent) == (12, 15) and len(two.losses) == 12
