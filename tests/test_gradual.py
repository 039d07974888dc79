"""Gradual pruning: the schedules' values, progressive magnitude's monotone masks, Feather's operator and STE."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT

from autoprune import prune
from autoprune.models import LayerGroup, layer_groups, pooled_group
from autoprune.prune.gradual import Feather, ProgressiveMagnitude
from autoprune.prune.masks import cubic_schedule, linear_schedule
from autoprune.train.loop import cross_entropy, optimise


def test_schedules_give_the_documented_sparsity():
    assert cubic_schedule(0.0, 0.8) == 0.0
    assert cubic_schedule(0.25, 0.8, end=0.5) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7: fast early
    assert cubic_schedule(0.5, 0.8, end=0.5) == pytest.approx(0.8)
    assert cubic_schedule(0.9, 0.8, end=0.5) == pytest.approx(0.8)  # held after the end
    assert linear_schedule(0.25, 0.8, end=0.5) == pytest.approx(0.4)
    assert linear_schedule(0.3, 0.8, start=0.2, end=0.6) == pytest.approx(0.2)


def _sparsity(masks_by_layer) -> float:
    total = sum(m.numel() for m in masks_by_layer.values())
    return 1 - sum(int(m.sum()) for m in masks_by_layer.values()) / total


def test_progressive_masks_follow_the_schedule_and_never_revive():
    torch.manual_seed(0)
    model = TINY_VIT.create()
    group = pooled_group(model)
    sparsifier = ProgressiveMagnitude(model, (group,), {"all": 0.8}, schedule="linear", end=0.5)
    previous = None
    for progress in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7):
        with torch.no_grad():  # training moves the weights between updates
            for name in group.layers:
                dict(model.named_modules())[name].weight.add_(torch.randn_like(dict(model.named_modules())[name].weight) * 0.01)
        sparsifier.before_step(model, progress)
        assert _sparsity(sparsifier.by_layer) == pytest.approx(linear_schedule(progress, 0.8, end=0.5), abs=1e-3)
        if previous is not None:
            for name, mask in sparsifier.by_layer.items():
                assert not (mask & ~previous[name]).any(), "a pruned weight came back"
        previous = {name: mask.clone() for name, mask in sparsifier.by_layer.items()}
    assert _sparsity(sparsifier.finish(model).by_layer) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "progressive"])
def test_masks_follow_their_weights_to_another_device(method):
    """Masks are made where pruning ran (the CPU); healing then moves the model to its device (a GPU). Each mask
    goes to its weight's device at the first update. The meta device stands in for the GPU here: mixing it with a
    CPU mask fails exactly as cuda:0 does."""
    from conftest import TINY_RESNET

    torch.manual_seed(0)
    model = TINY_RESNET.create()
    groups = layer_groups(model)
    masks = prune.get(method).apply(model, prune.PruneRequest(groups, {g.name: 0.5 for g in groups},
                                                              prune.get(method).options))
    model.to("meta")
    masks.before_step(model, 0.3)
    masks.after_step(model)
    final = masks.finish(model)
    assert {mask.device.type for mask in final.by_layer.values()} == {"meta"}


def test_progressive_prunes_while_healing(bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create()
    groups = layer_groups(model)
    method = prune.get("progressive")
    sparsifier = method.apply(model, prune.PruneRequest(groups, {g.name: 0.6 for g in groups}, method.options))
    seen = []
    original = sparsifier.before_step
    sparsifier.before_step = lambda m, p: (original(m, p), seen.append(_sparsity(sparsifier.by_layer)))
    optimise(model, images=bundle.train.subset(64, seed=0), data=bundle, objective=cross_entropy(), steps=20, lr=1e-3,
             batch_size=16, seed=0, masks=sparsifier)
    assert seen[0] < 0.1 and seen == sorted(seen) and seen[-1] == pytest.approx(0.6, abs=1e-3)


def test_feather_forward_is_the_threshold_operator_and_backward_scales_pruned_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(layer)
    group = LayerGroup("all", ("0",))  # a Sequential has no timm layer groups: name the layer directly
    sparsifier = Feather(model, (group,), {"all": 0.97}, p=3.0, end=0.5, theta_extreme=0.5)
    sparsifier.before_step(model, 0.1)
    latent = layer.parametrizations.weight.original
    threshold = sparsifier.operators["0"].threshold
    assert threshold > 0
    expected = torch.where(latent.abs() > threshold,
                           latent.sign() * (latent.abs() ** 3 - threshold**3).clamp_min(0) ** (1 / 3),
                           torch.zeros_like(latent))
    assert torch.allclose(layer.weight, expected, atol=1e-6)

    inputs = torch.randn(4, 16)
    layer(inputs).sum().backward()
    upstream = torch.ones(4, 8).T @ inputs  # d(sum)/d(weight) seen by the thresholded weight
    pruned = latent.abs() <= threshold
    assert torch.allclose(latent.grad[~pruned], upstream[~pruned], atol=1e-5)
    assert torch.allclose(latent.grad[pruned], 0.5 * upstream[pruned], atol=1e-5)  # θ = 0.5 above 95%


def test_feather_writes_back_exact_sparsity_and_plain_layers():
    torch.manual_seed(0)
    model = TINY_VIT.create()
    groups = (pooled_group(model),)
    method = prune.get("feather")
    sparsifier = method.apply(model, prune.PruneRequest(groups, {"all": 0.7}, method.options))
    sparsifier.before_step(model, 0.25)
    masks = sparsifier.finish(model)
    assert _sparsity(masks.by_layer) == pytest.approx(0.7, abs=1e-3)
    assert not any("parametrizations" in key for key in model.state_dict())
    modules = dict(model.named_modules())
    assert all(not modules[name].weight[~mask].any() for name, mask in masks.by_layer.items())
