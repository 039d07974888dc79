"""Every registered healing method passes the contract in `autoprune.testing.contracts`; recalibration and alignment
pin their defining properties."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, TINY_RESNET, TINY_VIT, briefly_trained

from autoprune import heal
from autoprune.measure.metrics import accuracy
from autoprune.models import internal_states
from autoprune.prune.masks import Masks
from autoprune.testing import contracts
from autoprune.testing.contracts import heal_with, magnitude_pruned


@pytest.fixture(scope="module", params=list(FAMILIES.values()), ids=list(FAMILIES))
def dense_source(request):
    return request.param


@pytest.fixture(scope="module")
def trained(dense_source, bundle):
    return briefly_trained(dense_source, bundle)


@pytest.mark.parametrize("method", heal.list_methods())
def test_conformance(method, dense_source, trained, bundle):
    contracts.check_heal_method(method, dense_source, bundle, trained)


@pytest.mark.parametrize("method", heal.list_methods())
def test_conformance_through_a_trial(method, dense_source, trained, bundle):
    """Each method heals a structurally pruned model inside the whole trial, after its profile (which times a copy
    in the default layout search), on the ViT and on the CNN."""
    contracts.check_heal_method_in_trial(method, dense_source, bundle, trained)


def test_bias_shift_restores_the_mean_output_of_a_masked_layer(bundle):
    """On the first prunable layer (its input is unchanged by pruning), the shift is exact."""
    torch.manual_seed(0)
    dense = TINY_VIT.create().eval()
    model = copy.deepcopy(dense)
    name = "blocks.0.attn.qkv"
    weight = dict(model.named_modules())[name].weight
    masks = Masks({name: torch.rand_like(weight) > 0.6})
    masks.apply(model)
    heal_with("recalibrate", model, masks, dense, bundle, images=64)

    def mean_output(network):
        captured = []
        layer = dict(network.named_modules())[name]
        handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            network(bundle.normalize(bundle.train.subset(64, seed=0).images))
        handle.remove()
        return torch.cat(captured).double().mean(0)

    assert torch.allclose(mean_output(model), mean_output(dense), atol=1e-4)


def test_batchnorm_statistics_are_re_estimated_on_the_pruned_network(bundle):
    torch.manual_seed(0)
    dense = TINY_RESNET.create().eval()
    model, masks = magnitude_pruned(dense, 0.5)
    heal_with("recalibrate", model, masks, dense, bundle, images=16, bias_shift=False)  # one batch of 16
    # What bn2 saw while re-estimating: conv2's output in a training-mode pass (upstream BNs use batch statistics).
    probe = copy.deepcopy(model).train()
    block = probe.layer1[0]
    captured = []
    handle = block.conv2.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        probe(bundle.normalize(bundle.train.subset(16, seed=0).images))
    handle.remove()
    block = model.layer1[0]
    batch_mean = torch.cat(captured).transpose(0, 1).flatten(1).mean(1)
    assert torch.allclose(block.bn2.running_mean, batch_mean, atol=1e-4)


def test_alignment_lowers_its_loss_and_beats_no_healing(trained, bundle):
    model, masks = magnitude_pruned(trained, 0.8)
    before = accuracy(model, bundle.eval, bundle)
    losses = heal_with("align", model, masks, trained, bundle, steps=80, images=32)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert accuracy(model, bundle.eval, bundle) > before + 0.05
    assert internal_states(model)  # it aligned internal states, not only logits


def test_alignment_options_are_checked(trained, bundle):
    model, masks = magnitude_pruned(trained)
    with pytest.raises(Exception, match="states must be one of"):
        heal_with("align", model, masks, trained, bundle, states="middle")
