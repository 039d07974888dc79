"""The reference task and ImageFolder loading, on image trees the tests write."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from autoprune.data import image_folder
from autoprune.errors import AutopruneError


def test_reference_task_is_split_and_balanced(bundle):
    assert bundle.train.images.dtype.is_floating_point is False
    assert bundle.input_size == (3, 32, 32)
    assert len(bundle.train) + len(bundle.eval) == 1797
    assert set(bundle.eval.labels.tolist()) == set(range(10))
    subset = bundle.train.subset(50, seed=0)
    assert len(subset) == 50 and len(set(subset.labels.tolist())) == 10  # every class even in a tiny budget
    assert bundle.train.subset(0, seed=0).images.shape[0] == 0


def _tree(root, classes=("cat", "dog"), per_class=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_loads_resized_balanced_subsets(tmp_path):
    _tree(tmp_path)
    data = image_folder(train_dir=tmp_path / "train", val_dir=tmp_path / "val", image_size=24, train_images=4,
                        eval_images=None)
    assert data.num_classes == 2
    assert tuple(data.train.images.shape) == (4, 3, 24, 24)
    assert len(data.eval) == 12
    assert sorted(data.train.labels.tolist()) == [0, 0, 1, 1]


def test_empty_or_missing_folders_fail_clearly(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(AutopruneError, match="holds no images"):
        image_folder(train_dir=tmp_path / "train", val_dir=tmp_path / "val", image_size=8, train_images=1,
                     eval_images=1)
    with pytest.raises(AutopruneError, match="is not a directory"):
        image_folder(train_dir=tmp_path / "nope", val_dir=tmp_path / "val", image_size=8, train_images=1,
                     eval_images=1)
