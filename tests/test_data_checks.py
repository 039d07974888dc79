"""The spec's data is checked against the files and the model before anything heavy: one line each, naming the key."""

from __future__ import annotations

import copy

import pytest
from PIL import Image
from test_spec import DEMO

from autoprune.driver.preflight import check_data
from autoprune.driver.prepare import model_source
from autoprune.errors import SpecError
from autoprune.space.load import parse_spec


def _tree(root, classes: int, images: int = 1):
    for index in range(classes):
        folder = root / f"class{index}"
        folder.mkdir(parents=True)
        for image in range(images):
            Image.new("RGB", (40, 40)).save(folder / f"{image}.png")
    return root


def _check(data: dict, **model):
    raw = copy.deepcopy(DEMO)
    raw["data"] = data
    raw["model"].update(model)
    spec = parse_spec(raw)
    check_data(spec, model_source(spec.model))


@pytest.mark.parametrize("case, message", [
    ("missing", r"data.train_dir: '.*nope' is not a directory"),
    ("empty", "has no class sub-folders"),
    ("no_images", r"1 class folder\(s\) of .* hold no images \(class0"),
    ("one_class", r"model.num_classes: 10, but data.train_dir .* has 1 class sub-folders \(class0\)"),
    ("other_classes", "both must hold the same class sub-folders"),
])
def test_an_imagefolder_that_cannot_work_is_one_line(tmp_path, case, message):
    train, val = tmp_path / "train", tmp_path / "val"
    if case == "missing":
        train = val = tmp_path / "nope"
    elif case == "empty":
        train.mkdir(), val.mkdir()
    elif case == "no_images":
        (train / "class0").mkdir(parents=True)
        (train / "class0" / "notes.txt").write_text("not an image")
        _tree(val, 1)
    elif case == "one_class":
        _tree(train, 1), _tree(val, 1)
    else:
        _tree(train, 10), _tree(val, 9)
    with pytest.raises(SpecError, match=message):
        _check({"source": "imagefolder", "train_dir": str(train), "val_dir": str(val), "image_size": 32})


def test_the_image_size_is_the_models_own_unless_given_and_a_contradiction_is_one_line(tmp_path):
    train, val = _tree(tmp_path / "train", 10), _tree(tmp_path / "val", 10)
    data = {"source": "imagefolder", "train_dir": str(train), "val_dir": str(val)}
    assert parse_spec({**DEMO, "data": data}).data.image_size == 32  # the demo's ViT: model.kwargs.img_size 32
    _check(data)  # left out: the model's own size, which it runs at
    with pytest.raises(SpecError, match=r"data.image_size: 224, but model.kwargs.img_size is 32: the model takes"
                                        r" 32×32 images"):
        _check({**data, "image_size": 224})
    plain = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1}}  # built for timm's default, 224×224
    assert parse_spec({**DEMO, "data": data, "model": {**DEMO["model"], **plain}}).data.image_size == 224
    with pytest.raises(SpecError, match=r"data.image_size: 32, but vit_tiny_patch16_224 .* does not run on 32×32"
                                        r" images .* it takes 224×224. Set data.image_size: 224, or"):
        _check({**data, "image_size": 32}, **plain)  # caught by one forward pass, before anything heavy
    with pytest.raises(SpecError, match=r"data.image_size: 64, but the reference task's images are 32×32"):
        parse_spec({**DEMO, "data": {"image_size": 64}})


def test_a_torchvision_dataset_that_is_not_one_is_named_with_the_closest(tmp_path):
    with pytest.raises(SpecError, match="did you mean FashionMNIST"):
        _check({"source": "torchvision", "dataset": "FashionMINST", "root": str(tmp_path), "image_size": 32})
    with pytest.raises(SpecError, match="data.root: .* is not a directory"):
        _check({"source": "torchvision", "dataset": "FashionMNIST", "root": str(tmp_path / "nope"), "image_size": 32})
