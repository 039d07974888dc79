"""Structured removal and VBP beyond ViT and ResNet: channel groups read off the dependency graph, on tiny real timm
models of the kinds users bring (windowed attention, inverted residuals with squeeze-excitation, grouped convs,
concatenated features, all-residual RepVGG)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_RESNET

from autoprune import prune
from autoprune.check import REFUSES, REMOVES_LITTLE, WORKS, check_model
from autoprune.config import HealConfig, ProfileSpec, PruneConfig, TrialConfig
from autoprune.models import ModelSource, internal_states, layer_groups
from autoprune.prune.channels import channel_groups, dependency_graph, slice_positions
from autoprune.trial import TrialContext, run_trial

TINY_SWIN = ModelSource("swin_tiny_patch4_window7_224", 10, {"img_size": 32, "embed_dim": 16, "depths": (1, 1),
                                                             "num_heads": (2, 4), "window_size": 4})
TINY_MOBILENET = ModelSource("mobilenetv3_small_050", 10)  # inverted residuals, SE gates, hard-swish
TINY_REGNET = ModelSource("regnetx_002", 10)  # grouped convs
TINY_DENSENET = ModelSource("densenet121", 10, {"block_config": (2, 2)})  # concatenated features
TINY_EVA = ModelSource("eva02_tiny_patch14_224", 10, {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                      "num_heads": 2})  # gated MLPs (GluMlp), rotary attention
INPUT = (3, 32, 32)


@pytest.mark.parametrize("source, vbp", [(TINY_SWIN, WORKS), (TINY_MOBILENET, WORKS), (TINY_REGNET, WORKS),
                                         (TINY_DENSENET, REFUSES), (TINY_EVA, WORKS)],
                         ids=["swin", "mobilenetv3", "regnet", "densenet", "eva02"])
def test_structured_removal_shrinks_each_kind_and_the_result_reloads_and_trains(source, vbp):
    result = check_model(source, input_size=INPUT, methods=["structured", "vbp"], sparsities=(0.5,))
    structured, variance = result.checks
    # (a tiny model's widths round: some reach a little under 60% of the sparsity asked, which check calls
    # "removes little"; what is under test is that each kind shrinks, reloads and trains)
    assert structured.outcome in (WORKS, REMOVES_LITTLE), structured.reason
    assert structured.achieved_sparsity > 0.25 and structured.macs_ratio > 1.3 and structured.params_ratio > 1.2
    assert structured.reload_max_abs_diff < 1e-4 and structured.trains
    assert variance.outcome in ((WORKS, REMOVES_LITTLE) if vbp == WORKS else (vbp,)), variance.reason
    if vbp == WORKS:
        assert variance.macs_ratio > 1.1 and variance.reload_max_abs_diff < 1e-4 and variance.trains
    else:  # DenseNet's bottlenecks are read by convs with no bias and no BatchNorm after them: nothing to fold
        # into
        assert "no hidden channels whose mean can be folded" in variance.reason


def test_a_model_whose_every_channel_feeds_a_residual_sum_is_refused_with_the_reason_when_scoped_internal():
    from dataclasses import replace

    structured = prune.get("structured")
    internal = replace(structured, options={**structured.options, "scope": "internal"})
    result = check_model(ModelSource("repvgg_a0", 10), input_size=INPUT, methods=[internal], sparsities=(0.5,))
    assert result.checks[0].outcome == REFUSES
    assert "no block-internal channels" in result.checks[0].reason and "scope: stream" in result.checks[0].reason


def _groups(source: ModelSource):
    model = source.create().eval()
    return {group.root: group for group in channel_groups(model, dependency_graph(model, torch.randn(2, *INPUT)))}


def test_channels_are_internal_inside_a_block_and_a_stream_where_blocks_sum_them():
    resnet = _groups(TINY_RESNET)
    assert resnet["layer1.0.conv1"].internal and resnet["layer1.0.conv1"].consumers == ("layer1.0.conv2",)
    assert "layer2.0.downsample.0" not in resnet or not resnet["layer2.0.downsample.0"].internal
    # an SE gate writes into the expansion channels it gates (a product, not a sum): they stay internal
    mobilenet = _groups(TINY_MOBILENET)
    gated = [group for group in mobilenet.values() if any(name.endswith("se.conv_expand") for name in group.producers)]
    assert gated and all(group.internal and len(group.producers) == 2 for group in gated)
    regnet = _groups(TINY_REGNET)
    assert any(group.internal and group.slices > 1 for group in regnet.values())  # grouped convs: equal slices


def test_grouped_removal_takes_the_same_positions_out_of_every_slice():
    scores = torch.tensor([5.0, 1.0, 3.0, 9.0, 4.0, 2.0])  # two slices of three: position 1 is weakest overall
    assert slice_positions(scores, 2, 2) == [1, 4]
    assert slice_positions(scores, 1, 4) == [1, 5]


def test_layer_groups_and_internal_states_come_from_the_stages_timm_exposes():
    model = TINY_MOBILENET.create()
    names = [group.name for group in layer_groups(model)]
    assert names[:2] == ["blocks.0", "blocks.1"] and names[-1] == "conv_head"
    assert any("-" in name for name in names)  # a stage of two modules is named by its span
    assert internal_states(model) == [entry["module"] for entry in model.feature_info]
    swin = [group.name for group in layer_groups(TINY_SWIN.create())]
    assert swin == ["layers.0", "layers.1"]


@pytest.mark.parametrize("source", [TINY_SWIN, TINY_MOBILENET], ids=["swin", "mobilenetv3"])
def test_a_new_family_goes_through_a_whole_trial_with_a_training_heal(source, bundle, tmp_path):
    torch.manual_seed(0)
    context = TrialContext(source, source.create().state_dict(), bundle, ProfileSpec(batch_size=2, warmup=1, repeats=3))
    config = TrialConfig(PruneConfig("structured", {"all": 0.5}),
                         HealConfig("distill", calibration_images=32, steps=2, lr=1e-3, batch_size=8))
    result = run_trial(config, context, save_dir=tmp_path, threads=1)
    assert result.feasible and 0 <= result.accuracy <= 1
    assert result.params < sum(v.numel() for k, v in context.dense_state.items() if "num_batches" not in k)


@pytest.mark.parametrize("source, group, mlp", [(TINY_EVA, "blocks.0.mlp", "blocks.0.mlp"),
                                               (TINY_SWIN, "layers.0", "layers.0.blocks.0.mlp")],
                         ids=["gated-mlp", "swin-mlp"])
def test_vbp_keeps_the_mlp_output_expectation(source, group, mlp, bundle):
    """A GluMlp's hidden channel is value × gate; a Swin MLP sits in windowed attention blocks: either way VBP
    removes the lowest-variance hidden channels and folds their mean into fc2's bias, so the MLP's mean output is
    kept."""
    from autoprune import prune

    torch.manual_seed(0)
    model = source.create().eval()
    dense = copy.deepcopy(model)
    images = bundle.normalize(bundle.train.images[:64])
    groups = layer_groups(model)
    prune.get("vbp").apply(model, prune.PruneRequest(
        groups, {g.name: 0.5 if g.name == group else 0.0 for g in groups}, {}, images[:2], calibration=images))

    def mean_mlp_output(network):
        captured = []
        handle = network.get_submodule(mlp).register_forward_hook(
            lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            network(images)
        handle.remove()
        return torch.cat(captured).double().mean(0)

    pruned, original = model.get_submodule(mlp), dense.get_submodule(mlp)
    assert pruned.fc2.in_features == original.fc2.in_features // 2
    assert pruned.fc1.out_features == pruned.fc1.out_features // pruned.fc2.in_features * pruned.fc2.in_features
    assert torch.allclose(mean_mlp_output(model), mean_mlp_output(dense), atol=1e-5)


def test_cast_prunes_the_layers_a_model_applies_without_calling_them(bundle):
    """EVA's attention applies its qkv weight with F.linear (its own bias), so no input reaches a hook: that layer
    gets its N:M pattern under an identity covariance instead of failing the method."""
    from autoprune import prune

    model = TINY_EVA.create().eval()
    images = bundle.normalize(bundle.train.images[:16])
    groups = layer_groups(model)
    method = prune.get("cast")
    method.apply(model, prune.PruneRequest(groups, {}, dict(method.options), images[:2], calibration=images))
    kept = (model.blocks[0].attn.qkv.weight != 0).reshape(-1, 4).sum(1)
    assert torch.all(kept == 2)  # 2:4 in every group of the layer no hook saw


def test_a_linear_reading_channels_last_tokens_is_measured_per_channel():
    """MaxViT's and CoAtNet's MLPs read N × H × W × C: a Linear's channels are its last dim, not dim 1 (statistics
    per row of H were taken for channels before, and VBP removed almost nothing from MaxViT)."""
    from autoprune.prune.variance import input_statistics

    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(6, 2))
    images = torch.randn(8, 5, 4, 6) * torch.arange(1, 7)  # channel c varies with scale c + 1
    stats = input_statistics(model, ["1"], images)["1"]
    assert stats.variance.shape == (6,) and stats.count == 8 * 5 * 4
    assert torch.argsort(stats.variance).tolist() == list(range(6))


def test_structured_checks_its_result_without_moving_batchnorm_statistics():
    """The forward that checks the pruned model still runs is an eval-mode one: a model handed over in training
    mode keeps its mode and its BatchNorm running statistics."""
    from autoprune import prune

    model = TINY_MOBILENET.create().train()
    before = model.bn1.running_mean.clone()  # the stem's norm: its conv is never pruned
    groups = layer_groups(model)
    method = prune.get("structured")
    method.apply(model, prune.PruneRequest(groups, {g.name: 0.5 for g in groups}, dict(method.options),
                                           torch.randn(2, *INPUT)))
    assert model.training and torch.equal(model.bn1.running_mean, before)


# layouts Torch-Pruning's graph misreads: a scaled weight-standardised conv's own per-channel gain (NF-RegNet), a
# split attention's radix × channels view (ResNeSt), a blur pool's functional conv (TResNet), a reshape after which
# it infers no width (SHViT's single-head attention), a walk that runs away (ReXNet's sum over a slice of channels,
# for hours); and gMLP's gate, which splits fc1's outputs in halves
MISREAD = {"nfnet": ModelSource("nf_regnet_b0", 10),
           "resnest": ModelSource("resnest14d", 10),
           "tresnet": ModelSource("tresnet_m", 10, {"layers": (1, 1, 1, 1)}),
           "shvit": ModelSource("shvit_s1", 10),
           "rexnet": ModelSource("rexnet_100", 10),
           "gmlp": ModelSource("gmlp_ti16_224", 10, {"img_size": 64})}


@pytest.mark.parametrize("source", MISREAD.values(), ids=MISREAD.keys())
def test_structured_removal_leaves_whole_what_the_graph_misreads_and_prunes_the_rest(source):
    row = check_model(source, input_size=(3, 64, 64), methods=["structured"], sparsities=(0.5,)).checks[0]
    assert row.outcome == WORKS, row.reason
    assert row.macs_ratio > 1.3 and row.reload_max_abs_diff < 1e-5 and row.trains
