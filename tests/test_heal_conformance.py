"""Every registered healing method passes one contract; recalibration and alignment pin their defining properties."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT, briefly_trained

from autoprune import heal, prune
from autoprune.measure.metrics import accuracy
from autoprune.models import internal_states, layer_groups
from autoprune.prune.masks import Masks


@pytest.fixture(scope="module", params=[TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def trained(request, bundle):
    return briefly_trained(request.param, bundle)


def _pruned(dense, sparsity=0.75):
    model = copy.deepcopy(dense)
    groups = layer_groups(model)
    return model, prune.get("magnitude").apply(model, prune.PruneRequest(groups, {g.name: sparsity for g in groups}))


def _heal(method, model, masks, dense, bundle, *, steps=20, images=64, seed=0, **options):
    entry = heal.get(method)
    return entry.apply(model, heal.HealRequest(
        calibration=bundle.train.subset(images, seed=seed), data=bundle, steps=steps, lr=2e-3, batch_size=16,
        masks=masks, teacher=dense, options={**entry.options, **options}, seed=seed,
    ))


@pytest.mark.parametrize("method", heal.list_methods())
def test_conformance(method, trained, bundle, example):
    model, masks = _pruned(trained)
    losses = _heal(method, model, masks, trained, bundle)
    assert isinstance(losses, list) and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    modules = dict(model.named_modules())
    for name, mask in masks.by_layer.items():  # the masks hold: achieved sparsity stays at its target
        assert not modules[name].weight[~mask].any(), f"{method} revived pruned weights in {name}"
    with torch.no_grad():
        out = model.eval()(example)
    assert out.shape == trained(example).shape and torch.isfinite(out).all()
    again, masks_again = _pruned(trained)  # deterministic for a seed
    _heal(method, again, masks_again, trained, bundle)
    with torch.no_grad():
        assert torch.allclose(again.eval()(example), out, atol=1e-5)
    assert not trained.training and all(p.grad is None for p in trained.parameters())  # the teacher is untouched


@pytest.mark.parametrize("method", heal.list_methods())
def test_conformance_through_a_trial(method, trained, bundle):
    """Each method heals a structurally pruned model inside the whole trial, after its profile (which times a copy
    in the default layout search), on the ViT and on the CNN."""
    from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
    from autoprune.trial import TrialContext, run_trial

    source = TINY_VIT if hasattr(trained, "blocks") else TINY_RESNET
    context = TrialContext(source, trained.state_dict(), bundle, ProfileSpec(batch_size=2, warmup=1, repeats=3))
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig(method, calibration_images=32, steps=3, lr=1e-3, batch_size=8))
    result = run_trial(config, context, threads=1)
    assert result.feasible and 0 <= result.accuracy <= 1 and result.params < sum(p.numel() for p in trained.parameters())


def test_bias_shift_restores_the_mean_output_of_a_masked_layer(bundle):
    """On the first prunable layer (its input is unchanged by pruning), the shift is exact."""
    torch.manual_seed(0)
    dense = TINY_VIT.create().eval()
    model = copy.deepcopy(dense)
    name = "blocks.0.attn.qkv"
    weight = dict(model.named_modules())[name].weight
    masks = Masks({name: torch.rand_like(weight) > 0.6})
    masks.apply(model)
    _heal("recalibrate", model, masks, dense, bundle, images=64)

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
    model, masks = _pruned(dense, 0.5)
    _heal("recalibrate", model, masks, dense, bundle, images=16, bias_shift=False)  # one batch of 16
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
    model, masks = _pruned(trained, 0.8)
    before = accuracy(model, bundle.eval, bundle)
    losses = _heal("align", model, masks, trained, bundle, steps=80, images=32)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert accuracy(model, bundle.eval, bundle) > before + 0.05
    assert internal_states(model)  # it aligned internal states, not only logits


def test_alignment_options_are_checked(trained, bundle):
    model, masks = _pruned(trained)
    with pytest.raises(Exception, match="states must be one of"):
        _heal("align", model, masks, trained, bundle, states="middle")
