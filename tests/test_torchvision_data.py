"""`data.source: torchvision`: a torchvision dataset already on disk, read by its own class, never downloaded —
tested on Fashion-MNIST-format files the test writes (flat and gzipped, as Debian's dataset-fashion-mnist ships
them, and in torchvision's own layout)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from autoprune.data import torchvision_dataset
from autoprune.errors import AutopruneError, SpecError


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fashion_files(folder, *, train=60, test=30, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = (labels[:, None, None] * 20 + rng.integers(0, 20, (count, 28, 28))).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)


def test_flat_gzipped_files_are_laid_out_once_and_read_by_torchvision(tmp_path):
    _fashion_files(tmp_path / "debian")
    bundle = torchvision_dataset(name="FashionMNIST", root=tmp_path / "debian", image_size=32, train_images=40,
                                 eval_images=20, staging_dir=tmp_path / "cache")
    assert bundle.train.images.shape == (40, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    assert bundle.eval.images.shape == (20, 3, 32, 32) and bundle.num_classes == 10
    assert bundle.train.labels.bincount().tolist() == [4] * 10  # class-balanced
    # grey repeated into RGB; a class's brightness survives the resize (labels and images stay paired)
    assert torch.equal(bundle.train.images[:, 0], bundle.train.images[:, 2])
    brightness = bundle.train.images.float().mean((1, 2, 3))
    assert torch.corrcoef(torch.stack([brightness, bundle.train.labels.float()]))[0, 1] > 0.99
    assert (tmp_path / "cache" / "torchvision" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_torchvisions_own_layout_is_read_in_place(tmp_path):
    _fashion_files(tmp_path / "FashionMNIST" / "raw", compress=False)
    bundle = torchvision_dataset(name="FashionMNIST", root=tmp_path, image_size=28, train_images=60,
                                 eval_images=None)
    assert len(bundle.train.images) == 60 and len(bundle.eval.images) == 30


def test_missing_files_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(AutopruneError, match=r"does not hold torchvision's FashionMNIST.*never downloads"):
        torchvision_dataset(name="FashionMNIST", root=tmp_path, image_size=32, train_images=10, eval_images=10)
    with pytest.raises(AutopruneError, match="'FashonMNIST' is not a torchvision dataset"):
        torchvision_dataset(name="FashonMNIST", root=tmp_path, image_size=32, train_images=10, eval_images=10)


def test_the_spec_reads_a_torchvision_source_and_the_search_loads_it(tmp_path):
    from test_spec import DEMO

    from autoprune.driver.prepare import load_data
    from autoprune.space.load import parse_spec

    _fashion_files(tmp_path / "debian")
    raw = {**DEMO, "data": {"source": "torchvision", "dataset": "FashionMNIST", "root": str(tmp_path / "debian"),
                            "image_size": 32, "eval_images": 20}}
    bundle = load_data(parse_spec(raw), cache_dir=tmp_path / "cache")
    assert bundle.num_classes == 10 and len(bundle.eval.images) == 20
    with pytest.raises(SpecError, match="needs `dataset`"):
        parse_spec({**DEMO, "data": {"source": "torchvision", "root": str(tmp_path)}})
