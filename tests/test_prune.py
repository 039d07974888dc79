"""Pruning methods: the contract in `autoprune.testing.contracts` every registered method passes, then each
method's defining property."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_BOTTLENECK, TINY_RESNET, TINY_VIT

from autoprune import prune
from autoprune.models import layer_groups
from autoprune.prune.nm import nm_mask
from autoprune.prune.variance import Welford
from autoprune.testing import contracts
from autoprune.testing.contracts import prune_fresh as _prune  # (source, method, example, sparsity, pooled, options)

# ---- the contract every registered method passes -----------------------------------------------------------


@pytest.mark.parametrize("method_name", prune.list_methods())
def test_conformance(method_name, source, bundle, tmp_path):
    contracts.check_prune_method(method_name, source, bundle, tmp_path)


# ---- each method's defining property ----------------------------------------------------------------------


def test_magnitude_removes_exactly_the_smallest(example):
    dense, model, masks = _prune(TINY_VIT, "magnitude", example, sparsity=0.3, pooled=True)
    layers = list(masks.by_layer)
    kept = torch.cat([dict(model.named_modules())[n].weight.abs().flatten() for n in layers])
    scores = torch.cat([dict(dense.named_modules())[n].weight.abs().flatten() for n in layers])
    removed = scores[kept == 0]
    assert removed.numel() == round(0.3 * scores.numel())
    assert removed.max() <= scores[kept != 0].min()  # one global threshold


def test_magnitude_per_group_sparsities_are_met(example):
    model = TINY_VIT.create().eval()
    groups = layer_groups(model)
    targets = {group.name: 0.2 + 0.15 * i for i, group in enumerate(groups)}
    masks = prune.get("magnitude").apply(model, prune.PruneRequest(groups, targets))
    for group in groups:
        kept = sum(int(masks.by_layer[n].sum()) for n in group.layers)
        total = sum(masks.by_layer[n].numel() for n in group.layers)
        assert 1 - kept / total == pytest.approx(targets[group.name], abs=1e-3)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group(n, m, example):
    _, model, masks = _prune(TINY_VIT, "nm", example, options={"n": n, "m": m})
    assert masks
    for name, mask in masks.by_layer.items():
        weight = dict(model.named_modules())[name].weight
        groups = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
        assert int(groups.max()) <= n, name


def test_nm_keeps_the_largest_in_each_group():
    weight = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, -2.0, 0.0, 1.0]])
    assert nm_mask(weight, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_rejects_a_bad_pattern(example):
    with pytest.raises(Exception, match="0 < n < m"):
        _prune(TINY_VIT, "nm", example, options={"n": 4, "m": 4})


def test_structured_shrinks_vit_mlps_and_keeps_the_residual_width(example):
    dense, model, _ = _prune(TINY_VIT, "structured", example, sparsity=0.5)
    for dense_block, block in zip(dense.blocks, model.blocks):
        assert block.mlp.fc1.out_features == dense_block.mlp.fc1.out_features // 2
        assert block.mlp.fc2.in_features == block.mlp.fc1.out_features
        assert block.mlp.fc2.out_features == dense_block.mlp.fc2.out_features  # residual stream intact
        assert block.attn.num_heads == dense_block.attn.num_heads // 2  # whole heads go…
        assert block.attn.head_dim == dense_block.attn.head_dim  # …each head keeps its width
        assert block.attn.qkv.out_features == dense_block.attn.qkv.out_features // 2


def test_structured_shrinks_bottleneck_inner_convs_only(example):
    dense, model, _ = _prune(TINY_BOTTLENECK, "structured", example, sparsity=0.5)
    block, dense_block = model.layer2[0], dense.layer2[0]
    assert block.conv1.out_channels == block.conv2.out_channels < dense_block.conv1.out_channels // 2
    assert block.conv3.out_channels == dense_block.conv3.out_channels  # feeds the residual add
    # the stage loses the half of its weights asked, although its downsample conv and conv3's outputs stay: its
    # inner convs lose more than half of their channels to make up for them
    stage = [name for name, module in dense.named_modules() if name.startswith("layer2.")
             and isinstance(module, torch.nn.Conv2d)]
    weights = [sum(dict(m.named_modules())[name].weight.numel() for name in stage) for m in (dense, model)]
    assert weights[1] / weights[0] == pytest.approx(0.5, abs=0.05)


def test_structured_round_to_keeps_multiples(example):
    _, model, _ = _prune(TINY_VIT, "structured", example, sparsity=0.3, options={"round_to": 8, "heads": True})
    assert all(block.mlp.fc1.out_features % 8 == 0 for block in model.blocks)


@pytest.mark.parametrize(("importance", "removes_dead_neuron"), [("l2", False), ("l1", False), ("taylor", True)])
def test_taylor_importance_sees_what_magnitude_cannot(importance, removes_dead_neuron, bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    mlp = model.blocks[0].mlp
    with torch.no_grad():  # neuron 0: the largest weights into it, none out of it — it cannot change the loss
        mlp.fc1.weight[0] *= 50
        mlp.fc2.weight[:, 0] = 0
    dense = copy.deepcopy(model)
    groups = layer_groups(model)
    sparsity = {g.name: (1 / mlp.fc1.out_features if g.name == "blocks.0.mlp" else 0.0) for g in groups}
    images = bundle.normalize(bundle.train.images[:16])
    options = {**prune.get("structured").options, "importance": importance}
    prune.get("structured").apply(model, prune.PruneRequest(groups, sparsity, options, images[:2], calibration=images))
    kept_dead = any(torch.equal(row, dense.blocks[0].mlp.fc1.weight[0]) for row in model.blocks[0].mlp.fc1.weight)
    assert kept_dead != removes_dead_neuron
    if removes_dead_neuron:
        with torch.no_grad():
            assert torch.allclose(model(images), dense(images), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no gradients leak into healing


def test_welford_matches_a_direct_computation():
    samples = torch.randn(1000, 7, dtype=torch.float64) * torch.arange(1, 8) + 3
    stats = Welford()
    for chunk in samples.split(137):
        stats.update(chunk)
    assert torch.allclose(stats.mean, samples.mean(0)) and torch.allclose(stats.variance, samples.var(0))


def _vbp(model, example, sparsity: dict):
    groups = layer_groups(model)
    request = prune.PruneRequest(groups, {g.name: sparsity.get(g.name, 0.0) for g in groups}, {}, example[:2],
                                 calibration=example)
    prune.get("vbp").apply(model, request)


def test_vbp_removing_a_zero_variance_neuron_changes_no_output(bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    fc1 = model.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.weight[5] = 0.0
        fc1.bias[5] = 0.7  # neuron 5's activation is GELU(0.7) for every input: variance 0
    dense = copy.deepcopy(model)
    images = bundle.normalize(bundle.train.images[:32])
    _vbp(model, images, {"blocks.0.mlp": 1 / fc1.out_features})
    assert model.blocks[0].mlp.fc1.out_features == dense.blocks[0].mlp.fc1.out_features - 1
    fresh = bundle.normalize(bundle.eval.images[:16])
    with torch.no_grad():
        assert torch.allclose(model(fresh), dense(fresh), atol=1e-5)


def test_vbp_mean_shift_keeps_the_mlp_output_expectation(bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    dense = copy.deepcopy(model)
    images = bundle.normalize(bundle.train.images[:64])
    _vbp(model, images, {"blocks.0.mlp": 0.5})

    def mean_mlp_output(network):
        captured = []
        handle = network.blocks[0].mlp.register_forward_hook(lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            network(images)
        handle.remove()
        return torch.cat(captured).double().mean(0)

    assert model.blocks[0].mlp.fc1.out_features == dense.blocks[0].mlp.fc1.out_features // 2
    assert torch.allclose(mean_mlp_output(model), mean_mlp_output(dense), atol=1e-5)


def test_vbp_removes_the_lowest_variance_neurons(bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[:8] *= 1e-3  # eight nearly constant neurons
    kept_rows = model.blocks[1].mlp.fc1.weight[8:].clone()
    width = kept_rows.shape[0] + 8
    _vbp(model, bundle.normalize(bundle.train.images[:64]), {"blocks.1.mlp": 8 / width})
    assert torch.equal(model.blocks[1].mlp.fc1.weight, kept_rows)


def _first_block_bn2(network, images):
    """The output of layer1[0].bn2 (cloned: the ops after it are in-place)."""
    captured = []
    handle = network.layer1[0].bn2.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    with torch.no_grad():
        network(images)
    handle.remove()
    return captured[0]


def test_vbp_cnn_removing_a_constant_channel_keeps_the_block(bundle):
    torch.manual_seed(0)
    model = TINY_RESNET.create().eval()
    block = model.layer1[0]
    with torch.no_grad():  # channel 3 after bn1 → ReLU is 0.5 everywhere: variance 0
        block.conv1.weight[3] = 0.0
        block.bn1.running_mean[3], block.bn1.bias[3] = 0.0, 0.5
        block.bn2.weight.fill_(1.0)  # timm zero-initialises the last BN of a block, which would hide everything
    dense = copy.deepcopy(model)
    images = bundle.normalize(bundle.train.images[:16])
    _vbp(model, images, {"layer1": 1 / block.conv1.out_channels})
    assert model.layer1[0].conv1.out_channels == dense.layer1[0].conv1.out_channels - 1

    pruned, reference = _first_block_bn2(model, images), _first_block_bn2(dense, images)
    # Zero padding makes a constant map's effect position-dependent at the border; the fold keeps its average, so
    # every output channel's mean over all positions is exactly the dense one's.
    assert torch.allclose(pruned.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(pruned, reference, atol=1e-5)  # (the positions themselves do move)


def test_vbp_cnn_fold_brings_the_block_output_mean_closer(bundle):
    torch.manual_seed(0)
    images = bundle.normalize(bundle.train.images[:32])

    def block_mean(network):
        return _first_block_bn2(network, images).double().mean((0, 2, 3))

    dense = TINY_RESNET.create().eval()
    with torch.no_grad():
        dense.layer1[0].bn2.weight.fill_(1.0)  # timm zero-initialises it, which would hide everything
    pruned = copy.deepcopy(dense)
    _vbp(pruned, images, {"layer1": 0.5})
    unfolded = copy.deepcopy(pruned)
    removed = dense.layer1[0].bn2.running_mean - pruned.layer1[0].bn2.running_mean
    unfolded.layer1[0].bn2.running_mean += removed  # the same removal without the mean shift
    error = (block_mean(pruned) - block_mean(dense)).abs().mean()
    assert error < 0.5 * (block_mean(unfolded) - block_mean(dense)).abs().mean()


def test_removing_a_silent_attention_head_changes_no_output(bundle):
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    attention = model.blocks[0].attn
    head_dim = attention.head_dim
    with torch.no_grad():  # head 1 writes nothing (zero proj columns) and is the weakest head
        attention.proj.weight[:, head_dim:2 * head_dim] = 0
        attention.qkv.weight.view(3, attention.num_heads, head_dim, -1)[:, 1] *= 1e-3
    dense = copy.deepcopy(model)
    groups = layer_groups(model)
    sparsity = {g.name: (0.5 if g.name == "blocks.0.attn" else 0.0) for g in groups}
    images = bundle.normalize(bundle.eval.images[:8])
    prune.get("structured").apply(model, prune.PruneRequest(groups, sparsity, dict(prune.get("structured").options),
                                                            images))
    assert model.blocks[0].attn.num_heads == 1 and model.blocks[1].attn.num_heads == 2
    with torch.no_grad():
        assert torch.allclose(model(images), dense(images), atol=1e-5)


def test_heads_can_be_kept(example):
    _, model, _ = _prune(TINY_VIT, "structured", example, sparsity=0.5, options={"round_to": 1, "heads": False})
    assert all(block.attn.num_heads == 2 for block in model.blocks)


@pytest.mark.parametrize("method_name", prune.list_methods())
def test_conformance_through_a_trial_that_heals(method_name, source, bundle):
    """Each method, on the ViT and on the CNN, through the whole trial: prune, profile (the default layout search),
    a training heal, evaluate — what a search runs, not only the pruning step."""
    contracts.check_prune_method_in_trial(method_name, source, bundle)
