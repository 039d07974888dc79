"""Saving a model that holds one tensor under several names (CoaT shares its position encodings between blocks):
written once, under the name safetensors keeps, and restored on loading; models without shared tensors are saved
as they always were."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune import prune
from autoprune.errors import AutopruneError
from autoprune.models import ModelSource, layer_groups
from autoprune.saved import STRUCTURE_FILE, WEIGHTS_FILE, _resize_to, load_model_dir, save_model

COAT = ModelSource("coat_lite_tiny", 10, {"img_size": 64})  # the smallest CoaT; 64×64 inputs


def _saved_names(directory) -> tuple[set[str], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), "pt") as weights:
        return set(weights.keys()), dict(weights.metadata() or {})


def _same_storage(state: dict[str, torch.Tensor], a: str, b: str) -> bool:
    return state[a].untyped_storage().data_ptr() == state[b].untyped_storage().data_ptr()


def _round_trip(model: torch.nn.Module, source: ModelSource, directory, images: torch.Tensor) -> torch.nn.Module:
    save_model(model, source, directory)
    again = load_model_dir(directory)
    assert list(again.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.allclose(again(images), model(images), atol=1e-5, rtol=0)
    return again


def test_a_coat_model_saves_its_shared_tensors_once_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = COAT.create().eval()
    state = model.state_dict()
    again = _round_trip(model, COAT, tmp_path, torch.randn(2, 3, 64, 64))

    saved, aliases = _saved_names(tmp_path)
    assert aliases, "coat_lite_tiny no longer shares tensors: this test tests nothing"
    assert aliases["serial_blocks1.0.cpe.proj.weight"] == "cpe1.proj.weight"
    assert saved.isdisjoint(aliases) and saved | set(aliases) == set(state)
    for alias, kept in aliases.items():
        assert _same_storage(state, alias, kept)
        assert _same_storage(again.state_dict(), alias, kept), f"{alias} is no longer {kept} once reloaded"
    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert structure["shapes"] == {key: list(value.shape) for key, value in state.items()}  # every name


def test_a_pruned_coat_model_reloads_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = COAT.create().eval()
    dense_shapes = {key: value.shape for key, value in model.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    groups = layer_groups(model)
    method = prune.get("structured")
    method.apply(model, prune.PruneRequest(groups, {group.name: 0.5 for group in groups}, dict(method.options),
                                           images))
    model.eval()
    assert any(value.shape != dense_shapes[key] for key, value in model.state_dict().items())
    _round_trip(model, COAT, tmp_path, images)
    assert _saved_names(tmp_path)[1]


@pytest.mark.parametrize("source", [TINY_RESNET, TINY_VIT, ModelSource("resnet18", 10, {})],
                         ids=["tiny-resnet", "tiny-vit", "resnet18"])
def test_a_model_without_shared_tensors_is_saved_as_before(source, tmp_path):
    torch.manual_seed(0)
    model = source.create().eval()
    size = source.kwargs.get("img_size", 32 if source is TINY_RESNET else 64)
    _round_trip(model, source, tmp_path, torch.randn(2, 3, size, size))
    saved, aliases = _saved_names(tmp_path)
    assert saved == set(model.state_dict()) and not aliases


def test_a_pruned_vit_still_reloads_bit_exactly(tmp_path, example):
    images = example
    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    groups = layer_groups(model)
    method = prune.get("structured")
    method.apply(model, prune.PruneRequest(groups, {group.name: 0.5 for group in groups},
                                           {**method.options, "heads": True}, images[:2]))
    model.eval()
    assert model.blocks[0].mlp.fc1.out_features < TINY_VIT.create().blocks[0].mlp.fc1.out_features
    _round_trip(model, TINY_VIT, tmp_path, images)


def test_a_folder_written_before_shared_tensors_were_handled_still_loads(tmp_path):
    """The old writer: every name, through safetensors' save_file (it refused CoaT, but wrote every other model)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = TINY_VIT.create().eval()
    save_model(model, TINY_VIT, tmp_path)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(tmp_path / WEIGHTS_FILE))
    again = load_model_dir(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_a_coat_file_holding_every_name_loads(tmp_path):
    """A file with each alias written as a copy of its own (what copying a shared model to the CPU tensor by tensor
    gives) loads too: the copies hold the same values."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = COAT.create().eval()
    save_model(model, COAT, tmp_path)
    save_file({key: value.clone() for key, value in model.state_dict().items()}, str(tmp_path / WEIGHTS_FILE))
    again = load_model_dir(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_only_the_dropped_aliases_may_be_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = COAT.create().eval()
    save_model(model, COAT, tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    del weights["head.weight"]
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(AutopruneError, match="missing head.weight"):
        load_model_dir(tmp_path)


def test_resizing_keeps_a_tensor_two_layers_share_shared():
    """Tied layers (one Parameter, two modules) are resized to one new Parameter, not two that drift apart."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight
    _resize_to(model, {"0.weight": torch.Size([4, 8]), "1.weight": torch.Size([4, 8])})
    assert model[0].weight is model[1].weight and model[0].weight.shape == (4, 8)
    assert model[0].out_features == model[1].out_features == 4
