"""The reference task and ImageFolder loading, on image trees the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def test_images_are_shared_through_the_object_store_not_copied(local_ray, bundle):
    """Every trial on a node reads the one copy in the object store: an ImageSet travels as numpy arrays, which Ray
    hands out zero-copy (torch tensors it would copy into each reader)."""
    ref = local_ray.put(bundle.train)
    first, second = local_ray.get(ref), local_ray.get(ref)
    assert first.source.data_ptr() == second.source.data_ptr()  # the same memory, twice: no copy per reader
    assert torch.equal(first.images, bundle.train.images) and torch.equal(first.labels, bundle.train.labels)
    calibration = first.subset(64, seed=0)  # a trial's calibration images: a view of the shared ones
    assert calibration.source.data_ptr() == first.source.data_ptr() and len(calibration) == 64
    assert torch.equal(calibration.take(slice(0, 4)), calibration.images[:4])


def test_calibration_batches_are_normalised_one_at_a_time_on_their_device(bundle):
    images = bundle.train.subset(40, seed=0)
    batches = list(bundle.batches(images, "cpu").split(16))
    assert [len(b) for b in batches] == [16, 16, 8] and all(b.dtype == torch.float32 for b in batches)
    assert torch.allclose(torch.cat(batches), bundle.normalize(images.images))


def test_decoded_images_are_cached_and_read_back_the_same(tmp_path):
    _tree(tmp_path)
    kwargs = dict(train_dir=tmp_path / "train", val_dir=tmp_path / "val", image_size=24, train_images=6,
                  eval_images=None, cache_dir=tmp_path / "cache", workers=2)
    first = image_folder(**kwargs)
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 2  # train and val subsets
    again = image_folder(**kwargs)
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.eval.images, again.eval.images)
    plain = image_folder(**{**kwargs, "cache_dir": None, "workers": 1})  # one thread, no cache: the same pixels
    assert torch.equal(plain.train.images, first.train.images)


def test_a_subset_sent_to_another_process_carries_only_its_own_images():
    """DeepSpeed's workers get the calibration images pickled: a subset is a view of the whole training pool, so it
    is compacted first (for deit_small the pool made the job ≈770 MB for a few hundred images)."""
    import pickle

    import torch

    from autoprune.data import ImageSet

    pool = ImageSet(torch.zeros(2000, 3, 32, 32, dtype=torch.uint8), torch.arange(2000) % 10)
    calibration = pool.subset(100, seed=0)
    compact = calibration.compact()
    assert torch.equal(compact.images, calibration.images) and torch.equal(compact.labels, calibration.labels)
    assert len(pickle.dumps(compact)) < len(pickle.dumps(calibration)) / 10
    assert pool.compact() is pool
