"""Whole attention heads removed from timm attentions beyond ViT's, where a probe confirms their layout; and the
share of weights asked of a layer group met from the layers that can lose any."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprune import prune
from autoprune.check import WORKS, check_model
from autoprune.models import ModelSource, layer_groups
from autoprune.prune.heads import candidates, head_layouts
from autoprune.saved import load_model_dir, save_model

# TinyViT: q, k and v rows grouped by head ((head, q|k|v, dim)), a per-head attention-bias table and a cache of it
TINY_TINYVIT = ModelSource("tiny_vit_5m_224", 10, {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1),
                                                   "num_heads": (2, 2, 4, 4)})
# DaViT: reshapes its attention's output to its input's width, so no head can go (the probe must see that)
TINY_DAVIT = ModelSource("davit_tiny", 10, {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1),
                                            "num_heads": (2, 2, 4, 4)})
INPUT = (3, 64, 64)


def _structured(model: torch.nn.Module, sparsity: float = 0.5) -> None:
    method = prune.get("structured")
    groups = layer_groups(model)
    prune.get("structured").apply(model, prune.PruneRequest(
        groups, {group.name: sparsity for group in groups}, dict(method.options), torch.randn(2, *INPUT)))


def test_a_probe_confirms_tinyvits_head_layout_and_removal_keeps_the_kept_heads_exact(tmp_path):
    torch.manual_seed(0)
    model = TINY_TINYVIT.create().eval()
    layouts = head_layouts(model, torch.randn(1, *INPUT))
    assert layouts and {slicing.layout for slicing in layouts.values()} == {"heads_first"}
    dense = copy.deepcopy(model)
    _structured(model)
    names = [name for name, _ in candidates(dense)]
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    for name in names:
        assert modules[name].num_heads == max(1, dense_modules[name].num_heads // 2)
        assert modules[name].attention_biases.shape[0] == modules[name].num_heads
        assert modules[name].out_dim == modules[name].proj.in_features
    images = torch.randn(4, *INPUT)
    save_model(model, TINY_TINYVIT, tmp_path / "saved")
    reloaded = load_model_dir(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(images), model.eval()(images))  # head counts and widths came back


def test_an_attention_whose_layout_no_guess_fits_keeps_its_heads_and_its_group_loses_the_share_asked_elsewhere():
    model = TINY_DAVIT.create().eval()
    assert candidates(model) and not head_layouts(model, torch.randn(1, *INPUT))
    dense = copy.deepcopy(model)
    _structured(model)
    groups = layer_groups(dense)
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    for group in groups:
        before = sum(dense_modules[name].weight.numel() for name in group.layers)
        after = sum(modules[name].weight.numel() for name in group.layers)
        assert after / before == pytest.approx(0.5, abs=0.08), group.name


@pytest.mark.parametrize("source", [TINY_TINYVIT, TINY_DAVIT], ids=["tinyvit", "davit"])
def test_structured_works_through_check_with_healing(source):
    result = check_model(source, input_size=INPUT, methods=["structured"], sparsities=(0.5,), heal_methods=["align"])
    row = result.checks[0]
    assert row.outcome == WORKS, row.reason
    assert row.achieved_sparsity == pytest.approx(0.5, abs=0.08) and row.macs_ratio > 1.3
    assert row.reload_max_abs_diff < 1e-5 and row.heals == {"align": ""}
