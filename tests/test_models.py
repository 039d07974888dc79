"""The real loading paths (timm pretrained, local checkpoints) on files the tests create, and their errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT
from safetensors.torch import save_file

from autoprune.errors import AutopruneError
from autoprune.models import ModelSource, layer_groups, load_dense, prunable_layers
from autoprune.saved import load_model_dir


def _state(source):
    torch.manual_seed(1)
    return source.create().state_dict()


@pytest.mark.parametrize("layout", ["safetensors", "torch", "wrapped"])
def test_checkpoint_files_load(layout, tmp_path):
    state = _state(TINY_VIT)
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if layout == "wrapped" else state, path)
    model = load_dense(TINY_VIT, checkpoint=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_timm_pretrained_path_reads_a_local_file(tmp_path):
    """`pretrained=True` goes through timm's real loader; the weights come from a file instead of the hub."""
    state = _state(TINY_RESNET)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    source = ModelSource(TINY_RESNET.name, 10, {**TINY_RESNET.kwargs, "pretrained_cfg_overlay": {"file": str(path)}})
    model = load_dense(source, pretrained=True)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_checkpoint_errors_are_one_line_with_the_fix(tmp_path):
    with pytest.raises(AutopruneError, match="does not exist"):
        load_dense(TINY_VIT, checkpoint=tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(AutopruneError, match="cannot read"):
        load_dense(TINY_VIT, checkpoint=corrupt)
    other = tmp_path / "other.pt"
    torch.save(_state(TINY_RESNET), other)
    with pytest.raises(AutopruneError, match="does not fit"):
        load_dense(TINY_VIT, checkpoint=other)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(AutopruneError, match="not a timm model.*resnet"):
        ModelSource("resnet_18x", 10).create()


def test_a_pickle_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(AutopruneError, match="cannot read"):
        load_dense(TINY_VIT, checkpoint=path)


def test_layer_groups_follow_the_family():
    vit = [g.name for g in layer_groups(TINY_VIT.create())]
    assert vit == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    resnet = [g.name for g in layer_groups(TINY_RESNET.create())]
    assert resnet == ["layer1", "layer2", "layer3", "layer4"]
    names = [n for n, _ in prunable_layers(TINY_RESNET.create())]
    assert "conv1" not in names and "fc" not in names  # the stem and the classifier stay dense


def test_a_folder_without_structure_is_not_a_model(tmp_path):
    with pytest.raises(AutopruneError, match="not an autoprune model"):
        load_model_dir(tmp_path)


@pytest.mark.parametrize(("typed", "meant"), [("vit_tinyy_patch16_224", "vit_tiny_patch16_224"),
                                               ("resnet-18", "resnet18"), ("ResNet50", "resnet50"),
                                               ("mobilnetv3_small_100", "mobilenetv3_small_100")])
def test_an_unknown_timm_name_is_one_line_with_the_closest_names_first(typed, meant):
    with pytest.raises(AutopruneError, match=rf"model.name: '{typed}' is not a timm model\. Did you mean {meant},"):
        ModelSource(typed, 10).create()


def test_a_depthwise_conv_with_a_channel_multiplier_reloads(tmp_path):
    """FastViT's depthwise convs have twice as many outputs as inputs (groups = inputs): reloading set groups to the
    outputs, so a saved fastvit did not run, whatever the method."""
    import torch

    from autoprune.saved import load_model_dir, save_model

    source = ModelSource("fastvit_t8", 10, {})
    torch.manual_seed(0)
    model = source.create().eval()
    images = torch.randn(1, 3, 64, 64)
    save_model(model, source, tmp_path)
    again = load_model_dir(tmp_path)
    multiplied = [m for m in again.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
                  and m.groups == m.in_channels and m.out_channels > m.in_channels]
    assert multiplied, "fastvit_t8 no longer has a depthwise conv with a channel multiplier: this test tests nothing"
    with torch.no_grad():
        assert torch.allclose(again(images), model(images), atol=1e-5)
