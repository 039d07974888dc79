"""CAST: N:M in every group, least covariance-weighted removed energy, and a function-preserving permutation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TINY_BOTTLENECK, TINY_RESNET, TINY_VIT

from autoprune import prune
from autoprune.models import layer_groups, pooled_group
from autoprune.prune.cast import (
    cast_mask,
    fold_permutations,
    group_covariances,
    interleave,
    keep_patterns,
    removed_energy,
)
from autoprune.prune.nm import nm_mask


def _cast(source, calibration, **options):
    torch.manual_seed(0)
    model = source.create().eval()
    dense = copy.deepcopy(model)
    groups = layer_groups(model)
    request = prune.PruneRequest(groups, {}, {**prune.get("cast").options, **options}, calibration[:2],
                                 calibration=calibration)
    masks = prune.get("cast").apply(model, request)
    return dense, model, masks


@pytest.mark.parametrize("source", [TINY_VIT, TINY_RESNET, TINY_BOTTLENECK], ids=["vit", "resnet", "bottleneck"])
@pytest.mark.parametrize("permute", [False, True])
def test_nm_holds_in_every_group(source, permute, bundle):
    _, model, masks = _cast(source, bundle.normalize(bundle.train.images[:8]), permute=permute)
    assert masks.by_layer
    modules = dict(model.named_modules())
    for name in masks.by_layer:
        weight = modules[name].weight
        nonzero = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert int(nonzero.max()) <= 2, name


def test_cast_never_removes_more_output_energy_than_magnitude(bundle):
    model = TINY_VIT.create().eval()
    calibration = bundle.normalize(bundle.train.images[:8])
    layers = {name: module for name, module in model.named_modules() if name.endswith(("fc1", "fc2", "qkv"))}
    covariances = group_covariances(model, layers, calibration, 4)
    patterns = keep_patterns(2, 4)
    strictly_better = 0
    for name, layer in layers.items():
        cast_cost = removed_energy(layer.weight, covariances[name], cast_mask(layer.weight, covariances[name], patterns))
        magnitude_cost = removed_energy(layer.weight, covariances[name], nm_mask(layer.weight, 2, 4))
        assert (cast_cost <= magnitude_cost + 1e-9).all(), name  # per row and group: magnitude's pattern is a candidate
        strictly_better += int((cast_cost < magnitude_cost - 1e-9).sum())
    assert strictly_better > 0  # the inputs are correlated and unequal in scale, so the choice differs somewhere


def test_with_white_inputs_cast_is_magnitude_nm():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    identity = torch.eye(4).expand(8, 4, 4)
    assert torch.equal(cast_mask(weight, identity, keep_patterns(2, 4)), nm_mask(weight, 2, 4))


def test_pattern_enumeration_and_sampling():
    assert keep_patterns(2, 4).shape == (6, 4)
    assert (keep_patterns(2, 4).sum(1) == 2).all()
    sampled = keep_patterns(8, 16, seed=3)  # C(16, 8) = 12870 ≥ 5000: sample 1024
    assert math.comb(16, 8) > 5000 and sampled.shape == (1024, 16) and (sampled.sum(1) == 8).all()
    assert torch.equal(sampled, keep_patterns(8, 16, seed=3))


def test_interleave_puts_one_channel_of_each_band_in_every_group():
    scores = torch.arange(16.0)
    perm = interleave(scores, 4)
    assert sorted(perm.tolist()) == list(range(16))
    bands = (15 - scores[perm]).div(4, rounding_mode="floor").reshape(4, 4)  # 0 = the most important quarter
    assert all(sorted(group.tolist()) == [0, 1, 2, 3] for group in bands)


@pytest.mark.parametrize("source", [TINY_VIT, TINY_BOTTLENECK], ids=["vit", "bottleneck"])
def test_folded_permutation_keeps_the_function(source, bundle):
    torch.manual_seed(0)
    model = source.create().eval()
    images = bundle.normalize(bundle.train.images[:8])
    before = model(images)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
    weights = {name: module.weight.detach().clone() for name, module in layers.items()}
    assert len(fold_permutations(model, layers, images, 4)) > 0
    assert torch.allclose(model(images), before, atol=1e-5)
    assert any(not torch.equal(weights[name], module.weight) for name, module in layers.items())


def test_cast_needs_calibration_images(example):
    model = TINY_VIT.create().eval()
    request = prune.PruneRequest((pooled_group(model),), {}, dict(prune.get("cast").options), example)
    with pytest.raises(Exception, match="calibration"):
        prune.get("cast").apply(model, request)


def test_recalibration_after_a_permuted_cast_compares_weights_in_one_channel_order(bundle):
    """CAST's permutation reorders fc2's inputs (and fc1's rows); recalibration's bias shift subtracts the pruned
    weight from the dense one, which must be read in the same order. With only blocks.0.mlp.fc2 pruned, its input
    is the dense hidden state (permuted), so the shift is exact: its mean output equals the dense layer's."""
    from autoprune import heal
    from autoprune.models import LayerGroup

    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    dense = copy.deepcopy(model)
    images = bundle.train.subset(64, seed=0)
    calibration = bundle.normalize(images.images)
    name = "blocks.0.mlp.fc2"
    request = prune.PruneRequest((LayerGroup("fc2", (name,)),), {}, {**prune.get("cast").options, "permute": True},
                                 calibration[:2], calibration=calibration)
    masks = prune.get("cast").apply(model, request)
    assert masks.layouts[name][1] is not None  # its inputs were reordered
    recalibrate = heal.get("recalibrate")
    recalibrate.apply(model, heal.HealRequest(calibration=images, data=bundle, steps=0, lr=0, batch_size=16,
                                              masks=masks, teacher=dense, options=dict(recalibrate.options)))

    def mean_output(network):
        captured = []
        handle = dict(network.named_modules())[name].register_forward_hook(
            lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            network(calibration)
        handle.remove()
        return torch.cat(captured).double().mean(0)

    assert torch.allclose(mean_output(model), mean_output(dense), atol=1e-4)
